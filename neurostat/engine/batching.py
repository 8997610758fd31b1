"""Batching: utterance pieces, batch plans, the data-loading dataset and the token batches.

The dataset runs in DataLoader workers (FLAC decoding, waveform normalisation, frame labels, token
selection, label compaction), so the device never waits on per-frame Python work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..corpus.audio import Skip
from ..corpus.prepared import AudioChangedError, PreparedCorpus
from ..labelspace import LabelSpace
from ..model.adapter import normalize_waveform
from ..phones import NON_SPEECH
from .tokens import token_mask

FRAME_BITS = 32
"""A token's frame id is ``corpus utterance index << FRAME_BITS | frame``: unique in a corpus, ordered."""

_EXACT_FP32 = 2**24


def chunk_tokens(rows: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 32) -> tuple[torch.Tensor, ...]:
    """Sorts token rows by label and cuts them into same-label chunks of at most ``chunk_rows`` rows.

    Returns (sorted rows int32 [N], their labels int32 [N], chunk starts int32 [C + 1], chunk labels
    int32 [C]): the work list of the ``label_stats`` kernels, in their argument order, built on the host.
    """
    order = torch.argsort(labels, stable=True)
    rows, labels = rows[order], labels[order]
    n = labels.numel()
    new_label = torch.ones(n, dtype=torch.bool)
    if n:
        new_label[1:] = labels[1:] != labels[:-1]
    run_start = torch.nonzero(new_label).flatten()
    position = torch.arange(n) - run_start[torch.cumsum(new_label.long(), 0) - 1]
    starts = torch.nonzero(new_label | (position % chunk_rows == 0)).flatten()
    bounds = torch.cat([starts, torch.tensor([n])]).to(torch.int32)
    labels = labels.to(torch.int32)
    return rows.to(torch.int32), labels, bounds, labels[starts]


_FIELDS = (
    "index",
    "local",
    "labels",
    "counts",
    "sorted_rows",
    "chunk_starts",
    "chunk_labels",
    "perm",
    "sorted_local",
    "sorted_tokens",
    "frame_ids",
)


@dataclass
class TokenBatch:
    """The tokens of one batch: positions in the flattened [B*T] activations and compacted labels."""

    index: torch.Tensor  # (N,) int64: positions b * T + t
    local: torch.Tensor  # (N,) int64: position of each token's label in ``labels``
    labels: torch.Tensor  # (U,) int64: the distinct joint labels of the batch
    counts: torch.Tensor  # (U,) int64: tokens per label
    sorted_rows: torch.Tensor  # (N,) int32: token positions sorted by label (Triton work list)
    chunk_starts: torch.Tensor  # (C + 1,) int32
    chunk_labels: torch.Tensor  # (C,) int32: local label of each chunk
    perm: torch.Tensor  # (B*T,) int32: sorted token rows, then every other row (fused GEMM order)
    sorted_local: torch.Tensor  # (N,) int32: local label of each sorted token row
    sorted_tokens: torch.Tensor  # (N,) int32: the sorted token rows as positions among the tokens
    frame_ids: torch.Tensor  # (N,) int64: each token's frame id (utterance index << 32 | frame), for top frames

    @classmethod
    def from_labels(cls, flat: np.ndarray, frame_ids: np.ndarray | None = None) -> "TokenBatch":
        """From the flattened per-frame joint labels of a padded batch (−1 = not a token) and, for the top
        frames, each frame's id (default: its position in the batch)."""
        index = np.flatnonzero(flat >= 0)
        labels, local, counts = np.unique(flat[index], return_inverse=True, return_counts=True)
        if len(index) >= _EXACT_FP32:
            raise ValueError(
                f"{len(index)} tokens in one batch: use smaller batches (fp32 counts are exact below 2**24)"
            )
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        index, local = t(index), t(local)
        sorted_tokens, sorted_local, starts, chunk_labels = chunk_tokens(torch.arange(len(index)), local)
        sorted_rows = index[sorted_tokens.long()].to(torch.int32)
        others = torch.from_numpy(np.flatnonzero(flat < 0).astype(np.int32))
        return cls(
            index,
            local,
            t(labels),
            t(counts),
            sorted_rows,
            starts,
            chunk_labels,
            torch.cat([sorted_rows, others]),
            sorted_local,
            sorted_tokens,
            t(index if frame_ids is None else frame_ids[index]),
        )

    @property
    def num_tokens(self) -> int:
        return self.index.numel()

    def token_rows(self) -> "TokenBatch":
        """The same tokens for a matrix that holds only the token rows, in ``index`` order."""
        index = torch.arange(self.num_tokens, device=self.index.device)
        fields = {f: getattr(self, f) for f in _FIELDS}
        return TokenBatch(**{**fields, "index": index, "sorted_rows": self.sorted_tokens, "perm": self.sorted_tokens})

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor of the batch (what a side stream that reads the batch must keep alive)."""
        return tuple(getattr(self, f) for f in _FIELDS)

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f).to(device, non_blocking=True) for f in _FIELDS))

    def pin_memory(self) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f).pin_memory() for f in _FIELDS))


@dataclass
class Piece:
    """An utterance, or one piece of it when ``max_seconds`` cuts it, in samples and frames."""

    index: int
    sample_start: int
    num_samples: int
    frame_start: int


def default_batch_seconds(device: torch.device | str) -> float:
    """Padded audio per batch: 160 s on a GPU (it needs large batches), 20 s on a CPU (large batches
    thrash its caches: 160 s made collect 1.45-1.85x its forward on 2 cores, 20 s about 1.2x)."""
    return 160.0 if torch.device(device).type == "cuda" else 20.0


def plan_batches(
    corpus: PreparedCorpus, indices: list[int], batch_seconds: float, max_seconds: float | None
) -> list[list[Piece]]:
    """Pieces bucketed by length into batches whose padded size (pieces × the longest) is at most
    ``batch_seconds`` of audio (a longer piece gets a batch of its own)."""
    if not batch_seconds > 0:
        raise ValueError(f"--batch-seconds must be positive, got {batch_seconds}")
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
    batches, current = [], []
    for p in pieces:  # longest first: a batch's first piece sets its padded length
        if current and (len(current) + 1) * current[0].num_samples > budget:
            batches.append(current)
            current = []
        current.append(p)
    if current:
        batches.append(current)
    return batches


def padding_fraction(corpus: PreparedCorpus, batches: list[list[Piece]]) -> float:
    """The share of padded model frames in the planned batches (frames computed for nothing)."""
    geo = corpus.geometry
    real = padded = 0
    for batch in batches:
        frames = [geo.num_frames(p.num_samples) for p in batch]
        real += sum(frames)
        padded += len(frames) * max(frames)
    return 1 - real / padded if padded else 0.0


class BatchDataset(torch.utils.data.Dataset):
    """Item i = batch i, built in a worker: the normalised waveforms zero-padded into one [B, L] tensor
    with their lengths, and the batch's token labels.  An audio file whose content changed after prepare
    is no skip: ``changed`` carries its error for the loop to raise (a worker's exception would reach it
    wrapped in a traceback)."""

    def __init__(
        self,
        corpus: PreparedCorpus,
        batches: list[list[Piece]],
        feature_extractor,
        tokens: str,
        space: LabelSpace,
        drop_final_run: bool = False,
    ):
        self.corpus, self.batches, self.fe, self.tokens, self.space = corpus, batches, feature_extractor, tokens, space
        self.drop_final_run = drop_final_run
        self.non_speech = [corpus.phones.index(p) for p in NON_SPEECH if p in corpus.phones]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        waves, labels, errors, changed, ids, kept, cache = [], [], [], [], [], [], {}
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
                except AudioChangedError as e:
                    changed.append(str(e))
                    cache[utt.id] = None
            if cache[utt.id] is None:
                continue
            wave, joint = cache[utt.id]
            chunk = wave[piece.sample_start : piece.sample_start + piece.num_samples]
            waves.append(torch.from_numpy(np.ascontiguousarray(chunk)))
            labels.append(joint[piece.frame_start : piece.frame_start + geo.num_frames(len(chunk))])
            kept.append(piece)
        longest = max((len(lab) for lab in labels), default=0)
        flat = np.full((len(labels), longest), -1, dtype=np.int64)
        frame_ids = np.full((len(labels), longest), -1, dtype=np.int64)
        for b, (lab, piece) in enumerate(zip(labels, kept)):
            flat[b, : len(lab)] = lab
            frame_ids[b, : len(lab)] = (piece.index << FRAME_BITS) + piece.frame_start + np.arange(len(lab))
        return {
            "ids": ids,
            "waves": torch.nn.utils.rnn.pad_sequence(waves, batch_first=True) if waves else torch.zeros(0, 0),
            "lengths": torch.tensor([len(w) for w in waves], dtype=torch.int64),
            "tokens": TokenBatch.from_labels(flat.reshape(-1), frame_ids.reshape(-1)),
            "frames": int(sum(len(lab) for lab in labels)),
            "padded_frames": int(flat.size),
            "samples": int(sum(len(w) for w in waves)),
            "errors": errors,
            "changed": changed,
        }

    def _labelled(self, utt) -> tuple[np.ndarray, np.ndarray]:
        wave = utt.load_audio()
        if len(wave) != utt.record["num_samples"]:
            raise Skip(
                "audio-changed",
                utt.audio_path,
                f"has {len(wave)} samples, prepared with {utt.record['num_samples']}; re-run prepare",
            )
        keep = token_mask(utt.phone_frames(), self.tokens, self.non_speech, self.drop_final_run)
        joint = np.where(keep, self.space.joint_frames(utt), -1)
        return normalize_waveform(self.fe, wave), joint
