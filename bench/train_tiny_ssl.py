"""Pre-trains neurostat's demo model (HuBERT's first iteration on synthetic speech) on CPU.

    python bench/train_tiny_ssl.py                 # ~40 min on 2 cores: corpus, k-means, 2400 steps
    python bench/train_tiny_ssl.py --ship          # ... and write it into neurostat/tiny/model
    python bench/train_tiny_ssl.py --twin DIR      # only save the random-init twin (same config and seed)
    python bench/train_tiny_ssl.py --smoke         # a few steps of a small run (CI)

A killed run resumes from WORK/checkpoint.pt.  The settings, loss and masked-prediction accuracy, and the
masked-prediction accuracy on held-out speech (the demo corpus's speakers and voices) with its baselines
are logged and saved in WORK/training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurostat.tiny import shipped_model_dir  # noqa: E402
from neurostat.tiny.train import (  # noqa: E402
    TrainSettings,
    held_out_corpus,
    save_random_twin,
    ship,
    train,
    training_corpus,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "neurostat" / "tiny-training")
    p.add_argument("--seed", type=int, default=TrainSettings.seed)
    p.add_argument("--steps", type=int, default=TrainSettings.steps)
    p.add_argument(
        "--ship", action="store_true", help="write the trained model into the package (neurostat/tiny/model)"
    )
    p.add_argument("--twin", type=Path, help="only save the random-init twin to this folder")
    p.add_argument("--smoke", action="store_true", help="a tiny corpus and a few steps in a temporary folder")
    args = p.parse_args()
    settings = TrainSettings(seed=args.seed, steps=args.steps)
    if args.twin:
        print(f"random-init twin: {save_random_twin(args.twin, settings)}")
        return
    if args.smoke:
        settings = TrainSettings.small(checkpoint_every=3)
        with tempfile.TemporaryDirectory() as tmp:
            root = training_corpus(Path(tmp) / "corpus", settings, progress=False)
            held_out = held_out_corpus(Path(tmp) / "held-out", settings, progress=False)
            summary = train(root, Path(tmp) / "run", settings, held_out=held_out)
            ship(Path(tmp) / "run" / "model", Path(tmp) / "shipped", summary)
            print(f"smoke: {summary['final']}; held out: {summary['held_out']}")
        return
    root = training_corpus(args.work / "corpus", settings)
    summary = train(root, args.work / "run", settings, held_out=held_out_corpus(args.work / "held-out", settings))
    print(json.dumps({"final": summary["final"], "held_out": summary["held_out"]}))
    if args.ship:
        print(f"shipped: {ship(args.work / 'run' / 'model', shipped_model_dir(), summary)}")


if __name__ == "__main__":
    main()
