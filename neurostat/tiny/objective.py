"""The demo model's pre-training objective, kept beside the model so it can be evaluated on held-out speech.

HuBERT's first iteration: each model frame's target is the k-means cluster of its MFCCs (the
:class:`Codebook`), masked frames are predicted by the :class:`Head`.  Both are saved in
``head.safetensors`` next to the shipped weights; :func:`evaluate_held_out` scores the model's masked
prediction on utterances it never heard against the two baselines a reader needs to judge the number:
always predicting the cluster most frequent in training, and copying the target of the nearest frame
that was not masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from ..cluster.kmeans import assign
from ..frames import FrameGeometry
from .mfcc import mfcc

HEAD_FILE = "head.safetensors"


class Head(nn.Module):
    """HuBERT's prediction head: cosine between a projection of the output and one embedding per cluster."""

    def __init__(self, hidden: int, projection: int, clusters: int, temperature: float):
        super().__init__()
        self.proj = nn.Linear(hidden, projection)
        self.embeddings = nn.Parameter(torch.randn(clusters, projection) * 0.1)
        self.temperature = temperature

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(h), dim=-1) @ F.normalize(self.embeddings, dim=-1).T / self.temperature


def span_mask(batch: int, frames: int, prob: float, span: int, generator: torch.Generator) -> torch.Tensor:
    """Bool [batch, frames]: ``prob * frames / span`` random spans of ``span`` frames per row (may overlap)."""
    count = max(1, int(prob * frames / span + torch.rand(1, generator=generator).item()))
    starts = torch.randint(0, max(1, frames - span + 1), (batch, count), generator=generator)
    idx = (starts[..., None] + torch.arange(span)).clamp_max(frames - 1).reshape(batch, -1)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def cluster_ids(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The nearest centroid of each standardised MFCC frame: the training target."""
    return assign((features - mean) / std, centroids)[0]


@dataclass
class Codebook:
    """The targets: MFCC standardisation, k-means centroids, and how often each cluster was a training target."""

    centroids: torch.Tensor  # [clusters, 3 * ceps]
    mean: torch.Tensor  # [3 * ceps]
    std: torch.Tensor  # [3 * ceps]
    counts: torch.Tensor  # [clusters], int64

    def targets(self, features: torch.Tensor) -> torch.Tensor:
        """The cluster id of each MFCC frame."""
        return cluster_ids(features, self.mean, self.std, self.centroids)


def frame_features(wave: torch.Tensor, rate: int, geometry: FrameGeometry) -> torch.Tensor:
    """MFCCs at the model's frames (fewer than the model's frames where the wave is shorter than one window)."""
    return mfcc(wave, rate, geometry.receptive_field, geometry.stride)[: geometry.num_frames(len(wave))]


def normalized(wave: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance: what the model's feature extractor does to its input."""
    return (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)


def save_head(folder: str | Path, head: Head, codebook: Codebook) -> Path:
    """Writes the head and the codebook to ``folder``/head.safetensors (fp32)."""
    from safetensors.torch import save_file

    path = Path(folder) / HEAD_FILE
    tensors = {
        "proj.weight": head.proj.weight,
        "proj.bias": head.proj.bias,
        "embeddings": head.embeddings,
        "codebook.centroids": codebook.centroids,
        "codebook.mean": codebook.mean,
        "codebook.std": codebook.std,
        "codebook.counts": codebook.counts,
    }
    save_file(
        {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"temperature": repr(head.temperature)},
    )
    return path


def load_head(folder: str | Path) -> tuple[Head, Codebook]:
    """The head and codebook saved beside a model by :func:`save_head`; a clear error where there are none."""
    from safetensors import safe_open

    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no prediction head beside this model (only models trained by bench/train_tiny_ssl.py have one)"
        )
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        temperature = float(f.metadata()["temperature"])
    projection, hidden = t["proj.weight"].shape
    head = Head(hidden, projection, len(t["embeddings"]), temperature)
    head.load_state_dict({"proj.weight": t["proj.weight"], "proj.bias": t["proj.bias"], "embeddings": t["embeddings"]})
    codebook = Codebook(t["codebook.centroids"], t["codebook.mean"], t["codebook.std"], t["codebook.counts"])
    return head.eval(), codebook


@dataclass
class HeldOutScore:
    """Masked-prediction accuracy on held-out utterances, and the baselines on the same masked frames."""

    utterances: int
    masked_frames: int
    accuracy: float
    most_frequent: float  # always the cluster most frequent among the training targets
    copy_nearest: float  # the target of the nearest unmasked frame of the same utterance (the left one on a tie)
    chance: float  # 1 / clusters


def nearest_unmasked(mask: torch.Tensor) -> torch.Tensor:
    """For a bool [frames] mask with at least one False: the index of the nearest unmasked frame of each
    frame (the earlier one on a tie)."""
    kept = torch.nonzero(~mask).squeeze(1)
    distance = (torch.arange(len(mask))[:, None] - kept[None, :]).abs()
    return kept[distance.argmin(1)]  # argmin returns the first minimum: the earlier frame


@torch.no_grad()
def evaluate_held_out(
    model: nn.Module,
    head: Head,
    codebook: Codebook,
    root: str | Path,
    geometry: FrameGeometry,
    mask_prob: float,
    mask_span: int,
    seed: int = 0,
) -> HeldOutScore:
    """Masks every utterance under ``root`` (FLAC files) as in training (one seeded generator) and scores
    the model's predictions of the masked frames' clusters, whole utterances one at a time."""
    files = sorted(Path(root).rglob("*.flac"))
    if not files:
        raise FileNotFoundError(f"{root}: no FLAC files to evaluate on")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    frequent = int(codebook.counts.argmax())
    hits = torch.zeros(3, dtype=torch.long)
    used, masked = 0, 0
    for path in files:
        wave, rate = sf.read(path, dtype="float32")
        x = torch.from_numpy(wave)
        frames = geometry.num_frames(len(x))
        features = frame_features(x, rate, geometry)
        if frames < 2 * mask_span or len(features) < frames:
            continue
        targets = codebook.targets(features)
        mask = span_mask(1, frames, mask_prob, mask_span, g)[0]
        mask[0] &= not bool(mask.all())  # keep a frame to copy from
        hidden = model(normalized(x)[None], mask_time_indices=mask[None]).last_hidden_state[0]
        truth = targets[mask]
        hits += torch.stack(
            [
                (head(hidden[mask]).argmax(1) == truth).sum(),
                (truth == frequent).sum(),
                (targets[nearest_unmasked(mask)][mask] == truth).sum(),
            ]
        )
        used, masked = used + 1, masked + int(mask.sum())
    if not masked:
        raise ValueError(f"{root}: no utterance of at least {2 * mask_span} frames to evaluate on")
    accuracy, most_frequent, copy_nearest = (hits.double() / masked).tolist()
    return HeldOutScore(used, masked, accuracy, most_frequent, copy_nearest, 1 / len(codebook.counts))
