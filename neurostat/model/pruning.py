"""Pruning FFN neurons: scores, budgets, protected sets, physical slicing, and pruned checkpoints.

Pruning neuron j slices row j of W1 and b1 and column j of W2.  The paper's baseline score is
``‖W1[j,:]‖₁ + |b1[j]| + ‖W2[:,j]‖₁`` (``l2`` uses Euclidean norms); the lowest scores go first.
"Protected" pruning removes the protected neurons (e.g. property neurons) from the candidates
first; ``exact_protected`` keeps exactly the protected set.

Layers are the entries of the layer axis (one per FFN: a Conformer layer's ffn1 and ffn2 are two, both
prunable).  Pruned layers have different widths, which HF cannot load, so a pruned checkpoint is a
directory with the HF config, ``neurostat.json`` (source model, kept indices per entry, criterion,
protected sets) and ``model.safetensors``; :func:`~neurostat.model.checkpoints.load_pruned` rebuilds the
model exactly (``strict=True``) and :func:`~neurostat.model.loading.load_adapter` reads it like any model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..choices import PRUNE_CRITERIA, PRUNE_SCOPES
from ..neuronset import NeuronSet
from .checkpoints import PruneError, model_source, save_feature_extractor
from .edit import neuron_model
from .loading import load_full_model, model_ffns
from .outputs import check_checkpoint_out, checkpoint_folder
from .provenance import EditRecord


@dataclass
class PruneResult:
    kept: dict[int, list[int]]  # layer (1-based) -> kept neuron indices of the original model
    params_before: int
    params_after: int
    criterion: str

    def widths(self) -> dict[int, int]:
        return {layer: len(idx) for layer, idx in self.kept.items()}


@torch.no_grad()
def neuron_scores(model: nn.Module, criterion: str = "l1") -> dict[int, torch.Tensor]:
    """Per layer (1-based): a score per FFN neuron; low scores are pruned first."""
    if criterion not in PRUNE_CRITERIA:
        raise PruneError(f"unknown criterion {criterion!r}; choose from {PRUNE_CRITERIA}")
    out = {}
    for i, ffn in enumerate(model_ffns(model), 1):
        w1, w2 = ffn.up.weight.double(), ffn.down.weight.double()
        b1 = ffn.up.bias.double() if ffn.up.bias is not None else torch.zeros(ffn.width, dtype=torch.float64)
        if criterion == "l1":
            out[i] = w1.abs().sum(1) + b1.abs() + w2.abs().sum(0)
        else:
            out[i] = (w1.square().sum(1) + b1.square() + w2.square().sum(0)).sqrt()
    return out


def plan(
    scores: dict[int, torch.Tensor],
    keep: int | dict[int, int] | None = None,
    ratio: float | None = None,
    protect: NeuronSet | None = None,
    scope: str = "layer",
    exact_protected: bool = False,
) -> dict[int, list[int]]:
    """Kept indices per layer for a budget (a count per layer, or a ratio, per layer or global)."""
    protect = protect or NeuronSet()
    widths = {layer: s.numel() for layer, s in scores.items()}
    protect.validate(len(scores), max(widths.values()), "protected neurons")
    if exact_protected:
        if keep is not None or ratio is not None:
            raise PruneError("keeping exactly the protected set takes no other budget")
        return {layer: sorted(protect[layer]) for layer in scores}
    if (keep is None) == (ratio is None):
        raise PruneError("give exactly one budget: keep (a count) or ratio")
    if ratio is not None and not 0 < ratio <= 1:
        raise PruneError(f"the kept ratio (--keep-ratio) must be in (0, 1], got {ratio}")
    if scope == "global":
        total = round(ratio * sum(widths.values())) if ratio is not None else keep
        if not isinstance(total, int):
            raise PruneError("a global budget is one number")
        return _plan_global(scores, total, protect)
    if scope != "layer":
        raise PruneError(f"unknown scope {scope!r}; choose from {PRUNE_SCOPES}")
    budget = {
        layer: (round(ratio * w) if ratio is not None else (keep[layer] if isinstance(keep, dict) else keep))
        for layer, w in widths.items()
    }
    kept = {}
    for layer, score in scores.items():
        n, fixed = budget[layer], sorted(protect[layer])
        if not 1 <= n <= widths[layer]:
            raise PruneError(
                f"layer {layer}: cannot keep {n} of {widths[layer]} neurons (--keep / --keep-ratio leave at least one)"
            )
        if len(fixed) > n:
            raise PruneError(
                f"layer {layer}: {len(fixed)} protected neurons but a budget of {n}; raise the budget or protect fewer"
            )
        rest = [j for j in torch.argsort(score, descending=True, stable=True).tolist() if j not in protect[layer]]
        kept[layer] = sorted(fixed + rest[: n - len(fixed)])
    return kept


def _plan_global(scores: dict[int, torch.Tensor], total: int, protect: NeuronSet) -> dict[int, list[int]]:
    fixed = [(layer, j) for layer in scores for j in protect[layer]]
    if len(fixed) > total:
        raise PruneError(f"{len(fixed)} protected neurons but a global budget of {total}")
    candidates = [
        (float(s), layer, j)
        for layer, score in scores.items()
        for j, s in enumerate(score.tolist())
        if j not in protect[layer]
    ]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen = fixed + [(layer, j) for _, layer, j in candidates[: total - len(fixed)]]
    return {layer: sorted(j for layer_, j in chosen if layer_ == layer) for layer in scores}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(
    model: nn.Module,
    keep: int | dict[int, int] | None = None,
    protect: NeuronSet | None = None,
    ratio: float | None = None,
    criterion: str = "l1",
    scope: str = "layer",
    exact_protected: bool = False,
) -> PruneResult:
    """Prunes the FFNs of ``model`` in place to the budget; returns the kept indices and parameter counts."""
    before = count_parameters(model)
    kept = plan(neuron_scores(model, criterion), keep, ratio, protect, scope, exact_protected)
    for entry, ffn in enumerate(model_ffns(model), 1):
        ffn.keep(kept[entry])
    return PruneResult(kept, before, count_parameters(model), criterion)


def save_pruned(
    model: nn.Module,
    result: PruneResult,
    path: str | Path,
    source: str,
    revision: str | None = None,
    protected: dict[str, NeuronSet] | None = None,
    feature_extractor_from: str | None = None,
    keep_ratio: float | None = None,
) -> Path:
    """Writes config.json, neurostat.json and model.safetensors (and the feature-extractor config)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    EditRecord(
        edit="pruned",
        source_model=source,
        revision=revision,
        architecture=type(model).__name__,
        neurons={str(k): v for k, v in result.kept.items()},
        criterion=result.criterion,
        widths={str(k): len(v) for k, v in result.kept.items()},
        params_before=result.params_before,
        params_after=result.params_after,
        protected={name: json.loads(s.to_json()) for name, s in (protected or {}).items()},
        keep_ratio=keep_ratio,
    ).write(path)
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # tied weights (Whisper's output projection) are saved as copies
        v = v.detach().contiguous().cpu()
        state[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if feature_extractor_from:
        save_feature_extractor(feature_extractor_from, path)
    return path


def prune_checkpoint(
    model: str,
    out: str | Path,
    protect: list[str | Path] = (),
    ratio: float | None = None,
    keep: int | None = None,
    keep_protected_only: bool = False,
    scope: str = "layer",
    criterion: str = "l1",
    overwrite: bool = False,
    allow_other_model: bool = False,
) -> PruneResult:
    """Loads ``model`` (hub id or folder), prunes it with the neurons in the ``protect`` files never pruned,
    and saves the pruned checkpoint to ``out`` (what `neurostat prune` does): through a temporary folder
    renamed at the end; an existing ``out`` only with ``overwrite`` and only when it is a checkpoint, never one
    that is, holds or lies inside the source or a ``protect`` file."""
    model = model_source(model)
    check_checkpoint_out(out, model, protect)
    net = load_full_model(model)
    target = neuron_model(model, net)
    protected = {str(f): NeuronSet.load(f, model=target, allow_other_model=allow_other_model) for f in protect}
    union = NeuronSet()
    for s in protected.values():
        union = union | s
    result = prune(
        net,
        keep=keep,
        protect=union,
        ratio=ratio,
        criterion=criterion,
        scope=scope,
        exact_protected=keep_protected_only,
    )
    with checkpoint_folder(out, model, protect, overwrite) as tmp:
        save_pruned(net, result, tmp, model, getattr(net.config, "_commit_hash", None), protected, model, ratio)
    return result
