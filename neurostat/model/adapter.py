"""Model adapters for the wav2vec2 family in HF transformers (HuBERT, wav2vec 2.0, WavLM, data2vec).

The adapter finds the backbone inside task wrappers (``*ForCTC``, pretraining heads), exposes each
layer's FFN pieces (W1, b1, act, W2), runs batches without padding bias, and instruments the FFNs so
the engine sees ``a = act(W1 x + b1)`` as it is computed, without a second GEMM.

Batching, exact: every utterance's activations equal its own unpadded forward within float rounding.
The whole model runs on the padded batch.  Base models' group-norm front end normalises each channel
of the first convolution's output over time, padding included, so :func:`masked_group_norm` takes
those statistics per utterance over its valid positions only; the later convolutions are exact at
valid frames because a valid frame's receptive field lies inside its utterance (the frame-count rule
says so).  Layer-norm front ends normalise per frame and need nothing.  HF zeroes padded frames before
the positional convolution; data2vec-audio stacks several with layer norms, so padded frames are
zeroed again between them.  The Transformer runs with a boolean frame mask and SDPA attention.
``encode(..., front_end="per-utterance")`` runs the front end one utterance at a time instead: the
reference, and the default on a CPU, where it is faster (:func:`default_front_end`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import MODEL_DTYPES
from ..files import atomic_write, cache_root, sha1_file
from ..frames import FrameGeometry, default_geometry

MODEL_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")
_BACKBONE_ATTRS = ("hubert", "wav2vec2", "wavlm", "data2vec_audio")


class ModelError(ValueError):
    """A model that cannot be loaded or instrumented; the message names it."""


@dataclass
class FFN:
    """One layer's feed-forward block: ``out = W2 · act(W1 · x + b1) + b2``."""

    module: nn.Module
    up: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    down: nn.Linear

    @property
    def width(self) -> int:
        return self.up.out_features

    # the one place that knows the HF module's attribute names (wav2vec2, HuBERT, WavLM, data2vec-audio)
    def replace(self, up: nn.Linear, down: nn.Linear) -> None:
        """Swaps in new projections W1 and W2 (a pruned layer's), in the model and here."""
        self.module.intermediate_dense, self.module.output_dense = up, down
        self.up, self.down = up, down

    def hook_activation(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Passes the activation ``act(W1 x + b1)`` through ``fn`` on its way to W2 (a forward hook);
        returns the handle that removes it."""
        return self.module.intermediate_dropout.register_forward_hook(lambda module, inputs, out: fn(out))

    def forward_with(
        self, activation: Callable[[torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The block's forward with ``activation(x)`` in place of ``act(W1 x + b1)``, finishing as HF does."""
        module = self.module

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            return module.output_dropout(self.down(module.intermediate_dropout(activation(hidden_states))))

        return forward


DEMO = "demo"
"""The name that stands for the demo model neurostat ships, wherever a model source is taken."""
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "tiny" / "model"
"""The shipped demo model's folder (package data; :mod:`neurostat.tiny` trains and writes it)."""


def model_source(source: str) -> str:
    """``source`` as transformers takes it: ``demo`` becomes the shipped demo model's folder."""
    if source != DEMO:
        return source
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise ModelError(f"{DEMO_MODEL_DIR}: the demo model is missing from this installation; reinstall neurostat")
    return str(DEMO_MODEL_DIR)


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a model checkpoint (a ``config.json`` that names a model type, or what is
    left of a neurostat one: its ``neurostat.json``) — the only kind of folder ``prune``/``ablate
    --overwrite`` replace."""
    if (folder / "neurostat.json").is_file():
        return True
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


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
    check_model_type(config, source)
    return config


def check_model_type(config, name: str) -> None:
    """A config of a supported model family, or an error naming the model and the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ModelError(f"{name}: model type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")


def normalize_waveform(feature_extractor, wave: np.ndarray) -> np.ndarray:
    """The checkpoint's own waveform normalisation (its feature extractor), float32."""
    fe = feature_extractor
    return fe(wave, sampling_rate=fe.sampling_rate, return_tensors="np").input_values[0].astype(np.float32)


def _best_attention(device: torch.device, dtype: torch.dtype) -> str | None:
    """flash_attention_2 where it can run, else None (transformers' default: SDPA where supported)."""
    import importlib.util

    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def masked_group_norm(
    x: torch.Tensor, valid: torch.Tensor, norm: nn.GroupNorm, vectorized: bool | None = None
) -> torch.Tensor:
    """``norm(x)`` of a padded batch [B, C, T] with each utterance's statistics taken over its ``valid``
    [B] first positions only; padded positions come out as zeros.

    Two ways, the same result: ``vectorized`` (the default on CUDA: masked sums over the whole batch,
    fp32 statistics for half-precision inputs, no host sync) or the native group norm on each
    utterance's valid slice (the default on a CPU, where it is about 5x faster: one fused,
    cache-friendly pass per utterance instead of several over the whole batch)."""
    if vectorized is None:
        vectorized = x.device.type == "cuda"
    batch, channels, steps = x.shape
    groups = norm.num_groups
    if not vectorized:
        out = torch.zeros_like(x)
        for b, n in enumerate(valid.tolist()):
            out[b, :, :n] = F.group_norm(x[b : b + 1, :, :n], groups, norm.weight, norm.bias, norm.eps)[0]
        return out
    dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(dtype).view(batch, groups, channels // groups, steps)
    mask = (torch.arange(steps, device=x.device)[None] < valid[:, None]).to(dtype)[:, None, None, :]
    count = (valid.to(dtype) * (channels // groups))[:, None, None, None]
    mean = (h * mask).sum((2, 3), keepdim=True) / count
    centred = (h - mean) * mask
    var = (centred * centred).sum((2, 3), keepdim=True) / count
    y = (centred * torch.rsqrt(var + norm.eps)).view(batch, channels, steps)
    if norm.affine:
        y = (y * norm.weight.to(dtype)[None, :, None] + norm.bias.to(dtype)[None, :, None]) * mask.view(batch, 1, steps)
    return y.to(x.dtype)


FRONT_ENDS = ("batched", "per-utterance")


def default_front_end(device: torch.device | str) -> str:
    """``batched`` on a GPU; ``per-utterance`` on a CPU, where the padded batch's long convolution
    outputs thrash the caches (measured on 2 cores: 15-25 % slower than one utterance at a time)."""
    return "batched" if torch.device(device).type == "cuda" else "per-utterance"


def _backbone(model: nn.Module, name: str) -> nn.Module:
    if getattr(model, "config", None) is not None:
        check_model_type(model.config, name)
    if hasattr(model, "encoder") and hasattr(model, "feature_extractor"):
        return model
    for attr in _BACKBONE_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "encoder"):
            return inner
    raise ModelError(f"{name}: cannot find the speech encoder (expected a .encoder and a .feature_extractor)")


def _ffns(backbone: nn.Module, name: str) -> list[FFN]:
    layers = getattr(backbone.encoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ModelError(f"{name}: the encoder has no .layers")
    out = []
    for i, layer in enumerate(layers):
        ff = getattr(layer, "feed_forward", None)
        up, act, down = (getattr(ff, a, None) for a in ("intermediate_dense", "intermediate_act_fn", "output_dense"))
        if not (isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and callable(act)):
            raise ModelError(
                f"{name}: layer {i + 1} has no FFN with intermediate_dense / intermediate_act_fn / output_dense"
            )
        out.append(FFN(ff, up, act, down))
    return out


class ModelAdapter:
    """A loaded wav2vec2-family model, ready for instrumented, padding-safe batched forwards."""

    def __init__(self, model: nn.Module, feature_extractor, source: str = "<in-memory>", revision: str | None = None):
        self.source, self.revision = source, revision
        self.model = model.eval()
        self.backbone = _backbone(model, source)
        self.ffns = _ffns(self.backbone, source)
        self.feature_extractor = feature_extractor
        self.config = self.backbone.config
        self.geometry = FrameGeometry.from_config(self.config, feature_extractor.sampling_rate)
        self.weights: str | None = None  # SHA-1 of the weight files when loaded from a folder

    @classmethod
    def load(
        cls,
        source: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        attention: str = "auto",
    ) -> "ModelAdapter":
        """Loads a hub id or a local directory (the checkpoint must include its feature-extractor config).

        ``attention``: transformers' ``attn_implementation``; ``auto`` = flash_attention_2 on CUDA in half
        precision when the flash-attn package is installed, else SDPA where the model family supports
        it (WavLM does not), else eager.  :attr:`attention` says which one runs."""
        from transformers import AutoFeatureExtractor, AutoModel

        source = model_source(source)
        config = model_config(source, revision)
        try:
            feature_extractor = AutoFeatureExtractor.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"{source}: no feature-extractor config (preprocessor_config.json), needed for the sample "
                f"rate and waveform normalisation: {e}"
            ) from None
        if attention == "auto":
            attention = _best_attention(torch.device(device), dtype)
        model = _weights(AutoModel, source, revision=revision, dtype=dtype, attn_implementation=attention)
        adapter = cls(model.to(device), feature_extractor, source, revision or getattr(config, "_commit_hash", None))
        adapter.weights = weights_fingerprint(source)
        return adapter

    def hash_weights(self) -> str | None:
        """Hashes the weight files' content now, as a run does when it starts or resumes (the digest
        :meth:`load` took may come from the cache), and keeps it as :attr:`weights`."""
        self.weights = weights_fingerprint(self.source, fresh=True)
        return self.weights

    def check_geometry(self, geometry: FrameGeometry) -> None:
        """A prepared corpus's frame geometry must be this model's (else its frame labels are wrong)."""
        if geometry != self.geometry:
            raise ModelError(
                f"{self.source}: frame geometry {self.geometry.describe()} differs from the prepared corpus "
                f"({geometry.describe()}); re-run prepare with --model {self.source}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.ffns)

    @property
    def width(self) -> int:
        widths = {f.width for f in self.ffns}
        if len(widths) != 1:
            raise ModelError(f"{self.source}: layers have different FFN widths {sorted(widths)}")
        return widths.pop()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def describe(self) -> dict:
        return {
            "model": self.source,
            "revision": self.revision,
            "model_type": self.config.model_type,
            "num_layers": self.num_layers,
            "width": self.width,
            "hidden_size": self.config.hidden_size,
            "activation": str(self.config.hidden_act),
            "geometry": self.geometry.to_dict(),
            "normalize": bool(getattr(self.feature_extractor, "do_normalize", False)),
            "attention": self.attention,
            "weights_sha1": self.weights,
            **self._head(),
        }

    def _head(self) -> dict:
        """The checkpoint's class (its config's ``architectures``) and, for a fine-tuned one (CTC,
        classification), the head that collecting its encoder leaves out."""
        names = getattr(self.config, "architectures", None) or [type(self.model).__name__]
        arch = names[0]
        base = arch == type(self.backbone).__name__ or arch.endswith(("Model", "ForPreTraining"))
        return {"architecture": arch, "head": None if base else f"{arch}: its head is not collected, its encoder is"}

    @property
    def attention(self) -> str:
        """The attention implementation that runs (transformers' ``attn_implementation``)."""
        return str(getattr(self.config, "_attn_implementation", None) or "eager")

    def normalize(self, wave: np.ndarray) -> np.ndarray:
        """The checkpoint's own waveform normalisation (its feature extractor)."""
        return normalize_waveform(self.feature_extractor, wave)

    @torch.inference_mode()
    def encode(
        self, waves: list[torch.Tensor] | torch.Tensor, lengths=None, front_end: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the model on normalised waveforms — a list of 1-D tensors, or a zero-padded [B, L] batch
        with its ``lengths`` in samples — and returns (last hidden state [B, T, H], frame mask [B, T]).
        See the module docstring for why the result equals each utterance's unpadded forward;
        ``front_end``: ``batched`` or ``per-utterance`` (default: :func:`default_front_end`)."""
        front_end = front_end or default_front_end(self.device)
        if front_end not in FRONT_ENDS:
            raise ValueError(f"unknown front end {front_end!r}; choose from {FRONT_ENDS}")
        if isinstance(waves, torch.Tensor):
            lengths = [int(n) for n in lengths]
            waves = [waves[b, :n] for b, n in enumerate(lengths)] if front_end == "per-utterance" else waves
        else:
            lengths = [len(w) for w in waves]
            waves = waves if front_end == "per-utterance" else nn.utils.rnn.pad_sequence(waves, batch_first=True)
        counts = [self.geometry.num_frames(n) for n in lengths]
        frames = torch.tensor(counts, device=self.device)
        if front_end == "per-utterance":
            feats = [self._project(self._features(w.to(self.device, self.dtype)[None], None))[0] for w in waves]
            hidden = nn.utils.rnn.pad_sequence(feats, batch_first=True)
        else:
            x = waves.to(self.device, self.dtype, non_blocking=True)
            padded = min(lengths) < x.shape[1]  # without padding the model's own layers are exact
            hidden = self._project(self._features(x, torch.tensor(lengths, device=self.device) if padded else None))
            hidden = hidden[:, : max(counts)]
        mask = torch.arange(hidden.shape[1], device=self.device)[None] < frames[:, None]
        with self._masked_positional_convolution(mask):
            out = self.backbone.encoder(hidden, attention_mask=mask)
        return out[0], mask

    def _features(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """The conv front end on waveforms [B, L] → [B, T, C]; with ``lengths`` (a padded batch), a
        group norm takes its statistics over each utterance's valid positions only."""
        h = x[:, None]
        valid = lengths
        for layer in self.backbone.feature_extractor.conv_layers:
            conv = layer.conv
            if valid is not None:
                valid = (valid - conv.kernel_size[0]) // conv.stride[0] + 1
            norm = getattr(layer, "layer_norm", None)
            if valid is not None and isinstance(norm, nn.GroupNorm):
                h = layer.activation(masked_group_norm(conv(h), valid, norm))
            else:
                h = layer(h)
        return h.transpose(1, 2)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        proj = self.backbone.feature_projection(features)
        return proj[0] if isinstance(proj, tuple) else proj

    @contextmanager
    def _masked_positional_convolution(self, mask: torch.Tensor) -> Iterator[None]:
        """HF zeroes padded frames before the positional convolution; a stack of them (data2vec-audio)
        needs them zeroed again after each layer, or padding leaks into valid frames."""
        pos = self.backbone.encoder.pos_conv_embed
        layers = getattr(pos, "layers", None)
        if layers is None:
            yield
            return
        keep = mask[:, None, :]

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            h = hidden.transpose(1, 2)
            for layer in layers:
                h = layer(h) * keep.to(h.dtype)
            return h.transpose(1, 2)

        pos.forward = forward
        try:
            yield
        finally:
            del pos.forward

    @contextmanager
    def instrument(
        self, activation: Callable[[int, FFN, torch.Tensor], torch.Tensor], layers: list[int] | None = None
    ) -> Iterator[None]:
        """Within the block, each chosen layer's FFN gets ``a = activation(layer_index, ffn, x)`` — which
        must return ``act(W1 x + b1)`` [B, T, D] — and then finishes exactly as HF does."""
        chosen = range(self.num_layers) if layers is None else layers
        saved = []
        for i in chosen:
            ffn = self.ffns[i]
            saved.append((ffn.module, ffn.module.forward))
            ffn.module.forward = ffn.forward_with(functools.partial(activation, i, ffn))
        try:
            yield
        finally:
            for module, forward in saved:
                module.forward = forward

    def observe(self, sink: Callable[[int, torch.Tensor], None], layers: list[int] | None = None):
        """Instrumentation that only looks: ``sink(layer_index, a)`` sees each FFN activation."""

        def activation(index: int, ffn: FFN, x: torch.Tensor) -> torch.Tensor:
            a = ffn.act(ffn.up(x))
            sink(index, a)
            return a

        return self.instrument(activation, layers)


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


def weights_digest_file(folder: Path) -> Path:
    """Where the weight digest of the model folder ``folder`` is cached: in neurostat's cache, one file per
    folder (named by its resolved path), never inside the model's folder (read-only installs, shared models)."""
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()
    return cache_root() / "weights" / f"{key}.json"


def weights_fingerprint(source: str, fresh: bool = False) -> str | None:
    """SHA-1 over a local model folder's weight files (``*.safetensors``, ``*.bin``), cached by name, size and
    mtime in :func:`weights_digest_file`; None for a hub id (its revision names it).  The cache serves
    display only: ``fresh`` hashes the content whatever it says (what a run decides on, as weights edited
    in place can keep their size and mtime)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = weights_digest_file(folder)
    try:
        cached = json.loads(cache.read_text())
        if not fresh and cached["files"] == stamp:
            return cached["sha1"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha1("".join(f"{f.name}:{sha1_file(f)};" for f in files).encode()).hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps({"files": stamp, "sha1": digest}))
    except OSError:  # an unwritable cache: hash again next time
        pass
    return digest


def model_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (one of :data:`~neurostat.choices.MODEL_DTYPES`), or for
    ``auto`` the fast one on ``device``: bfloat16 on a GPU that computes it natively (compute capability
    8 and up), float16 on an older one, float32 on a CPU.  Half precision is safe for the statistics:
    they see the fp32-accumulated activations (``--stats-precision fp32``)."""
    if name == "auto":
        device = torch.device(device)
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if name not in MODEL_DTYPES:
        raise ModelError(f"--dtype {name!r} is not a model dtype; choose from auto, {', '.join(MODEL_DTYPES)}")
    return getattr(torch, name)


def resolve_device(device: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"--device {device}: this torch sees no CUDA device ({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
            "use --device cpu or auto"
        )
    return resolved


def load_geometry(source: str | None = None, sample_rate: int | None = None) -> FrameGeometry:
    """Frame geometry of a model from its config and feature-extractor config alone (``None``: the
    wav2vec2/HuBERT default), at ``sample_rate`` when given."""
    from transformers import AutoConfig, AutoFeatureExtractor

    if source is None:
        geometry = default_geometry()
    else:
        source = model_source(source)
        try:
            config = AutoConfig.from_pretrained(source)
            fe = AutoFeatureExtractor.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read the config of model {source!r}: {e}") from None
        geometry = FrameGeometry.from_config(config, fe.sampling_rate)
    if sample_rate is not None and sample_rate != geometry.sample_rate:
        geometry = FrameGeometry(sample_rate, geometry.conv_kernel, geometry.conv_stride)
    return geometry


def save_feature_extractor(source: str, out: str | Path) -> bool:
    """Copies a checkpoint's feature-extractor config into ``out``; False when it has none."""
    from transformers import AutoFeatureExtractor

    try:
        AutoFeatureExtractor.from_pretrained(model_source(source)).save_pretrained(out)
    except (OSError, ValueError):
        return False
    return True


def load_full_model(source: str, revision: str | None = None) -> nn.Module:
    """The checkpoint with its own head (the class its config names, e.g. HubertForCTC), for editing."""
    import transformers

    source = model_source(source)
    config = model_config(source, revision)
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)
    return _weights(cls, source, revision=revision).eval()


def model_ffns(model: nn.Module) -> list[FFN]:
    """The FFNs of a supported model (any wrapper), layer order."""
    name = getattr(model, "name_or_path", "model")
    return _ffns(_backbone(model, name), name)
