"""The ``neurostat`` command line: a thin click group over library functions, one file per stage
(corpus, collect, select, model, probe, report, diff).  Commands import the library lazily, so ``--help`` stays fast."""

from . import collect, corpus, diff, model, probe, report, select  # noqa: F401  (registers the commands)
from .app import main

__all__ = ["main"]
