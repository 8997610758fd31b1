"""The collection loop: one pass over a prepared corpus → every statistic of every chosen layer.

Data loading (FLAC decoding, normalisation, frame labels, token selection, label compaction) runs in
``-j`` DataLoader workers, so the device never waits on per-frame Python work; on the device the
activations of the token frames feed the accumulator inside the FFN forward and are never kept.
Checkpoints are written every ``checkpoint_seconds`` (or ``checkpoint_utterances``) so a crashed or
killed run resumes with counts identical to an uninterrupted one, losing at most one interval; SIGINT
(Ctrl-C) or SIGTERM stops at the next batch boundary after a checkpoint, losing nothing.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..corpus.audio import Skip
from ..corpus.prepared import PreparedCorpus
from ..labels.joint import LabelSpace
from ..phones import NON_SPEECH
from ..store import FORMAT as STORE_FORMAT, StoreWriter
from .accumulate import BACKENDS, STATS, Accumulator, TokenBatch
from .adapter import ModelAdapter, ModelError
from .tokens import MODES, token_mask


@dataclass
class CollectConfig:
    stats: tuple[str, ...] = STATS
    topk_ratio: float = 0.01
    tokens: str = "phone-mid"
    layers: list[int] | None = None  # 0-based; None = all
    batch_seconds: float = 160.0
    max_seconds: float | None = None
    checkpoint_seconds: float = 300.0
    checkpoint_utterances: int | None = None
    shard: tuple[int, int] = (0, 1)
    num_jobs: int = 0
    backend: str = "auto"
    labels: tuple[str, ...] | None = None  # label parts of the joint label; None = every part of the corpus
    command: str = field(default_factory=lambda: " ".join(sys.argv))


@dataclass
class Piece:
    """An utterance, or one piece of it when ``max_seconds`` cuts it, in samples and frames."""

    index: int
    sample_start: int
    num_samples: int
    frame_start: int


class BatchDataset(torch.utils.data.Dataset):
    """Item i = batch i: normalised waveforms and the batch's token labels (built in workers)."""

    def __init__(
        self, corpus: PreparedCorpus, batches: list[list[Piece]], feature_extractor, tokens: str, space: LabelSpace
    ):
        self.corpus, self.batches, self.fe, self.tokens, self.space = corpus, batches, feature_extractor, tokens, space
        self.non_speech = [corpus.phones.index(p) for p in NON_SPEECH if p in corpus.phones]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        waves, labels, errors, ids, cache = [], [], [], [], {}
        geo = self.corpus.geometry
        for piece in self.batches[i]:
            utt = self.corpus[piece.index]
            ids.append(utt.id)
            if utt.id not in cache:
                try:
                    cache[utt.id] = self._labelled(utt)
                except Skip as s:
                    errors.append({"id": utt.id, "reason": s.reason, "file": s.path, "message": s.message})
                    cache[utt.id] = None
            if cache[utt.id] is None:
                continue
            wave, joint = cache[utt.id]
            chunk = wave[piece.sample_start : piece.sample_start + piece.num_samples]
            waves.append(torch.from_numpy(np.ascontiguousarray(chunk)))
            labels.append(joint[piece.frame_start : piece.frame_start + geo.num_frames(len(chunk))])
        longest = max((len(lab) for lab in labels), default=0)
        flat = np.full((len(labels), longest), -1, dtype=np.int64)
        for b, lab in enumerate(labels):
            flat[b, : len(lab)] = lab
        return {
            "ids": ids,
            "waves": waves,
            "tokens": TokenBatch.from_labels(flat.reshape(-1)),
            "frames": int(sum(len(lab) for lab in labels)),
            "samples": int(sum(len(w) for w in waves)),
            "errors": errors,
        }

    def _labelled(self, utt) -> tuple[np.ndarray, np.ndarray]:
        wave = utt.load_audio()
        if len(wave) != utt.record["num_samples"]:
            raise Skip(
                "audio-changed",
                utt.audio_path,
                f"has {len(wave)} samples, prepared with {utt.record['num_samples']}; re-run prepare",
            )
        phones = utt.phone_frames()
        keep = token_mask(phones, self.tokens, self.non_speech)
        joint = np.where(keep, utt.joint_frames(self.space), -1)
        return self.fe(wave, sampling_rate=self.fe.sampling_rate, return_tensors="np").input_values[0].astype(
            np.float32
        ), joint


class CollectInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run at a batch boundary, after a checkpoint."""


@contextmanager
def _stop_requests() -> Iterator[list[str]]:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current batch (the list gets the
    signal's name); a second SIGINT interrupts at once."""
    requests: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def handler(signum, frame):
        if requests and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requests.append(signal.Signals(signum).name)
        tqdm.write(f"{requests[-1]}: stopping after this batch (Ctrl-C again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def plan_batches(
    corpus: PreparedCorpus, indices: list[int], batch_seconds: float, max_seconds: float | None
) -> list[list[Piece]]:
    """Pieces grouped into batches of at most ``batch_seconds`` of audio, similar lengths together."""
    geo = corpus.geometry
    pieces = []
    for i in indices:
        n = corpus.records[i]["num_samples"]
        if max_seconds is None:
            pieces.append(Piece(i, 0, n, 0))
            continue
        frames_per_piece = max(1, int(max_seconds * geo.sample_rate) // geo.stride)
        step = frames_per_piece * geo.stride
        span = step + geo.receptive_field - geo.stride
        for start in range(0, n, step):
            if geo.num_frames(min(span, n - start)) > 0:
                pieces.append(Piece(i, start, min(span, n - start), start // geo.stride))
    pieces.sort(key=lambda p: (-p.num_samples, corpus.records[p.index]["id"], p.sample_start))
    budget = batch_seconds * geo.sample_rate
    batches, current, size = [], [], 0
    for p in pieces:
        if current and size + p.num_samples > budget:
            batches.append(current)
            current, size = [], 0
        current.append(p)
        size += p.num_samples
    if current:
        batches.append(current)
    return batches


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → Triton on CUDA, torch elsewhere; Triton off CUDA only under ``TRITON_INTERPRET=1``."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend.startswith("triton") and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--backend triton needs a CUDA device (or TRITON_INTERPRET=1, the slow CPU interpreter)")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose auto or one of {BACKENDS}")
    return backend


def label_space(corpus: PreparedCorpus, parts: tuple[str, ...] | None) -> LabelSpace:
    """The joint label space over ``parts`` of the corpus (all of them when None)."""
    if parts is None:
        return corpus.label_space
    if not parts or len(set(parts)) != len(parts):
        raise ValueError(f"--labels needs distinct label parts, got {','.join(parts) or 'none'}")
    unknown = [p for p in parts if p not in corpus.label_space.parts]
    if unknown:
        raise ValueError(
            f"{corpus.path} has no label part {', '.join(unknown)}; its parts are "
            f"{', '.join(corpus.label_space.parts)} (attach more with `neurostat labels add` or `neurostat cluster`)"
        )
    return corpus.label_space.subspace(parts)


def _check_state_size(num_layers: int, space: LabelSpace, width: int, stats: tuple[str, ...], device) -> None:
    """Refuses a joint label space whose dense state would not fit in the device's free memory."""
    per_cell = 8 * (("topk" in stats) + ("positive" in stats) + 2 * ("moments" in stats))
    need = num_layers * space.size * width * per_cell
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.7 * free:
        shape = " × ".join(f"{len(space.vocab(p))} {p}" for p in space.parts)
        raise ValueError(
            f"the joint label space ({shape} = {space.size} labels) needs {need / 2**30:.1f} GiB of state for "
            f"{num_layers} layers × {width} neurons, more than the {free / 2**30:.1f} GiB free on {device}; "
            f"choose fewer label parts with --labels, fewer --layers or fewer --stat"
        )


def _versions() -> dict:
    import transformers
    import zarr

    return {
        "neurostat": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def collect(
    corpus: PreparedCorpus,
    adapter: ModelAdapter,
    out,
    config: CollectConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Runs the pass and writes the store at ``out``; returns the run summary."""
    if adapter.geometry != corpus.geometry:
        raise ModelError(
            f"{adapter.source}: frame geometry {adapter.geometry.describe()} differs from the prepared corpus "
            f"({corpus.geometry.describe()}); re-run prepare with --model {adapter.source}"
        )
    if config.tokens not in MODES:
        raise ValueError(f"unknown token mode {config.tokens!r}; choose one of {MODES}")
    config.backend = resolve_backend(config.backend, adapter.device)
    if config.backend == "triton-fused":
        from ..kernels.ffn_up_stats import ACTIVATIONS

        if str(adapter.config.hidden_act) not in ACTIVATIONS:
            raise ModelError(
                f"{adapter.source}: activation {adapter.config.hidden_act!r} has no fused kernel; use --backend triton"
            )
    layers = list(range(adapter.num_layers)) if config.layers is None else sorted(set(config.layers))
    bad = [i + 1 for i in layers if not 0 <= i < adapter.num_layers]
    if bad:
        raise ModelError(f"{adapter.source} has layers 1..{adapter.num_layers}; no layer {bad}")
    width = adapter.width
    k = max(1, round(config.topk_ratio * width))
    space = label_space(corpus, config.labels)
    corpus.check_label_sets(space.parts)
    _check_state_size(len(layers), space, width, config.stats, adapter.device)
    shard_i, shard_n = config.shard
    indices = [i for i in range(len(corpus)) if i % shard_n == shard_i]

    fingerprint = {
        "model": adapter.source,
        "revision": adapter.revision,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "stats": list(config.stats),
        "topk_ratio": config.topk_ratio,
        "k": k,
        "tokens": config.tokens,
        "layers": [i + 1 for i in layers],
        "labels": space.to_dict(),
        "label_sets": {name: corpus.label_sets[name]["file"] for name in space.parts if name in corpus.label_sets},
        "pitch_edges": corpus.edges,
        "corpus": {
            "root": corpus.meta["root"],
            "subset": corpus.meta["subset"],
            "prepared": str(corpus.path.resolve()),
        },
        "shard": f"{shard_i}/{shard_n}",
        "max_seconds": config.max_seconds,
    }
    attrs = {
        "neurostat_store_format": STORE_FORMAT,
        "neurostat_version": __version__,
        "complete": False,
        "fingerprint": fingerprint,
        "model": adapter.describe(),
        "statistics": {
            "stats": list(config.stats),
            "topk_ratio": config.topk_ratio,
            "k": k,
            "tokens": config.tokens,
            "ties": "lower neuron index wins at the k-th |a|",
            "var_ddof": 0,
            "moments": "per-batch fp32 sums around a per-neuron shift, merged in float64 (Chan et al.)",
            "backend": config.backend,
        },
        "labels": space.to_dict(),
        "label_sets": {
            name: {k: v for k, v in entry.items() if k != "vocab"}
            for name, entry in corpus.label_sets.items()
            if name in space.parts
        },
        "pitch": corpus.meta["pitch"],
        "phone_map": corpus.meta["phone_map"],
        "corpus": {
            **fingerprint["corpus"],
            "utterances": len(indices),
            "shard": fingerprint["shard"],
            "prepare_skips": corpus.skips,
        },
        "batching": {
            "front_end": "per utterance",
            "transformer": "batched with a boolean frame mask",
            "max_seconds": config.max_seconds,
            "batch_seconds": config.batch_seconds,
        },
        "versions": _versions(),
        "command": config.command,
    }
    with StoreWriter(out, attrs, resume=resume, overwrite=overwrite) as store:
        return _run(corpus, adapter, store, config, space, layers, k, indices, attrs, progress)


def _run(corpus, adapter, store: StoreWriter, config, space: LabelSpace, layers, k, indices, attrs, progress) -> dict:
    if store.previous is not None and store.previous.get("complete"):
        return store.previous
    device = adapter.device
    act = str(adapter.config.hidden_act)
    acc = Accumulator(len(layers), space.size, adapter.width, k, config.stats, device, config.backend, act)
    done: list[str] = []
    prog = {"utterances_done": 0, "frames": 0, "tokens": 0, "audio_seconds": 0.0, "elapsed_seconds": 0.0, "skips": {}}
    checkpoint = store.load_checkpoint()
    if checkpoint is not None:
        state, done, prog = checkpoint
        acc = Accumulator.from_state(state, k, device, config.backend, act)
    finished = set(done)
    todo = [i for i in indices if corpus.records[i]["id"] not in finished]
    batches = plan_batches(corpus, todo, config.batch_seconds, config.max_seconds)
    pieces_left = Counter(corpus.records[p.index]["id"] for b in batches for p in b)  # done only with its last piece
    data = BatchDataset(corpus, batches, adapter.feature_extractor, config.tokens, space)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=config.num_jobs,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    position = {layer: i for i, layer in enumerate(layers)}
    current: dict = {}

    def activation(layer: int, ffn, hidden: torch.Tensor) -> torch.Tensor:
        return acc.ffn_activation(position[layer], ffn, hidden, current["tokens"])

    started, last_ckpt, since_ckpt = time.time(), time.time(), 0
    base_elapsed = prog["elapsed_seconds"]
    sr = corpus.geometry.sample_rate
    bar = tqdm(
        total=len(indices),
        initial=len(finished & {corpus.records[i]["id"] for i in indices}),
        unit="utt",
        desc="collect",
        disable=not progress,
        dynamic_ncols=True,
    )

    def save():
        prog["elapsed_seconds"] = base_elapsed + time.time() - started
        prog["utterances_done"] = len(done)
        store.save_checkpoint(acc.state_dict(), done, prog)

    with adapter.instrument(activation, layers), _stop_requests() as stop:
        for item in loader:
            for err in item["errors"]:
                prog["skips"][err["reason"]] = prog["skips"].get(err["reason"], 0) + 1
                tqdm.write(f"skipped {err['file']}: {err['message']}")
            batch = item["tokens"]
            if batch.num_tokens and item["waves"]:
                current["tokens"] = batch.to(device)
                adapter.encode(item["waves"])
                acc.add_frames(current["tokens"])
            for u in item["ids"]:
                pieces_left[u] -= 1
            new = [u for u in dict.fromkeys(item["ids"]) if pieces_left[u] == 0 and u not in finished]
            finished.update(new)
            done.extend(new)
            prog["frames"] += item["frames"]
            prog["tokens"] += batch.num_tokens
            prog["audio_seconds"] += item["samples"] / sr
            since_ckpt += len(new)
            elapsed = base_elapsed + time.time() - started
            bar.set_postfix_str(
                f"{prog['audio_seconds'] / 3600:.2f} h audio, {prog['frames'] / max(elapsed, 1e-9):,.0f} frames/s"
            )
            bar.update(len(new))
            if (
                config.checkpoint_utterances and since_ckpt >= config.checkpoint_utterances
            ) or time.time() - last_ckpt >= config.checkpoint_seconds:
                save()
                last_ckpt, since_ckpt = time.time(), 0
            if stop:
                save()
                bar.close()
                raise CollectInterrupted(
                    f"stopped by {stop[0]} after {len(done)} of {len(indices)} utterances; the checkpoint is saved: "
                    f"continue with `neurostat collect ... --resume`"
                )
    bar.close()
    prog["elapsed_seconds"] = prog["loop_seconds"] = base_elapsed + time.time() - started
    prog["utterances_done"] = len(done)
    arrays = acc.compute()
    coords = {"layer": np.asarray([i + 1 for i in layers], dtype=np.int64), **space.names()}
    final = {**attrs, "complete": True, "progress": {**prog, "utterances_total": len(indices), "complete": True}}
    store.finalize(arrays, coords, final, done)
    final["progress"]["elapsed_seconds"] = base_elapsed + time.time() - started
    store.update_attrs({"progress": final["progress"]})
    return final
