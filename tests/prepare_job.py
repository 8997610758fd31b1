"""One rank of a test's torchrun prepare, as ``neurostat prepare`` runs it; argv: the corpus folder (LibriSpeech
layout), the prepared folder, and how many utterances rank 1 labels before it kills itself (0: it does not)."""

import os
import signal
import sys
import time
from pathlib import Path

import neurostat.corpus.prepare as prepare_module
from neurostat.engine.distributed import PrepareRanks, World
from neurostat.frames import default_geometry

corpus, out, kill_after = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
world = World.from_environment()
label_one = prepare_module._label_one
if world.rank == 1 and kill_after:
    labelled = []

    def label_then_die(*args):
        if len(labelled) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        labelled.append(args[0].id)
        return label_one(*args)

    prepare_module._label_one = label_then_die
elif kill_after:  # rank 0 slowed down, so that rank 1 claims its utterances however late the machine runs it

    def label_slowly(*args):
        time.sleep(0.1)
        return label_one(*args)

    prepare_module._label_one = label_slowly
ranks = PrepareRanks(world)
settings = prepare_module.PrepareSettings(default_geometry())
prepare_module.prepare(
    corpus / "LibriSpeech", "dev-clean", corpus / "alignments", out, settings, progress=False, ranks=ranks
)
ranks.close()
