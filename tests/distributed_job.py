"""One rank of a test's torchrun job: ``collect_corpus`` in float64 with the settings in argv[1] (JSON)."""

import json
import sys

from neurostat.engine.collect import CollectConfig, collect_corpus

args = json.loads(sys.argv[1])
config = CollectConfig(**{**args["config"], "labels": tuple(args["config"]["labels"])})
collect_corpus(args["model"], args["out"], config, prepared=args["prepared"], dtype="float64", progress=False)
