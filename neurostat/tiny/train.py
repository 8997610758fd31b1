"""Pre-training of the demo model: HuBERT's first iteration on a synthetic corpus, on CPU.

The targets are k-means cluster ids of MFCC features (with deltas) at the model's frame rate; the
model sees waveforms whose masked frames (spans of ``mask_span`` frames) are replaced by its learnt
mask embedding and predicts the cluster id of each masked frame from a scaled cosine between a
projection of its output and one embedding per cluster (HuBERT's logits).  All randomness comes from
one seeded generator (dropout is off), and a checkpoint every ``checkpoint_every`` steps lets a killed
run resume to the same weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from ..cluster.kmeans import kmeans
from ..corpus.synth import DEMO_VARIANTS, TRAINING_VARIANTS, synthesize
from ..frames import FrameGeometry
from ..model import factory
from ..model.inputs import waveform_geometry
from .objective import (
    HEAD_FILE,
    Codebook,
    Head,
    cluster_ids,
    evaluate_held_out,
    frame_features,
    normalized,
    save_head,
    span_mask,
)

SAMPLE_RATE = 16000
MODEL_CONFIG = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    conv_dim=(128,) * 7,
    num_conv_pos_embeddings=64,
    num_conv_pos_embedding_groups=16,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    final_dropout=0.0,
    layerdrop=0.0,
)


@dataclass
class TrainSettings:
    """Everything that decides the trained weights (saved beside them)."""

    seed: int = 0
    speakers: int = 48
    utterances_per_speaker: int = 40
    first_speaker: int = 100  # speaker ids disjoint from the demo corpus's
    clusters: int = 100
    kmeans_frames: int = 100_000
    steps: int = 2400
    batch: int = 8
    crop_seconds: float = 4.0
    lr: float = 5e-4
    warmup: float = 0.08
    weight_decay: float = 0.01
    mask_prob: float = 0.65
    mask_span: int = 10
    projection: int = 128
    temperature: float = 0.1
    checkpoint_every: int = 200
    config: dict = field(default_factory=lambda: dict(MODEL_CONFIG))

    @classmethod
    def small(cls, **overrides) -> "TrainSettings":
        """A run of seconds: the factory's tiny model on 2 speakers x 3 utterances (tests, smoke runs)."""
        base = dict(speakers=2, utterances_per_speaker=3, clusters=8, batch=2, crop_seconds=2.0, steps=6)
        return cls(**{**base, "config": dict(MODEL_CONFIG, **factory.TINY), **overrides})


def training_corpus(out: str | Path, settings: TrainSettings, progress: bool = True) -> Path:
    """Synthesises (once) the training corpus: only ``TRAINING_VARIANTS`` voices, so the default demo
    corpus speaks with voices the model never heard; returns its LibriSpeech root."""
    out = Path(out)
    root = out / "LibriSpeech"
    if not (root / "SPEAKERS.TXT").is_file():
        synthesize(
            out,
            "train-synthetic",
            settings.speakers,
            settings.utterances_per_speaker,
            seed=settings.seed,
            progress=progress,
            variants=TRAINING_VARIANTS,
            first_speaker=settings.first_speaker,
        )
    return root


def held_out_corpus(out: str | Path, settings: TrainSettings, progress: bool = True) -> Path:
    """Synthesises (once) the held-out corpus: ``DEMO_VARIANTS`` voices and speaker ids below the training
    corpus's, so neither was heard in training (for seed 0 it is the default demo corpus); returns its
    LibriSpeech root."""
    out = Path(out)
    root = out / "LibriSpeech"
    if not (root / "SPEAKERS.TXT").is_file():
        synthesize(out, "dev-clean", seed=settings.seed, progress=progress, variants=DEMO_VARIANTS)
    return root


def build_model(settings: TrainSettings):
    """The untrained model: the same weights for the same seed (this is also the random-init twin)."""
    return factory.build_model("hubert", "base", settings.seed, **settings.config)


def save_random_twin(out: str | Path, settings: TrainSettings) -> Path:
    """Saves the trained model's random-init twin (same config, same seed, no training)."""
    return factory.save_model(out, "hubert", "base", settings.seed, **settings.config)


@dataclass
class Utterances:
    """The training waveforms (normalised as the feature extractor does), their cluster targets and the
    codebook that gave them."""

    waves: list[torch.Tensor]
    targets: list[torch.Tensor]
    codebook: Codebook


def load_utterances(root: Path, settings: TrainSettings, geometry: FrameGeometry, log: Callable) -> Utterances:
    """Reads every FLAC under ``root``, computes MFCCs at the model's frames and their k-means ids."""
    files = sorted(root.rglob("*.flac"))
    if not files:
        raise FileNotFoundError(f"{root}: no FLAC files to train on")
    waves, feats = [], []
    for path in files:
        wave, rate = sf.read(path, dtype="float32")
        if rate != SAMPLE_RATE:
            raise ValueError(f"{path}: sample rate {rate}, the training corpus must be {SAMPLE_RATE} Hz")
        x = torch.from_numpy(wave)
        n = geometry.num_frames(len(x))
        f = frame_features(x, SAMPLE_RATE, geometry)
        if n < 2 * settings.mask_span or len(f) < n:
            continue
        waves.append(normalized(x))
        feats.append(f)
    stacked = torch.cat(feats)
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    g = torch.Generator().manual_seed(settings.seed)
    sample = stacked[torch.randperm(len(stacked), generator=g)[: settings.kmeans_frames]]
    fit = kmeans((sample - mean) / std, settings.clusters, iterations=50, seed=settings.seed)
    log(f"k-means: {settings.clusters} clusters of MFCC frames, {fit.iterations} iterations")
    targets = [cluster_ids(f, mean, std, fit.centroids) for f in feats]
    codebook = Codebook(fit.centroids, mean, std, torch.bincount(torch.cat(targets), minlength=settings.clusters))
    seconds = sum(len(w) for w in waves) / SAMPLE_RATE
    log(f"corpus: {len(waves)} utterances, {seconds / 3600:.2f} h, {len(stacked)} frames")
    return Utterances(waves, targets, codebook)


def batch_of(
    data: Utterances, settings: TrainSettings, geometry: FrameGeometry, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(waves [B, L], targets [B, T], mask [B, T]): random crops of random utterances, cut to the
    shortest so no padding is needed; crops start on a frame boundary so targets stay aligned."""
    idx = torch.randint(len(data.waves), (settings.batch,), generator=g).tolist()
    shortest = min(len(data.waves[i]) for i in idx)
    length = min(shortest, int(settings.crop_seconds * SAMPLE_RATE))
    frames = geometry.num_frames(length)
    length = (frames - 1) * geometry.stride + geometry.receptive_field  # exactly ``frames`` frames
    waves, targets = [], []
    for i in idx:
        total = len(data.targets[i])
        first = torch.randint(0, total - frames + 1, (1,), generator=g).item()
        start = first * geometry.stride
        waves.append(data.waves[i][start : start + length])
        targets.append(data.targets[i][first : first + frames])
    mask = span_mask(settings.batch, frames, settings.mask_prob, settings.mask_span, g)
    return torch.stack(waves), torch.stack(targets), mask


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up then linear decay to zero."""
    warm = max(1, int(settings.warmup * settings.steps))
    if step < warm:
        return settings.lr * (step + 1) / warm
    return settings.lr * max(0.0, (settings.steps - step) / max(1, settings.steps - warm))


def train(
    corpus_root: str | Path,
    out: str | Path,
    settings: TrainSettings,
    log: Callable[[str], None] = print,
    held_out: str | Path | None = None,
) -> dict:
    """Pre-trains the model on the FLACs under ``corpus_root``; writes ``out``/model (HF checkpoint,
    fp32, with its prediction head and codebook in head.safetensors) and ``out``/training.json
    (settings, per-interval loss and masked accuracy, and the masked-prediction score on the FLACs under
    ``held_out`` with its baselines); resumes from ``out``/checkpoint.pt.  Returns that summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(settings)
    geometry = waveform_geometry(model.config, SAMPLE_RATE)
    data = load_utterances(Path(corpus_root), settings, geometry, log)
    head = Head(settings.config["hidden_size"], settings.projection, settings.clusters, settings.temperature)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay)
    g = torch.Generator().manual_seed(settings.seed)
    history, step = [], 0
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["settings"] != asdict(settings):
            raise ValueError(f"{checkpoint} was written with other settings; remove it to start again")
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        history, step = state["history"], state["step"]
        log(f"resumed at step {step}")
    model.train()
    window, started = [], time.time()
    while step < settings.steps:
        waves, targets, mask = batch_of(data, settings, geometry, g)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        hidden = model(waves, mask_time_indices=mask).last_hidden_state
        logits = head(hidden[mask])
        loss = F.cross_entropy(logits, targets[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        step += 1
        window.append((loss.item(), (logits.argmax(1) == targets[mask]).float().mean().item()))
        if step % 25 == 0 or step == settings.steps:
            loss_mean, acc_mean = np.mean(window, axis=0)
            history.append({"step": step, "loss": float(loss_mean), "masked_accuracy": float(acc_mean)})
            rate = len(window) / (time.time() - started)
            log(
                f"step {step}/{settings.steps}  loss {loss_mean:.3f}  masked acc {acc_mean:.3f}  "
                f"{rate:.2f} steps/s  eta {(settings.steps - step) / rate / 60:.1f} min"
            )
            window, started = [], time.time()
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            state = {
                "settings": asdict(settings),
                "model": model.state_dict(),
                "head": head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": g.get_state(),
                "history": history,
                "step": step,
            }
            torch.save(state, checkpoint.with_suffix(".tmp"))
            os.replace(checkpoint.with_suffix(".tmp"), checkpoint)
    model.eval()
    model.save_pretrained(out / "model")
    factory.feature_extractor(SAMPLE_RATE).save_pretrained(out / "model")
    save_head(out / "model", head, data.codebook)
    final = history[-1] if history else {}
    summary = {
        "settings": asdict(settings),
        "utterances": len(data.waves),
        "hours": sum(len(w) for w in data.waves) / SAMPLE_RATE / 3600,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final": final,
        "history": history,
    }
    if held_out is not None:
        score = evaluate_held_out(
            model, head, data.codebook, held_out, geometry, settings.mask_prob, settings.mask_span, settings.seed
        )
        log(
            f"held out ({score.utterances} utterances, {score.masked_frames} masked frames): masked accuracy "
            f"{score.accuracy:.3f}; most frequent cluster {score.most_frequent:.3f}, copy the nearest unmasked "
            f"frame {score.copy_nearest:.3f}, chance {score.chance:.3f}"
        )
        summary["held_out"] = asdict(score)
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    return summary


MODEL_CARD = """# neurostat demo model (tiny HuBERT-style SSL model)

**A demo model, not for research claims about real speech.** It was pre-trained by neurostat on
synthetic espeak-ng speech so that the offline default run has a model whose neurons carry properties
of speech; findings on it say nothing about models trained on real speech.

- Architecture: HuBERT ({layers} layers, hidden {hidden}, FFN {ffn}, {heads} heads, conv front end
  {conv} channels, stride {stride} samples = {frame_ms:g} ms at {rate} Hz); {parameters:,} parameters,
  stored in fp16 (loads as fp32).
- Data: `neurostat synth` speech, {speakers} speakers ({utterances} utterances, {hours:.2f} h), voice
  variants {variants} only; the default demo corpus speaks with other variants and speaker ids.
- Objective: HuBERT's first iteration: masked prediction (spans of {mask_span} frames, mask probability
  {mask_prob}) of {clusters} k-means clusters of 39-d MFCCs (13 + deltas + delta-deltas) at the model's
  frames.
- Training: seed {seed}, {steps} steps of {batch} x {crop:g} s crops, AdamW lr {lr} (warm-up {warmup:.0%},
  linear decay), no dropout, 2 CPU cores.
- Final (mean of the last 25 training steps): loss {loss:.3f}, masked-prediction accuracy {accuracy:.3f}.
- Held out ({held_utterances} utterances of the demo corpus's speakers and voices, {held_masked_frames:,}
  masked frames, masked as in training): masked-prediction accuracy **{held_accuracy:.3f}**, against
  {held_most_frequent:.3f} for always predicting the most frequent training cluster,
  {held_copy_nearest:.3f} for copying the cluster of the nearest unmasked frame, and chance
  {held_chance:.3f}.  The prediction head and the
  k-means codebook are in `head.safetensors` (`neurostat.tiny.objective.load_head`).
- Reproduce: `python bench/train_tiny_ssl.py --seed {seed} --steps {steps} --ship`; its random-init twin:
  `python bench/train_tiny_ssl.py --twin DIR`.
"""


def ship(trained: str | Path, dest: str | Path, summary: dict) -> Path:
    """Writes the package-data model to ``dest``: weights as fp16 safetensors (config says fp32, so
    every loader upcasts), config, feature-extractor config, the prediction head and codebook (fp32), the
    training log and a model card."""
    from safetensors.torch import load_file, save_file

    trained, dest = Path(trained), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(trained / "model.safetensors"))
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
        str(dest / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for name in ("config.json", "preprocessor_config.json", HEAD_FILE):
        (dest / name).write_bytes((trained / name).read_bytes())
    return write_card(dest, summary)


def write_card(dest: str | Path, summary: dict) -> Path:
    """Writes the model card and the training log (``summary``, with its held-out score) into ``dest``."""
    dest = Path(dest)
    s, c = summary["settings"], summary["settings"]["config"]
    if "held_out" not in summary:
        raise ValueError("only a model scored on held-out speech is shipped: train it with held_out=...")
    from transformers import HubertConfig

    geometry = waveform_geometry(HubertConfig(**c), SAMPLE_RATE)
    card = MODEL_CARD.format(
        layers=c["num_hidden_layers"],
        hidden=c["hidden_size"],
        ffn=c["intermediate_size"],
        heads=c["num_attention_heads"],
        conv=c["conv_dim"][0],
        stride=geometry.stride,
        frame_ms=1000 * geometry.stride / SAMPLE_RATE,
        rate=SAMPLE_RATE,
        parameters=summary["parameters"],
        speakers=s["speakers"],
        utterances=summary["utterances"],
        hours=summary["hours"],
        variants=", ".join(TRAINING_VARIANTS),
        mask_span=s["mask_span"],
        mask_prob=s["mask_prob"],
        clusters=s["clusters"],
        seed=s["seed"],
        steps=s["steps"],
        batch=s["batch"],
        crop=s["crop_seconds"],
        lr=s["lr"],
        warmup=s["warmup"],
        loss=summary["final"]["loss"],
        accuracy=summary["final"]["masked_accuracy"],
        **{f"held_{k}": v for k, v in summary["held_out"].items()},
    )
    (dest / "README.md").write_text(card)
    (dest / "training.json").write_text(json.dumps(summary, indent=1))
    return dest
