"""Frozen-feature linear probes: how much of a property a model's layers carry, before and after editing.

``neurostat probe`` extracts the Transformer layers' outputs of a model (original, ablated or pruned)
on a prepared corpus and fits linear probes on speakers disjoint from the test speakers (a seeded
split within each gender; or on whole groups of speakers, e.g. voices, disjoint from the test groups):

- ``phone``: frame-level phone classification (accuracy; accuracy per phone type; phone error rate of
  the collapsed frame sequences, silence removed);
- ``phone-type``: frame-level vowel / voiced / unvoiced consonant classification (speech frames);
- ``gender``: utterance-level classification of the mean of the utterance's frames;
- ``pitch-bin``: frame-level pitch-bin classification on voiced frames;
- ``log-f0``: ridge regression of log F0 on voiced frames (R², RMSE in semitones).

Each probe reads one layer (``layer=N``) or a learnt softmax-weighted sum of all layers (the
default, as SUPERB does); features are standardised on the training speakers.  Classifiers are
multinomial logistic regressions and the regression is a ridge, all fitted full-batch with L-BFGS
from zero weights, so a seed fixes the split, the frame sample and therefore the result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .choices import PROBE_TASKS
from .corpus.prepared import PreparedCorpus
from .corpus.synth import speaker_voices
from .engine.device import resolve_device
from .engine.features import layer_features
from .errors import OptionError
from .model.adapter import ModelAdapter
from .model.loading import load_adapter
from .model.provenance import EditRecord
from .phones import BROAD_CLASSES, NON_SPEECH

PHONE_TYPES = tuple(BROAD_CLASSES)
FORMAT = 1


class ProbeError(ValueError):
    """A corpus or model that a probe cannot use (missing labels, a class with no examples, ...)."""


@dataclass
class ProbeData:
    """Per-utterance layer outputs [frames, layers, hidden] and the labels the probes learn."""

    corpus: str
    ids: list[str]
    speakers: list[str]
    genders: list[str]
    features: list[torch.Tensor]
    layers: list[int]
    phones: list[np.ndarray]  # phone index into phone_names per frame, -1 = none
    phone_names: tuple[str, ...]
    f0: list[np.ndarray]  # Hz per frame, NaN = unvoiced
    pitch_bins: list[np.ndarray]  # bin index per frame
    pitch_bin_names: tuple[str, ...]


def extract(
    adapter: ModelAdapter,
    corpus: PreparedCorpus,
    layers: list[int] | None = None,
    batch_seconds: float | None = None,
    progress: bool = True,
) -> ProbeData:
    """Runs the model over the corpus and keeps ``layers`` (default: all) with the corpus's labels."""
    layers = layers or list(range(1, adapter.num_layers + 1))
    need = sum(r["num_frames"] for r in corpus.records) * len(layers) * adapter.config.hidden_size * 4
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have / 2:
        raise ProbeError(
            f"probing {len(layers)} layers of {corpus.path} keeps {need / 2**30:.1f} GiB of features in memory "
            f"(this machine has {have / 2**30:.0f} GiB): probe one layer (--layer) or a smaller corpus"
        )
    run = layer_features(corpus, adapter, list(range(len(corpus))), layers, batch_seconds, progress=progress)
    feats = {utt: f.cpu() for utt, f in run}
    utts = [u for u in corpus if u.id in feats]
    try:
        f0 = [u.f0 for u in utts]
    except KeyError:
        raise ProbeError(f"{corpus.path}: the prepared corpus has no F0 per frame (prepared without pitch)") from None
    return ProbeData(
        corpus=str(corpus.path),
        ids=[u.id for u in utts],
        speakers=[u.speaker for u in utts],
        genders=[u.gender for u in utts],
        features=[feats[u.id] for u in utts],
        layers=list(layers),
        phones=[u.phone_frames() for u in utts],
        phone_names=corpus.phones,
        f0=f0,
        pitch_bins=[u.pitch_bins() for u in utts],
        pitch_bin_names=corpus.vocabularies["pitch_bin"],
    )


def speaker_split(
    speakers: list[str],
    genders: list[str],
    test_fraction: float,
    seed: int,
    groups: Mapping[str, str] | None = None,
) -> tuple[set, set]:
    """(train speakers, test speakers): within each gender a seeded shuffle puts ``test_fraction`` of its
    speakers (at least one, when it has two or more) in the test set; no speaker is in both.

    ``groups`` (speaker → group, e.g. the voice a synthetic speaker speaks with): whole groups are held
    out instead, ``test_fraction`` of each gender's groups, so no test speaker shares a group with a
    training speaker (a voice-disjoint split)."""
    if not 0 < test_fraction < 1:
        raise OptionError(f"test fraction must be between 0 and 1, got {test_fraction}")
    gender_of = dict(zip(speakers, genders))
    if len(gender_of) < 2:
        raise ProbeError(f"a speaker-disjoint split needs at least 2 speakers; the corpus has {len(gender_of)}")
    unit_of = {s: s for s in gender_of} if groups is None else _groups_of(gender_of, groups)
    unit_gender = {unit_of[s]: g for s, g in gender_of.items()}
    rng = np.random.default_rng(seed)
    held_out = set()
    for gender in sorted(set(gender_of.values())):
        units = sorted(u for u, g in unit_gender.items() if g == gender)
        units = [units[i] for i in rng.permutation(len(units))]
        count = max(1, round(test_fraction * len(units))) if len(units) >= 2 else 0
        held_out |= set(units[:count])
    if not held_out:
        what = "speakers" if groups is None else "groups"
        raise ProbeError(f"no gender has 2 {what}: cannot hold out test {what}")
    test = {s for s in gender_of if unit_of[s] in held_out}
    return set(gender_of) - test, test


def speaker_groups(corpus: PreparedCorpus, source: str | Path) -> dict[str, str]:
    """Speaker → group for a group split.  ``"voices"``: the espeak-ng voice each speaker of a synthetic
    corpus speaks with (its SPEAKERS.TXT, in the folder the corpus was prepared from); otherwise a text
    file of ``speaker group`` lines (whitespace-separated; ``#`` starts a comment)."""
    if str(source) == "voices":
        try:
            return speaker_voices(corpus.meta.root)
        except (OSError, ValueError) as e:
            raise ProbeError(f"--groups voices needs a corpus made by `neurostat synth`: {e}") from e
    path = Path(source)
    if not path.is_file():
        raise ProbeError(f"{path}: no such groups file (give `voices` or a file of `speaker group` lines)")
    groups = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ProbeError(f"{path}:{number}: expected `speaker group`, got {line.strip()!r}")
        groups[fields[0]] = fields[1]
    if not groups:
        raise ProbeError(f"{path}: no `speaker group` lines")
    return groups


def _groups_of(gender_of: dict[str, str], groups: Mapping[str, str]) -> dict[str, str]:
    """Each speaker's group, checked: every speaker has one, and no group spans both genders."""
    missing = sorted(set(gender_of) - set(groups))
    if missing:
        raise ProbeError(f"speaker(s) {missing[:5]} have no group: a group split needs every speaker's group")
    genders: dict[str, set] = {}
    for speaker, gender in gender_of.items():
        genders.setdefault(groups[speaker], set()).add(gender)
    mixed = sorted(g for g, seen in genders.items() if len(seen) > 1)
    if mixed:
        raise ProbeError(f"group {mixed[0]!r} has speakers of both genders: a group split holds out groups per gender")
    return {s: groups[s] for s in gender_of}


@dataclass
class Examples:
    """One task's examples: features [N, layers, hidden], targets [N], and the utterance of each."""

    x: torch.Tensor
    y: torch.Tensor
    utterance: np.ndarray


def _frames(data: ProbeData, keep: list[np.ndarray], target: list[np.ndarray], which: set, dtype) -> Examples:
    rows = [i for i, s in enumerate(data.speakers) if s in which]
    x = torch.cat([data.features[i][torch.from_numpy(keep[i])] for i in rows])
    y = torch.from_numpy(np.concatenate([target[i][keep[i]] for i in rows]).astype(dtype))
    utt = np.concatenate([np.full(int(keep[i].sum()), i) for i in rows])
    return Examples(x, y, utt)


def _subsample(ex: Examples, limit: int, seed: int) -> Examples:
    if len(ex.y) <= limit:
        return ex
    pick = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(ex.y), limit, replace=False)))
    return Examples(ex.x[pick], ex.y[pick], ex.utterance[pick.numpy()])


class LinearProbe(torch.nn.Module):
    """A linear map of one layer, or of a softmax-weighted sum of layers, of standardised features given
    layers first (layers × frames × hidden), so that the weighted sum is one matrix-vector product over
    contiguous rows instead of a sum over the middle axis that copies the features at every step of the fit."""

    def __init__(self, num_layers: int, hidden: int, outputs: int, weighted: bool):
        super().__init__()
        self.layer_logits = torch.nn.Parameter(torch.zeros(num_layers), requires_grad=weighted)
        self.linear = torch.nn.Linear(hidden, outputs)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def layer_weights(self) -> torch.Tensor:
        return torch.softmax(self.layer_logits, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers, frames, hidden = x.shape
        return self.linear((self.layer_weights() @ x.reshape(layers, -1)).reshape(frames, hidden))


@dataclass
class FittedProbe:
    """A fitted probe with the standardisation it was fitted with (so it can read another model's features)."""

    module: LinearProbe
    mean: torch.Tensor
    std: torch.Tensor
    target_mean: float | None  # regression: the target's standardisation
    target_std: float | None

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(layers_first((x - self.mean) / self.std))
        return out.argmax(1) if self.target_mean is None else out[:, 0] * self.target_std + self.target_mean

    def layer_weights(self) -> list[float]:
        return [round(float(w), 4) for w in self.module.layer_weights().detach()]


def layers_first(x: torch.Tensor) -> torch.Tensor:
    """Frames × layers × hidden features as :class:`LinearProbe` reads them: layers × frames × hidden."""
    return x.transpose(0, 1).contiguous()


def fit_probe(train: Examples, classes: int | None, l2: float = 1e-3, iterations: int = 200) -> FittedProbe:
    """Fits a probe on ``train``: a logistic regression over ``classes``, or a ridge when None."""
    mean = train.x.mean(0, keepdim=True)
    std = train.x.std(0, keepdim=True) + 1e-5
    x = layers_first((train.x - mean) / std)
    y = train.y
    target_mean = target_std = None
    if classes is None:
        target_mean, target_std = float(y.mean()), float(y.std()) + 1e-8
        y = (y - target_mean) / target_std
    probe = LinearProbe(x.shape[0], x.shape[2], classes or 1, weighted=x.shape[0] > 1)
    params = [p for p in probe.parameters() if p.requires_grad]
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        out = probe(x)
        loss = F.cross_entropy(out, y) if classes else F.mse_loss(out[:, 0], y)
        loss = loss + l2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return FittedProbe(probe, mean, std, target_mean, target_std)


def _classes_present(task: str, y: torch.Tensor, names: tuple[str, ...], train_speakers: int, corpus: str) -> None:
    missing = [names[c] for c in range(len(names)) if not (y == c).any()]
    if missing:
        raise ProbeError(
            f"{task} probe: class {missing[0]!r} has no examples among the {train_speakers} training speakers "
            f"of {corpus}" + (f" (nor do {missing[1:]})" if len(missing) > 1 else "")
        )


def _classification(pred: torch.Tensor, y: torch.Tensor, train_y: torch.Tensor) -> dict:
    """Accuracy with the baselines that read it: ``majority``, the share of the test set's own largest
    class (what always answering that class scores), and ``balanced_accuracy``, the mean recall over the
    classes of the test set (majority guessing scores 1 / classes there)."""
    classes = y.unique()
    recall = [float((pred[y == c] == c).float().mean()) for c in classes]
    return {
        "accuracy": float((pred == y).float().mean()),
        "majority": float(torch.bincount(y).max()) / len(y),
        "balanced_accuracy": float(np.mean(recall)),
        "balanced_chance": 1 / len(classes),
        "train_examples": len(train_y),
        "test_examples": len(y),
    }


def _task_examples(
    task: str, data: ProbeData, labelled: list[np.ndarray], type_of: np.ndarray
) -> tuple[ProbeData, list[np.ndarray], list[np.ndarray], tuple[str, ...] | None]:
    """(the data to draw from, which rows of each utterance count, their targets, the class names; None
    for a regression) of a task."""
    if task == "phone":
        return data, labelled, data.phones, data.phone_names
    if task == "phone-type":
        types = [type_of[np.where(p >= 0, p, len(data.phone_names))] for p in data.phones]
        return data, [t >= 0 for t in types], types, PHONE_TYPES
    if task == "gender":
        names = tuple(sorted(set(data.genders)))
        if len(names) < 2:
            raise ProbeError(f"gender probe: {data.corpus} has one gender only ({names[0]!r})")
        pooled = _with_features(data, [f.mean(0, keepdim=True) for f in data.features], data.layers)
        keep = [np.ones(1, dtype=bool) for _ in data.features]
        return pooled, keep, [np.array([names.index(g)]) for g in data.genders], names
    if task == "pitch-bin":
        names = tuple(n for n in data.pitch_bin_names if n != "unvoiced")
        keep = [b < len(names) for b in data.pitch_bins]  # the unvoiced bin is the last
    else:
        names = None
        keep = [np.isfinite(f) & (f > 0) for f in data.f0]
    if not any(k.any() for k in keep):
        raise ProbeError(f"{task} probe: {data.corpus} has no voiced frame")
    if names is not None:
        return data, keep, data.pitch_bins, names
    return data, keep, [np.log(np.where(k, f, 1.0)) for f, k in zip(data.f0, keep)], None


def _regression(pred: torch.Tensor, y: torch.Tensor, train_y: torch.Tensor) -> dict:
    residual = ((pred - y) ** 2).sum()
    return {
        "r2": float(1 - residual / ((y - y.mean()) ** 2).sum()),
        "rmse_semitones": float(12 / np.log(2) * torch.sqrt(residual / len(y))),
        "train_examples": len(train_y),
        "test_examples": len(y),
    }


def headline(task: str) -> str:
    """The metric that sums a task up (reports and tables plot it): R² for log-f0, else accuracy."""
    return "r2" if task == "log-f0" else "accuracy"


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two label sequences."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, z in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != z))
    return row[-1]


def _collapse(seq: np.ndarray, drop: set[int]) -> list[int]:
    out = [int(v) for i, v in enumerate(seq) if i == 0 or v != seq[i - 1]]
    return [v for v in out if v not in drop]


def phone_error_rate(pred: np.ndarray, ref: np.ndarray, utterance: np.ndarray, drop: set[int]) -> float:
    """Edit distance between the collapsed predicted and reference frame sequences (``drop`` removed),
    summed over utterances, over the reference length."""
    errors = length = 0
    for u in np.unique(utterance):
        at = utterance == u
        r = _collapse(ref[at], drop)
        errors += edit_distance(_collapse(pred[at], drop), r)
        length += len(r)
    return errors / max(length, 1)


def run_probes(
    data: ProbeData,
    tasks: tuple[str, ...] = PROBE_TASKS,
    layer: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.3,
    max_train_frames: int = 60_000,
    fitted: dict[str, FittedProbe] | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict:
    """Fits the probes of ``tasks`` on ``data`` (one ``layer``, 1-based, or the weighted sum of all) and
    returns their metrics with the split that produced them (``groups``: hold out whole groups of
    speakers, see :func:`speaker_split`).

    ``fitted``: an empty dict receives each task's fitted probe; a filled one is used as is (nothing is
    fitted), which measures how well another model's probes read these features — e.g. the original
    model's probes on an ablated model, the view of a downstream head that is not retrained."""
    reuse = bool(fitted)
    if reuse and set(tasks) - set(fitted):
        raise OptionError(f"no fitted probe for task(s) {sorted(set(tasks) - set(fitted))}")
    if reuse and layer is None and any(len(p.module.layer_logits) != len(data.layers) for p in fitted.values()):
        raise OptionError(f"the fitted probes read another number of layers than the {len(data.layers)} given")

    def fit(task: str, train: Examples, classes: int | None) -> FittedProbe:
        if reuse:
            return fitted[task]
        probe = fit_probe(train, classes)
        if fitted is not None:
            fitted[task] = probe
        return probe

    unknown = [t for t in tasks if t not in PROBE_TASKS]
    if unknown:
        raise OptionError(f"unknown probe task(s) {unknown}; choose from {PROBE_TASKS}")
    if layer is not None:
        if layer not in data.layers:
            raise OptionError(f"layer {layer} was not extracted; layers: {data.layers}")
        pick = data.layers.index(layer)
        data = _with_features(data, [f[:, pick : pick + 1] for f in data.features], [layer])
    train_spk, test_spk = speaker_split(data.speakers, data.genders, test_fraction, seed, groups)
    n_train = len(train_spk)
    results: dict = {}
    phone_idx = {p: i for i, p in enumerate(data.phone_names)}
    non_speech = {phone_idx[p] for p in NON_SPEECH if p in phone_idx}
    type_of = np.full(len(data.phone_names) + 1, -1)
    for t, members in enumerate(BROAD_CLASSES.values()):
        for p in members:
            if p in phone_idx:
                type_of[phone_idx[p]] = t
    labelled = [p >= 0 for p in data.phones]
    if not any(m.any() for m in labelled) and ("phone" in tasks or "phone-type" in tasks):
        raise ProbeError(f"{data.corpus}: no frame has a phone label (prepared without alignments?)")
    for task in tasks:
        source, keep, target, names = _task_examples(task, data, labelled, type_of)
        dtype = np.float32 if names is None else np.int64
        train = _subsample(_frames(source, keep, target, train_spk, dtype), max_train_frames, seed)
        if names is not None and task != "phone":  # a phone missing from training only counts as errors
            _classes_present(task, train.y, names, n_train, data.corpus)
        test = _frames(source, keep, target, test_spk, dtype)
        probe = fit(task, train, None if names is None else len(names))
        pred = probe.predict(test.x)
        r = _regression(pred, test.y, train.y) if names is None else _classification(pred, test.y, train.y)
        if task == "phone":
            types = type_of[test.y.numpy()]
            r["accuracy_by_type"] = {
                name: float((pred == test.y)[torch.from_numpy(types == t)].float().mean())
                for t, name in enumerate(PHONE_TYPES)
                if (types == t).any()
            }
            r["unseen_test_frames"] = int((~torch.isin(test.y, train.y.unique())).sum())
            r["per"] = phone_error_rate(pred.numpy(), test.y.numpy(), test.utterance, non_speech)
        warning = _degenerate_split(task, test.y, train.y, names)
        if warning:
            r["warning"] = warning
        r["layer_weights"] = probe.layer_weights()
        r["probe"] = "fitted on another model" if reuse else "fitted"
        results[task] = r
    return {
        "format": FORMAT,
        "corpus": data.corpus,
        "layer": "weighted" if layer is None else layer,
        "layers": data.layers,
        "seed": seed,
        "split": _split_record(train_spk, test_spk, groups),
        "tasks": results,
    }


DEGENERATE_VARIANCE = 0.25
"""A regression's test targets that vary less than this share of the training targets' variance make R²
(measured against the test set's own mean) meaningless: a split that held out one gender's F0, say."""


def _degenerate_split(task: str, y: torch.Tensor, train_y: torch.Tensor, names: tuple[str, ...] | None) -> str | None:
    """Why a split's test set cannot measure ``task`` (None when it can): one class only, or regression
    targets that hardly vary (held-out groups of one gender, a voice shared by every speaker of a gender)."""
    if names is not None:
        classes = y.unique().tolist()
        if len(classes) < 2:
            return (
                f"the test speakers hold one {task} class only ({names[classes[0]]!r}): accuracy and majority say "
                "nothing about the task; hold out speakers (or groups) of every class"
            )
        return None
    share = float(y.var() / train_y.var())
    if share < DEGENERATE_VARIANCE:
        return (
            f"the test targets vary {share:.0%} as much as the training ones: R² compares with the test set's own "
            "mean and falls far below 0; hold out speakers (or groups) of every gender"
        )
    return None


def _split_record(train: set, test: set, groups: Mapping[str, str] | None) -> dict:
    record = {"train_speakers": sorted(train), "test_speakers": sorted(test), "by": "speaker"}
    if groups is not None:
        record.update(by="group", test_groups=sorted({groups[s] for s in test}))
    return record


def _with_features(data: ProbeData, features: list[torch.Tensor], layers: list[int]) -> ProbeData:
    return ProbeData(**{**data.__dict__, "features": features, "layers": layers})


def probe_model(
    model: str | ModelAdapter,
    corpus: str | Path | PreparedCorpus,
    tasks: tuple[str, ...] = PROBE_TASKS,
    layer: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.3,
    device: str = "cpu",
    tag: dict | None = None,
    max_train_frames: int = 60_000,
    fitted: dict[str, FittedProbe] | None = None,
    progress: bool = True,
    groups: Mapping[str, str] | None = None,
) -> dict:
    """Extracts a model's features on a prepared corpus and runs the probes; the result names the model
    and carries a tag: what was done to it (:func:`edit_tag`, e.g. ``{"edit": "pruned", "method": "l1",
    "keep": 0.5}``, what ``report --probe`` groups by) with ``tag``'s entries over it; ``fitted`` and
    ``groups``: see :func:`run_probes` (:func:`speaker_groups` reads them from a corpus or a file)."""
    adapter = model if isinstance(model, ModelAdapter) else load_adapter(model, resolve_device(device))
    corpus = corpus if isinstance(corpus, PreparedCorpus) else PreparedCorpus(corpus)
    data = extract(adapter, corpus, None if layer is None else [layer], progress=progress)
    result = run_probes(data, tasks, layer, seed, test_fraction, max_train_frames, fitted, groups)
    return {"model": adapter.source, "tag": {**edit_tag(adapter), **(tag or {})}, **result}


def edit_tag(adapter: ModelAdapter) -> dict:
    """``{"edit": "original"}`` for a model neurostat did not edit, else its checkpoint record's tag
    (pruned: method and kept fraction; ablated: the neurons' file name)."""
    record = EditRecord.read(adapter.source) if Path(adapter.source).is_dir() else None
    if record is None:
        return {"edit": "original"}
    return record.tag(int(adapter.model.config.intermediate_size))


_BASELINES = {"accuracy": "majority", "balanced_accuracy": "balanced_chance"}
"""The baseline column of a metric: what guessing the test set's largest class scores on it."""


def table(results: list[dict]) -> str:
    """The metrics of several probe results side by side; columns after the first show the change, the
    last the baseline of guessing the test set's largest class.  Notes name the tasks a split cannot
    measure (:func:`_degenerate_split`) and explain a PER above 1."""
    rows: list[tuple[str, list]] = []
    for task, metrics in results[0]["tasks"].items():
        for key in ("accuracy", "balanced_accuracy", "per", "r2", "rmse_semitones"):
            if key in metrics:
                rows.append((f"{task} {key}", [r["tasks"].get(task, {}).get(key) for r in results]))
        for name in metrics.get("accuracy_by_type", {}):
            rows.append((f"{task} accuracy {name}", [r["tasks"][task]["accuracy_by_type"].get(name) for r in results]))
    names = [_label(r) for r in results] + ["majority class"]
    width = max(len(n) for n, _ in rows)
    cols = [max(16, len(n)) for n in names]
    lines = [" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols))]
    for name, values in rows:
        cells = [f"{values[0]:.3f}"] + ["—" if v is None else f"{v:.3f} ({v - values[0]:+.3f})" for v in values[1:]]
        task, _, metric = name.partition(" ")
        baseline = results[0]["tasks"][task].get(_BASELINES.get(metric, ""))
        cells.append("" if baseline is None else f"{baseline:.3f}")
        lines.append(name.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, cols)))
    warned = {(task, m["warning"]) for r in results for task, m in r["tasks"].items() if m.get("warning")}
    lines += [f"note: {task}: {warning}" for task, warning in sorted(warned)]
    if any(v is not None and v > 1 for name, values in rows if name.endswith(" per") for v in values):
        lines.append(
            "per: phone error rate = edit distance between the collapsed predicted and reference phone sequences "
            "over the reference length; above 1 when the predictions alternate more often than the phones "
            "change (each extra run is an insertion)"
        )
    return "\n".join(lines)


def _label(result: dict) -> str:
    tag = result.get("tag") or {}
    return " ".join(f"{v}" for v in tag.values()) if tag else Path(result["model"]).name or result["model"]


def save_results(results: list[dict], out: str | Path) -> Path:
    """Writes the probe results (a JSON list, one entry per model) to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return out


def load_results(path: str | Path) -> list[dict]:
    """Reads :func:`save_results`' file; a clear error for anything else."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProbeError(f"{path}: cannot read probe results: {e}") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) and r.get("format") == FORMAT for r in results):
        raise ProbeError(f"{path}: not a neurostat probe results file (format {FORMAT})")
    return results
