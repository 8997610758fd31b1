"""neurostat: property neurons in self-supervised speech Transformers.

One pass over a labelled corpus collects, for every FFN neuron of every layer and every joint
label (phone × gender × pitch bin), how often it is activated and its moments; a selector and a
pruner work from the resulting Zarr store.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API (keeps `import neurostat` light for the CLI)."""
    if name == "open_stats":
        from .stats import open_stats

        return open_stats
    raise AttributeError(f"module 'neurostat' has no attribute {name!r}")
