"""Transformer layer outputs per utterance, for tools that learn from features (cluster, probe).

Runs the padding-safe batched forward of the collect loop and keeps the outputs of the wanted layers
(forward hooks); the layers above the highest wanted one are not run.  A model of fixed windows (Whisper)
sees an utterance window by window: its windows' frames are joined into the utterance's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from tqdm import tqdm

from ..corpus.prepared import AudioChangedError, LabelSetError, PreparedCorpus
from ..labelspace import LabelSpace
from ..model.adapter import ModelAdapter
from ..model.families import ModelError
from .batching import BatchDataset, plan_batches
from .device import default_batch_seconds, default_num_jobs


class _Captured(Exception):
    """Stops the forward once the highest wanted layer's output is captured."""


def layer_features(
    corpus: PreparedCorpus,
    adapter: ModelAdapter,
    indices: list[int],
    layers: list[int],
    batch_seconds: float | None = None,
    num_jobs: int | None = None,
    progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(utterance id, outputs of Transformer layers ``layers`` (1-based) [frames, len(layers), hidden])
    per utterance of ``corpus`` at ``indices``; ``num_jobs`` loading workers (None: the device's default)."""
    adapter.check_geometry(corpus.geometry)
    if not indices:  # nothing to run (and no empty progress bar)
        return
    blocks = adapter.family.encoder_layers(adapter.backbone)
    if not layers:
        raise ModelError("no layers asked for")
    bad = [n for n in layers if not 1 <= n <= len(blocks)]
    if bad:
        raise ModelError(f"{adapter.source} has layers 1..{len(blocks)}; no layer {bad[0]}")
    batches = plan_batches(corpus, indices, batch_seconds or default_batch_seconds(adapter.device), None)
    data = BatchDataset(corpus, batches, adapter.feature_extractor, "all", LabelSpace.of_corpus(corpus, ("phone",)))
    workers = default_num_jobs(adapter.device) if num_jobs is None else num_jobs
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
    captured: dict[int, torch.Tensor] = {}
    top = max(layers)
    left = Counter(corpus.records[p.index]["id"] for batch in batches for p in batch)  # pieces per utterance
    pieces: dict[str, list[torch.Tensor]] = {}  # an utterance's windows so far (a windowed model's), in order

    def capture(layer: int):
        def hook(module, inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == top:
                raise _Captured  # the layers above are not needed

        return hook

    hooks = [blocks[n - 1].register_forward_hook(capture(n)) for n in sorted(set(layers))]
    name = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers'"
    bar = tqdm(total=len(indices), unit="utt", desc=f"{name} features", disable=not progress)
    try:
        for item in loader:
            if item["changed"]:
                raise AudioChangedError(item["changed"][0])
            for err in item["errors"]:
                raise LabelSetError(f"{err['file']}: {err['message']}")
            captured.clear()
            try:
                adapter.encode(item["waves"], item["lengths"])
            except _Captured:
                pass
            stacked = torch.stack([captured[n] for n in layers], 2)
            for b, (utt, samples) in enumerate(zip(item["ids"], item["lengths"].tolist())):
                pieces.setdefault(utt, []).append(stacked[b, : corpus.geometry.num_frames(samples)].float())
                if len(pieces[utt]) == left[utt]:
                    yield utt, torch.cat(pieces.pop(utt))
                    bar.update(1)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
