"""Batching: utterance pieces, batch plans, the data-loading dataset and the token batches.

The dataset runs in DataLoader workers (FLAC decoding, waveform normalisation, frame labels, token
selection, label compaction), so the device never waits on per-frame Python work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..corpus.audio import Skip
from ..corpus.prepared import AudioChangedError, PreparedCorpus
from ..labelspace import LabelSpace
from ..model.inputs import normalize_waveform
from ..phones import NON_SPEECH
from .tokens import token_mask

FRAME_BITS = 32
"""A token's frame id is ``corpus utterance index << FRAME_BITS | frame``: unique in a corpus, ordered."""

_EXACT_FP32 = 2**24
CHUNK_ROWS = 32
"""Rows of one same-label chunk in the ``label_stats`` work list."""


def chunk_tokens(rows: torch.Tensor, labels: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, ...]:
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
        frames, each frame's id (default: its position in the batch).  One stable sort of the tokens by
        label gives the compacted labels and the work lists (what :func:`chunk_tokens` gives, in numpy)."""
        is_token = flat >= 0
        index = np.flatnonzero(is_token)
        n = len(index)
        if n >= _EXACT_FP32:
            raise ValueError(f"{n} tokens in one batch: use smaller batches (fp32 counts are exact below 2**24)")
        tokens = flat[index].astype(np.int64, copy=False)
        order = np.argsort(tokens, kind="stable")
        ordered = tokens[order]
        first = np.ones(n, dtype=bool)
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
        run_starts = np.flatnonzero(first)
        sorted_local = np.cumsum(first) - 1
        local = np.empty(n, dtype=np.int64)
        local[order] = sorted_local
        chunks = np.flatnonzero(first | ((np.arange(n) - run_starts[sorted_local]) % CHUNK_ROWS == 0))
        sorted_rows = index[order].astype(np.int32)
        int32 = lambda a: torch.from_numpy(a.astype(np.int32))  # noqa: E731
        return cls(
            torch.from_numpy(index),
            torch.from_numpy(local),
            torch.from_numpy(ordered[run_starts]),
            torch.from_numpy(np.diff(run_starts, append=n)),
            torch.from_numpy(sorted_rows),
            int32(np.append(chunks, n)),
            int32(sorted_local[chunks]),
            torch.from_numpy(np.concatenate([sorted_rows, np.flatnonzero(~is_token).astype(np.int32)])),
            int32(sorted_local),
            int32(order),
            torch.from_numpy(np.ascontiguousarray(index if frame_ids is None else frame_ids[index], dtype=np.int64)),
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


def plan_batches(
    corpus: PreparedCorpus, indices: list[int], batch_seconds: float, max_seconds: float | None
) -> list[list[Piece]]:
    """Pieces bucketed by length into batches whose padded size (pieces × the longest) is at most
    ``batch_seconds`` of audio (a longer piece gets a batch of its own).  A model of fixed windows (Whisper)
    gets one piece per window of each utterance, each padded to the window."""
    if not batch_seconds > 0:
        raise ValueError(f"--batch-seconds must be positive, got {batch_seconds}")
    geo = corpus.geometry
    pieces = []
    for i in indices:
        n = corpus.records[i]["num_samples"]
        if geo.window:
            pieces.extend(Piece(i, s, min(geo.window, n - s), s // geo.stride) for s in range(0, n, geo.window))
            continue
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
        if current and (len(current) + 1) * (geo.window or current[0].num_samples) > budget:
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
        padded += len(frames) * (geo.window_frames or max(frames))
    return 1 - real / padded if padded else 0.0


def in_place_normalizer(feature_extractor) -> Callable[[np.ndarray], None]:
    """A function that normalises a float32 waveform in place exactly as
    :func:`~neurostat.model.inputs.normalize_waveform` does, bit for bit: for the wav2vec2 family's
    feature extractor its zero-mean unit-variance normalisation (``(x - mean) / sqrt(var + 1e-7)`` in
    float32, the same numpy reductions) without its copies, else the feature extractor itself."""
    from transformers import Wav2Vec2FeatureExtractor as W2V

    fe, cls = feature_extractor, type(feature_extractor)
    if not (
        isinstance(fe, W2V)
        and cls.__call__ is W2V.__call__
        and cls.zero_mean_unit_var_norm is W2V.zero_mean_unit_var_norm
    ):
        return lambda wave: wave.__setitem__(slice(None), normalize_waveform(fe, wave))
    return _ZeroMeanUnitVar() if fe.do_normalize else lambda wave: None


class _ZeroMeanUnitVar:
    """``(x - x.mean()) / np.sqrt(x.var() + 1e-7)`` in place, computed as numpy computes ``mean`` and ``var``:
    float32 pairwise sums (of the samples; of the squared deviations from that mean) divided in float64
    and rounded to float32 (the squares go to a scratch buffer kept between calls)."""

    def __init__(self):
        self.scratch = np.empty(0, dtype=np.float32)

    def __call__(self, wave: np.ndarray) -> None:
        if len(self.scratch) < len(wave):
            self.scratch = np.empty(len(wave), dtype=np.float32)
        n = len(wave)
        np.subtract(wave, np.float32(np.float64(np.add.reduce(wave)) / n), out=wave)
        var = np.float32(np.float64(np.add.reduce(np.square(wave, out=self.scratch[:n]))) / n)
        np.divide(wave, np.sqrt(var + 1e-7), out=wave)


class BatchDataset(torch.utils.data.Dataset):
    """Item i = batch i, built in a worker: the normalised waveforms in one zero-padded [B, L] float32
    tensor with their lengths, and the batch's token labels.  Each file is decoded straight into its row of
    the batch and normalised there (a piece of a cut utterance is copied from its normalised whole); the
    frame labels are slices of the corpus's memory-mapped arrays.  An audio file whose content changed after
    prepare is no skip: ``changed`` carries its error for the loop to raise (a worker's exception would
    reach it wrapped in a traceback)."""

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
        self.normalize = in_place_normalizer(feature_extractor)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        pieces = self.batches[i]
        waves = np.zeros((len(pieces), max(p.num_samples for p in pieces)), dtype=np.float32)
        rows, errors, changed, failed, decoded = [], [], [], set(), {}
        for b, piece in enumerate(pieces):
            utt = self.corpus[piece.index]
            if utt.id in failed:
                continue
            try:
                self._fill(utt, piece, waves[b], decoded)
                rows.append(b)
            except Skip as s:
                errors.append({"id": utt.id, "reason": s.reason, "file": s.path, "message": s.message})
                failed.add(utt.id)
            except AudioChangedError as e:
                changed.append(str(e))
                failed.add(utt.id)
        if len(rows) < len(pieces):  # a failed file: its rows go, the batch shrinks to what is left
            pieces = [pieces[b] for b in rows]
            waves = waves[rows, : max((p.num_samples for p in pieces), default=0)]
        labels = self._token_labels(pieces, decoded)
        tokens, frame_ids = _frame_labels(pieces, labels, self.corpus.geometry.window_frames)
        return {
            "ids": [self.corpus.records[p.index]["id"] for p in self.batches[i]],
            "waves": torch.from_numpy(waves),
            "lengths": torch.tensor([p.num_samples for p in pieces], dtype=torch.int64),
            "tokens": TokenBatch.from_labels(tokens.reshape(-1), frame_ids.reshape(-1)),
            "frames": int(sum(len(lab) for lab in labels)),
            "padded_frames": int(tokens.size),
            "samples": int(sum(p.num_samples for p in pieces)),
            "errors": errors,
            "changed": changed,
        }

    def _fill(self, utt, piece: Piece, row: np.ndarray, decoded: dict) -> None:
        """Writes the piece's normalised samples into ``row``: a whole utterance decoded there, a piece copied
        from its utterance (decoded once per batch); ``decoded`` gets the utterance with its labels of the
        parts other than phone and pitch bin (which may be a Skip: no label in a set)."""
        n = utt.record["num_samples"]
        if utt.id not in decoded:
            wave = utt.load_audio(out=row[:n] if piece.num_samples == n else np.empty(n, dtype=np.float32))
            if len(wave) != n:
                raise Skip(
                    "audio-changed", utt.audio_path, f"has {len(wave)} samples, prepared with {n}; re-run prepare"
                )
            self.normalize(wave)
            parts = {p: utt.part_labels(p) for p in self.space.parts if p not in ("phone", "pitch_bin")}
            decoded[utt.id] = (utt, None if piece.num_samples == n else wave, parts)
        wave = decoded[utt.id][1]
        if wave is not None:
            row[: piece.num_samples] = wave[piece.sample_start : piece.sample_start + piece.num_samples]

    def _token_labels(self, pieces: list[Piece], decoded: dict) -> list[np.ndarray]:
        """Each piece's joint label per frame (−1: no token), computed for all the batch's utterances at once
        on their frame labels concatenated."""
        if not pieces:
            return []
        utts = [decoded[self.corpus.records[p.index]["id"]][0] for p in pieces]
        utts = list({u.id: u for u in utts}.values())
        frames = [u.frames for u in utts]
        counts = np.array([len(f) for f in frames], dtype=np.int64)
        starts = np.cumsum(counts) - counts
        phones = np.concatenate([f["phone"] for f in frames]).astype(np.int64)
        keep = token_mask(phones, self.tokens, self.non_speech, self.drop_final_run, starts)
        parts = {}
        for part in self.space.parts:
            if part == "phone":
                parts[part] = phones
            elif part == "pitch_bin":
                parts[part] = np.concatenate([f["pitch_bin"] for f in frames])
            else:
                parts[part] = np.concatenate(
                    [np.broadcast_to(decoded[u.id][2][part], (c,)) for u, c in zip(utts, counts)]
                )
        joint = np.where(keep, self.space.encode(parts), -1)
        first = {u.id: int(s) for u, s in zip(utts, starts)}
        geo = self.corpus.geometry
        out = []
        for p in pieces:
            start = first[self.corpus.records[p.index]["id"]] + p.frame_start
            out.append(joint[start : start + geo.num_frames(p.num_samples)])
        return out


def _frame_labels(pieces: list[Piece], labels: list[np.ndarray], frames: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The pieces' token labels padded into [B, T] (−1: no token) and each frame's id (see FRAME_BITS); T is
    the longest piece's frames, or ``frames`` (a model's fixed window) when given."""
    longest = frames or max((len(lab) for lab in labels), default=0)
    tokens = np.full((len(labels), longest), -1, dtype=np.int64)
    frame_ids = np.full((len(labels), longest), -1, dtype=np.int64)
    for b, (lab, piece) in enumerate(zip(labels, pieces)):
        tokens[b, : len(lab)] = lab
        frame_ids[b, : len(lab)] = (piece.index << FRAME_BITS) + piece.frame_start + np.arange(len(lab))
    return tokens, frame_ids
