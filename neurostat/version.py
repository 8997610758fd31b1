"""The package's version, in a leaf module: the library records it without importing the package face."""

__version__ = "0.1.0"
