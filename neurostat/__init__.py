"""neurostat: property neurons in self-supervised speech Transformers.

One pass over a labelled corpus collects, for every FFN neuron of every layer and every joint
label (phone × gender × pitch bin), how often it is activated and its moments; a selector and a
pruner work from the resulting Zarr store.
"""

import os

from .version import __version__

# torch's OpenMP threads wait for each other at the end of every parallel region.  GNU OpenMP (the runtime
# of torch's Linux wheels) spins there 300,000 times before it sleeps, so a thread whose core another job
# took stalls all the others: on 2 cores a collect with 2 threads beside a busy job made 36 audio-s/s
# against 150 quiet.  10,000 spins make it 57 and keep the quiet speed within about 5 %; sleeping at once
# (passive waits) makes it 80 but costs a fifth of the quiet speed.  The threads themselves are chosen by
# the cores idle when a run starts (engine.device.forward_threads), so a job already running holds no core
# that a thread waits on; the spin count is for a job that starts later.  LLVM's and Intel's OpenMP (macOS
# wheels, conda builds) ignore it.  Read once, when torch loads its OpenMP runtime: set here, before any
# torch import, and never over a wait policy or spin count of the user's.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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
