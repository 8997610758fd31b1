"""Triton kernels for the collection engine (importable as ``neurostat.kernels``).

Each kernel lives in its own file beside its pure-torch reference and its test.
"""
