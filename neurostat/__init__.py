"""neurostat: property neurons in self-supervised speech Transformers.

One pass over a labelled corpus collects, for every FFN neuron of every layer and every joint
label (phone × gender × pitch bin), how often it is activated and its moments; a selector and a
pruner work from the resulting Zarr store.
"""

from .version import __version__

__all__ = ["__version__"]


_LAZY = {
    "open_stats": "stats",
    "prune": "model.pruning",
    "load_pruned": "model.loading",
    "ablated": "model.edit",
    "NeuronSet": "neuronset",
}


def __getattr__(name: str):
    """Lazy top-level API (keeps `import neurostat` light for the CLI)."""
    import importlib

    if name == "select":
        return importlib.import_module(".select", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'neurostat' has no attribute {name!r}")
