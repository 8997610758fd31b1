"""The one loader: a model source (hub id, HF folder, ablated or pruned neurostat checkpoint, ``demo``) →
its config and family (:func:`model_config`), an adapter of the family's input kind on a device
(:func:`load_adapter`), the full model with its head for editing (:func:`load_full_model`), or its frame
geometry from the configs alone (:func:`load_geometry`)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..frames import FrameGeometry, default_geometry
from .adapter import FFN, ModelAdapter, family_ffns
from .checkpoints import PruneError, model_source, pruned_record, weights_fingerprint
from .families import FILTERBANK, LOG_MEL, WAVEFORM, Family, ModelError, family_of
from .filterbank import FilterbankAdapter
from .provenance import FILE as PROVENANCE
from .provenance import EditRecord
from .wav2vec2 import WaveformAdapter
from .whisper import WhisperAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    WAVEFORM: WaveformAdapter,
    LOG_MEL: WhisperAdapter,
    FILTERBANK: FilterbankAdapter,
}
"""The adapter of each input kind."""


def model_config(source: str, revision: str | None = None):
    """The HF config of a local folder or hub id, of a supported family; a clear error otherwise (a hub id
    that cannot be fetched: whether it must be in the HF cache, and how to fail at once without network)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        if not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
            raise ModelError(f"cannot load model {source!r}: no such directory") from None
        if Path(source).exists():
            raise ModelError(f"cannot load model {source!r} as a directory: {e}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        hint = "offline runs need it in the HF cache" if offline else "without network, HF_HUB_OFFLINE=1 fails at once"
        raise ModelError(f"cannot load model {source!r} as a hub id ({hint}): {e}") from None
    family_of(config, source)
    return config


def _feature_extractor(source: str, revision: str | None = None):
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{source}: no feature-extractor config (preprocessor_config.json), needed for the sample rate and "
            f"the input features: {e}"
        ) from None


def _best_attention(device: torch.device, dtype: torch.dtype) -> str | None:
    """flash_attention_2 where it can run, else None (transformers' default: SDPA where supported)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def _weights(cls, source: str, **kwargs) -> nn.Module:
    """``cls.from_pretrained(source)``; missing or unreadable weights are a ModelError naming the model."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{source}: cannot load the model's weights ({type(e).__name__}: {first}); a model folder needs a "
            "readable model.safetensors (or pytorch_model.bin) beside its config.json"
        ) from None


def adapter_for(
    model: nn.Module, feature_extractor, source: str = "<in-memory>", revision: str | None = None
) -> ModelAdapter:
    """The adapter of a loaded model's family (its input kind's :data:`ADAPTERS` class)."""
    family = family_of(model.config, source)
    return ADAPTERS[family.input](model, feature_extractor, family, source, revision)


@dataclass(frozen=True)
class ModelSource:
    """A model source resolved, before its weights load: where it is, its config and family, its revision and
    (a pruned checkpoint) its edit record."""

    source: str
    config: object
    family: Family
    revision: str | None = None
    pruned: EditRecord | None = None

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, attention: str = "auto"):
        """The adapter of the model on ``device`` in ``dtype`` (see :func:`load_adapter`)."""
        from transformers import AutoModel

        feature_extractor = _feature_extractor(self.source, self.revision)
        if self.pruned is not None:
            model = load_pruned(self.source, device).to(dtype=dtype)
        else:
            if attention == "auto":
                attention = _best_attention(torch.device(device), dtype)
            model = _weights(
                AutoModel, self.source, revision=self.revision, dtype=dtype, attn_implementation=attention
            ).to(device)
        revision = self.revision or getattr(self.config, "_commit_hash", None)
        adapter = ADAPTERS[self.family.input](model, feature_extractor, self.family, self.source, revision)
        adapter.weights = weights_fingerprint(self.source)
        if self.pruned is not None:  # each entry's neurons are the source model's kept ones
            adapter.kept = {int(entry) - 1: list(kept) for entry, kept in self.pruned.neurons.items()}
            adapter.pruned_from = self.pruned.source_model
        return adapter


def open_model(source: str, revision: str | None = None) -> ModelSource:
    """A model source (hub id, folder, ``demo``) resolved to its config and family, weights not loaded yet."""
    source = model_source(source)
    config = model_config(source, revision)
    return ModelSource(source, config, family_of(config, source), revision, pruned_record(source))


def load_adapter(
    source: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    attention: str = "auto",
) -> ModelAdapter:
    """Any checkpoint neurostat reads, ready for batched forwards: a hub id, an HF folder (an ablated checkpoint
    is one), a pruned neurostat checkpoint, or ``demo``; it must include its feature-extractor config.

    ``attention``: transformers' ``attn_implementation``; ``auto`` = flash_attention_2 on CUDA in half
    precision when the flash-attn package is installed, else SDPA where the model family supports it (WavLM
    does not), else eager.  :attr:`ModelAdapter.attention` says which one runs."""
    return open_model(source, revision).load(device, dtype, attention)


def load_full_model(source: str, revision: str | None = None) -> nn.Module:
    """The checkpoint with its own head (the class its config names, e.g. HubertForCTC), for editing."""
    import transformers

    source = model_source(source)
    config = model_config(source, revision)
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)
    return _weights(cls, source, revision=revision).eval()


def model_ffns(model: nn.Module) -> list[FFN]:
    """The layer axis of a supported model (any wrapper): every FFN, in order, named."""
    name = getattr(model, "name_or_path", None) or "model"
    family = family_of(model.config, name)
    return family_ffns(family, family.find_backbone(model, name), name)


def load_geometry(source: str | None = None, sample_rate: int | None = None) -> FrameGeometry:
    """Frame geometry of a model from its config and feature-extractor config alone (``None``: the
    wav2vec2/HuBERT default), at ``sample_rate`` when given."""
    if source is None:
        geometry = default_geometry()
    else:
        source = model_source(source)
        try:
            config = model_config(source)
        except ModelError as e:
            raise ModelError(f"cannot read the config of model {source!r}: {e}") from None
        fe = _feature_extractor(source)
        geometry = family_of(config, source).geometry(config, fe, source)
    if sample_rate is not None and sample_rate != geometry.sample_rate:
        geometry = geometry.at_rate(sample_rate)
    return geometry


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuilds a pruned model exactly from :func:`~neurostat.model.pruning.save_pruned`'s directory (no
    pickles, strict): the class its record names, built from its config, each entry's FFN sliced to its width."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    record = pruned_record(str(path))
    if record is None:
        raise PruneError(f"{path} is not a neurostat pruned checkpoint (no pruned record in {PROVENANCE})")
    config = transformers.AutoConfig.from_pretrained(path)
    family = family_of(config, str(path))
    cls = getattr(transformers, record.architecture, None)
    if cls is None:
        raise PruneError(f"{path / PROVENANCE}: unknown architecture {record.architecture!r}")
    model = cls(config)
    ffns = family_ffns(family, family.find_backbone(model, str(path)), str(path))
    for entry, ffn in enumerate(ffns, 1):
        ffn.keep(list(range(record.widths[str(entry)])))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval().to(device)
