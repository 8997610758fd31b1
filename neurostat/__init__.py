"""neurostat: property neurons in self-supervised speech Transformers.

One pass over a labelled corpus collects, for every FFN neuron of every layer and every joint
label (phone × gender × pitch bin), how often it is activated and its moments; a selector and a
pruner work from the resulting Zarr store.
"""

import os

from .version import __version__

# torch's OpenMP threads wait for each other at the end of every parallel region; spinning there (GNU
# OpenMP's default) lets a thread whose core another job holds stall all the others: a CPU collect fell from
# 48 to 4.5 audio-s/s beside a busy job on 2 cores.  Waiting passively costs nothing measurable when the
# machine is quiet.  Read once, when torch loads its OpenMP runtime: set here, before any torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
