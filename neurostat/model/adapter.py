"""Model adapters for the wav2vec2 family in HF transformers (HuBERT, wav2vec 2.0, WavLM, data2vec) and
for Whisper's encoder (:class:`WhisperAdapter`).

The adapter finds the backbone inside task wrappers (``*ForCTC``, pretraining heads), exposes each
layer's FFN pieces (W1, b1, act, W2), runs batches without padding bias, and instruments the FFNs so
the engine sees ``a = act(W1 x + b1)`` as it is computed, without a second GEMM.

Batching, exact: every utterance's activations equal its own unpadded forward within float rounding.
The whole model runs on the padded batch.  Base models' group-norm front end normalises each channel
of the first convolution's output over time, padding included, so the batched front ends take those
statistics per utterance over its valid positions only; the later convolutions are exact at valid
frames because a valid frame's receptive field lies inside its utterance (the frame-count rule says
so).  Layer-norm front ends normalise per frame and need nothing.  HF zeroes padded frames before the
positional convolution; data2vec-audio stacks several with layer norms, so padded frames are zeroed
again between them.  The Transformer runs with a boolean frame mask and SDPA attention.

Three front ends (:data:`~neurostat.choices.FRONT_ENDS`), exact alike: ``gemm`` (the default,
:func:`default_front_end`) keeps activations channels-last and runs each convolution as GEMMs on
strided views of one flat buffer (:func:`gemm_features`), which reach tensor cores on a GPU where
cuDNN's kernels for these convolutions do not; ``batched`` runs the model's own convolutions on the
padded batch (:func:`masked_group_norm`); ``per-utterance`` runs the model's modules one utterance at
a time: the reference.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..choices import FRONT_ENDS, MODEL_DTYPES
from ..files import atomic_write, cache_root, sha1_file
from ..frames import FrameGeometry, default_geometry

MODEL_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio", "whisper")
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

    @contextmanager
    def instrumented(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block the FFN computes ``activation(x)`` in place of ``act(W1 x + b1)``."""
        module, previous = self.module, self.module.forward
        module.forward = self.forward_with(activation)
        try:
            yield
        finally:
            module.forward = previous


class _Computed(nn.Module):
    """A module that computes ``fn(x)`` (an instrumented activation standing in for a projection)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@dataclass
class WhisperFFN(FFN):
    """A Whisper encoder layer's FFN (``fc1`` → ``activation_fn`` → ``fc2``), which lives in the layer itself:
    ``module`` is the layer."""

    def replace(self, up: nn.Linear, down: nn.Linear) -> None:
        self.module.fc1, self.module.fc2 = up, down
        self.up, self.down = up, down

    def hook_activation(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        return self.module.activation_fn.register_forward_hook(lambda module, inputs, out: fn(out))

    @contextmanager
    def instrumented(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block the layer's ``fc1`` computes ``activation(x)`` and its ``activation_fn`` passes
        that on unchanged, so the layer finishes (dropout, ``fc2``, residual) exactly as HF does."""
        layer = self.module
        previous = layer.fc1, layer.activation_fn
        layer.fc1, layer.activation_fn = _Computed(activation), nn.Identity()
        try:
            yield
        finally:
            layer.fc1, layer.activation_fn = previous


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


def computes_features(feature_extractor) -> bool:
    """Whether the feature extractor makes features of the waveform (Whisper's log-mel), which the adapter
    computes batch by batch, rather than a normalised waveform (the wav2vec2 family)."""
    return "input_features" in getattr(feature_extractor, "model_input_names", ())


def normalize_waveform(feature_extractor, wave: np.ndarray) -> np.ndarray:
    """The checkpoint's own waveform normalisation (its feature extractor), float32; a feature extractor that
    computes features (:func:`computes_features`) takes the waveform as it is."""
    fe = feature_extractor
    if computes_features(fe):
        return np.asarray(wave, dtype=np.float32)
    return fe(wave, sampling_rate=fe.sampling_rate, return_tensors="np").input_values[0].astype(np.float32)


def _best_attention(device: torch.device, dtype: torch.dtype) -> str | None:
    """flash_attention_2 where it can run, else None (transformers' default: SDPA where supported)."""
    import importlib.util

    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def _host_values(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A few host numbers as a tensor on ``device``.  On a GPU the copy comes from pinned memory without
    blocking: ``torch.tensor(values, device=...)`` would make the host wait for the device's queue."""
    out = torch.tensor(values, dtype=dtype)
    return out.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else out


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


@dataclass(frozen=True)
class ConvGemm:
    """One layer of the conv feature encoder laid out for GEMMs on channels-last activations:
    ``weight`` [kernel·C_in, C_out] has row ``j·C_in + c`` for tap j and input channel c, so a window of
    ``kernel`` consecutive frames, read as one row of a flat [frames, C] buffer, times ``weight`` is
    the convolution at that window.  ``norm`` and ``activation`` are the model's own modules."""

    kernel: int
    stride: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    norm: nn.Module | None
    activation: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer: nn.Module) -> ConvGemm:
        """The HF conv layer ``layer`` (conv, optional group/layer norm, activation) re-laid-out."""
        conv = layer.conv
        if conv.padding != (0,) or conv.dilation != (1,) or conv.groups != 1:
            raise ModelError("the gemm front end needs unpadded, undilated, ungrouped feature convolutions")
        weight = conv.weight.detach().permute(2, 1, 0).reshape(-1, conv.out_channels).contiguous()
        bias = None if conv.bias is None else conv.bias.detach()
        norm = getattr(layer, "layer_norm", None)
        return cls(conv.kernel_size[0], conv.stride[0], weight, bias, norm, layer.activation)

    def group_norm_affine(self, h: torch.Tensor, valid: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each [B, 1, C_out], such that ``y · scale + shift`` is this layer's group norm
        of its convolution ``y`` of the padded channels-last batch ``h`` [B, T, C_in], with utterance b's
        statistics taken over its ``valid[b]`` first output frames only, as its unpadded forward takes them.

        The convolution is linear, so each channel's mean and variance over the valid frames follow from
        the mean and covariance of the input windows (a window is ``kernel·C_in`` values: 10 samples for
        the first layer), taken in float64 and two-pass, masked and batched: no pass over the output."""
        batch, steps, channels = h.shape
        frames, width = (steps - self.kernel) // self.stride + 1, self.kernel * channels
        windows = h.as_strided((batch, frames, width), (steps * channels, self.stride * channels, 1)).double()
        count = _host_values(valid, h.device, torch.float64).clamp(min=1)[:, None]
        mask = (torch.arange(frames, device=h.device)[None] < count)[..., None]
        mean = (windows * mask).sum(1) / count
        centred = (windows - mean[:, None]) * mask
        cov = centred.transpose(1, 2) @ centred / count[..., None]
        weight = self.weight.double()
        channel_mean = mean @ weight + (0 if self.bias is None else self.bias.double())
        channel_var = ((cov @ weight) * weight).sum(1)
        groups = self.norm.num_groups
        by_group = channel_mean.view(batch, groups, -1)
        group_mean = by_group.mean(2, keepdim=True)
        group_var = (channel_var.view(batch, groups, -1) + (by_group - group_mean) ** 2).mean(2, keepdim=True)
        scale = torch.rsqrt(group_var + self.norm.eps).expand_as(by_group).reshape(batch, -1)
        shift = -group_mean.expand_as(by_group).reshape(batch, -1) * scale
        if self.norm.affine:
            weight, bias = self.norm.weight.double(), self.norm.bias.double()
            scale, shift = scale * weight, shift * weight + bias
        dtype = torch.promote_types(h.dtype, torch.float32)
        return scale[:, None].to(dtype), shift[:, None].to(dtype)

    def finish(self, h: torch.Tensor, valid: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The rest of the layer after its convolution, per frame (its norm, then its activation), for the
        batch whose input is ``h`` [B, T, C_in] and whose utterances have ``valid`` output frames."""
        if isinstance(self.norm, nn.GroupNorm):
            scale, shift = self.group_norm_affine(h, valid)
            return lambda y: self.activation(torch.addcmul(shift, y, scale).to(y.dtype))
        if self.norm is None:
            return self.activation
        return lambda y: self.activation(self.norm(y))

    def convolve(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Writes the convolution of a flat channels-last batch ``h`` [B·T, C_in], T a multiple of the
        stride, into ``out`` [B·T/stride, C_out]: row r reads rows r·stride … r·stride + kernel − 1.  The
        last rows, whose window would run past the buffer, are the last utterance's padding: zeros.

        The windows are a strided view (rows ``stride·C_in`` apart): one GEMM when a window is no wider
        than the stride, else one GEMM per block of ``stride`` taps accumulated into ``out`` (no copy),
        unless a window is narrower than an output row (the first layer's few samples): then copying
        the windows for one GEMM costs less than another pass over the output."""
        channels, rows = h.shape[1], out.shape[0]
        full = rows - (max(self.kernel - self.stride, 0) + self.stride - 1) // self.stride
        out[full:].zero_()
        if self.kernel <= self.stride or self.kernel * channels < out.shape[1]:
            blocks = [(0, self.kernel)]
        else:
            blocks = [(j, min(j + self.stride, self.kernel)) for j in range(0, self.kernel, self.stride)]
        for i, (first, last) in enumerate(blocks):
            size, offset = (full, (last - first) * channels), h.storage_offset() + first * channels
            x = h.as_strided(size, (self.stride * channels, 1), offset)
            x, w = x.contiguous() if last - first > self.stride else x, self.weight[first * channels : last * channels]
            if i:
                out[:full].addmm_(x, w)
            elif self.bias is None:
                torch.mm(x, w, out=out[:full])
            else:
                torch.addmm(self.bias, x, w, out=out[:full])
        return out


class Workspace:
    """Two grow-only scratch buffers that the gemm front end's layers write their outputs into, kept
    between batches: on a CPU a buffer of more than 32 MB is fresh pages from the kernel at every
    allocation (glibc); faulting them in made a new 128 MB tensor cost 5x a reused one (2 cores)."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """A [rows, C] view of buffer ``slot`` (0 or 1) in ``like``'s dtype and device, contents undefined."""
        buffer = self._buffers.get(slot)
        numel = shape[0] * shape[1]
        if buffer is None or buffer.numel() < numel or (buffer.dtype, buffer.device) != (like.dtype, like.device):
            buffer = self._buffers[slot] = like.new_empty(numel)
        return buffer[:numel].view(shape)


BLOCK_ELEMENTS = 1 << 21
"""Elements per block of a layer's norm and activation on a CPU (8 MB in fp32): their temporaries stay
in the allocator's reused heap and the block in the caches; on a GPU each runs on the whole layer."""


def _framewise(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """``fn`` (per frame, shape-preserving) on a channels-last batch [B, T, C]: on a CPU written back into
    ``h`` block by block of frames (:data:`BLOCK_ELEMENTS`), elsewhere in one call."""
    step = max(1, BLOCK_ELEMENTS // (h.shape[0] * h.shape[2]))
    if h.device.type != "cpu" or step >= h.shape[1]:
        return fn(h)
    for t in range(0, h.shape[1], step):
        block = h[:, t : t + step]
        block.copy_(fn(block))
    return h


def gemm_features(
    layers: list[ConvGemm], x: torch.Tensor, lengths: list[int], workspace: Workspace | None = None
) -> torch.Tensor:
    """The conv feature encoder on a padded batch of waveforms [B, L] as channels-last GEMMs → [B, T, C]
    (T ≥ every utterance's frame count; frames past an utterance's own count are padding).

    Each utterance is padded to a multiple of the product of the strides, so the whole batch is one flat
    [B·T, C] buffer at every layer and each convolution one strided view of it (:class:`ConvGemm`); a
    valid frame's window lies inside its utterance, so the rows that straddle two utterances are padding.
    A group norm takes each utterance's statistics over its valid frames (:meth:`ConvGemm.group_norm_affine`);
    a layer norm is per frame and exact as it is.  ``workspace`` holds the layers' outputs."""
    workspace = workspace or Workspace()
    batch = x.shape[0]
    span = int(np.prod([layer.stride for layer in layers]))
    h = F.pad(x, (0, -x.shape[1] % span)).reshape(-1, 1)
    valid = list(lengths)
    for i, layer in enumerate(layers):
        valid = [(n - layer.kernel) // layer.stride + 1 for n in valid]
        finish = layer.finish(h.view(batch, -1, h.shape[1]), valid)
        out = layer.convolve(h, workspace.take(i % 2, (h.shape[0] // layer.stride, layer.weight.shape[1]), h))
        h = _framewise(finish, out.view(batch, -1, out.shape[1])).reshape(out.shape)
    return h.view(batch, -1, h.shape[1]).clone()


def default_front_end(device: torch.device | str) -> str:
    """``gemm`` on every device: on a GPU its GEMMs run on tensor cores (the model's convolutions went to
    cuDNN's SIMT kernels, 58 % of an H200's time); on 2 CPU cores it was the fastest of the three
    (bench/RESULTS.md)."""
    return "gemm"


def _parameters_key(parameters) -> tuple:
    """What identifies the current values of ``parameters``: each one's storage, version, dtype and device
    (an in-place update through torch bumps the version; ``.to()`` or a reload changes the storage)."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)


def _backbone(model: nn.Module, name: str) -> nn.Module:
    if getattr(model, "config", None) is not None:
        check_model_type(model.config, name)
        if model.config.model_type == "whisper":
            return _whisper_backbone(model, name)
    if hasattr(model, "encoder") and hasattr(model, "feature_extractor"):
        return model
    for attr in _BACKBONE_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "encoder"):
            return inner
    raise ModelError(f"{name}: cannot find the speech encoder (expected a .encoder and a .feature_extractor)")


def _whisper_backbone(model: nn.Module, name: str) -> nn.Module:
    """The ``WhisperModel`` of a Whisper checkpoint (itself, or inside ``WhisperForConditionalGeneration``)."""
    for candidate in (model, getattr(model, "model", None)):
        encoder = getattr(candidate, "encoder", None)
        if isinstance(encoder, nn.Module) and hasattr(encoder, "conv1") and hasattr(encoder, "layers"):
            return candidate
    raise ModelError(f"{name}: cannot find the Whisper encoder (expected .encoder with .conv1 and .layers)")


def _ffns(backbone: nn.Module, name: str) -> list[FFN]:
    layers = getattr(backbone.encoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ModelError(f"{name}: the encoder has no .layers")
    if backbone.config.model_type == "whisper":
        return [_whisper_ffn(layer, i, name) for i, layer in enumerate(layers)]
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


def _whisper_ffn(layer: nn.Module, index: int, name: str) -> WhisperFFN:
    up, act, down = (getattr(layer, a, None) for a in ("fc1", "activation_fn", "fc2"))
    if not (isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and isinstance(act, nn.Module)):
        raise ModelError(f"{name}: encoder layer {index + 1} has no FFN with fc1 / activation_fn / fc2")
    return WhisperFFN(layer, up, act, down)


class ModelAdapter:
    """A loaded wav2vec2-family model, ready for instrumented, padding-safe batched forwards."""

    def __init__(self, model: nn.Module, feature_extractor, source: str = "<in-memory>", revision: str | None = None):
        self.source, self.revision = source, revision
        self.model = model.eval()
        self.backbone = _backbone(model, source)
        self.ffns = _ffns(self.backbone, source)
        self.feature_extractor = feature_extractor
        self.config = self.backbone.config
        self.geometry = self._geometry()
        self.weights: str | None = None  # SHA-1 of the weight files when loaded from a folder
        self._gemm_cache: tuple[tuple, list[ConvGemm]] | None = None
        self._workspace = Workspace()
        self._pos_weight_cache: tuple[tuple, torch.Tensor] | None = None

    def _geometry(self) -> FrameGeometry:
        """The frame geometry of the config's conv front end (a Whisper model needs :class:`WhisperAdapter`)."""
        if self.config.model_type == "whisper":
            raise ModelError(
                f"{self.source}: a Whisper model needs a WhisperAdapter (ModelAdapter.load and adapter_for pick it)"
            )
        return FrameGeometry.from_config(self.config, self.feature_extractor.sampling_rate)

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
        revision = revision or getattr(config, "_commit_hash", None)
        adapter = adapter_for(model.to(device), feature_extractor, source, revision)
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
            "activation": self.activation_name,
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

    def resolve_front_end(self, choice: str) -> str:
        """The front end a ``--front-end`` choice runs: ``auto`` is :func:`default_front_end`."""
        return default_front_end(self.device) if choice == "auto" else choice

    @property
    def activation_name(self) -> str:
        """The FFN activation's name in the config (``gelu``: what the fused kernels compute)."""
        return str(self.config.hidden_act)

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
        ``front_end``: one of :data:`~neurostat.choices.FRONT_ENDS` (default: :func:`default_front_end`)."""
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
        frames = _host_values(counts, self.device)
        if front_end == "per-utterance":
            feats = [self._project(self._features(w.to(self.device, self.dtype)[None], None))[0] for w in waves]
            hidden = nn.utils.rnn.pad_sequence(feats, batch_first=True)
        elif front_end == "gemm":
            x = waves.to(self.device, self.dtype, non_blocking=True)
            features = gemm_features(self._conv_gemms(), x, lengths, self._workspace)
            hidden = self._project(features[:, : max(counts)])
        else:
            x = waves.to(self.device, self.dtype, non_blocking=True)
            padded = min(lengths) < x.shape[1]  # without padding the model's own layers are exact
            hidden = self._project(self._features(x, _host_values(lengths, self.device) if padded else None))
            hidden = hidden[:, : max(counts)]
        mask = torch.arange(hidden.shape[1], device=self.device)[None] < frames[:, None]
        with self._positional_convolution(mask):
            out = self.backbone.encoder(hidden, attention_mask=mask)
        return out[0], mask

    def _conv_gemms(self) -> list[ConvGemm]:
        """The feature encoder's layers re-laid-out for :func:`gemm_features`, rebuilt only when a
        parameter of the feature encoder changed (:func:`_parameters_key`)."""
        encoder = self.backbone.feature_extractor
        key = _parameters_key(encoder.parameters())
        if self._gemm_cache is None or self._gemm_cache[0] != key:
            self._gemm_cache = key, [ConvGemm.of(layer) for layer in encoder.conv_layers]
        return self._gemm_cache[1]

    def _features(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """The conv front end on waveforms [B, L] → [B, T, C] through the model's own modules; with
        ``lengths`` (a padded batch), a group norm takes its statistics over each utterance's valid
        positions only."""
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

    def _positional_weight(self, conv: nn.Conv1d) -> torch.Tensor:
        """The weight-normed positional convolution's weight, which HF recomputes at every forward:
        computed once and kept until its parameters change (:func:`_parameters_key`)."""
        key = _parameters_key(conv.parametrizations.weight.parameters())
        if self._pos_weight_cache is None or self._pos_weight_cache[0] != key:
            self._pos_weight_cache = key, conv.weight
        return self._pos_weight_cache[1]

    @contextmanager
    def _positional_convolution(self, mask: torch.Tensor) -> Iterator[None]:
        """Within the block the positional convolution runs as HF runs it, with two changes: a
        weight-normed one uses :meth:`_positional_weight`; a stack of them (data2vec-audio) has padded
        frames zeroed after each layer (HF zeroes them only before the first), or padding leaks into
        valid frames."""
        pos = self.backbone.encoder.pos_conv_embed
        layers = getattr(pos, "layers", None)
        conv = getattr(pos, "conv", None)
        if layers is not None:
            keep = mask[:, None, :]

            def forward(hidden: torch.Tensor) -> torch.Tensor:
                h = hidden.transpose(1, 2)
                for layer in layers:
                    h = layer(h) * keep.to(h.dtype)
                return h.transpose(1, 2)

            patched = pos
        elif conv is not None and parametrize.is_parametrized(conv, "weight") and conv.padding_mode == "zeros":

            def forward(h: torch.Tensor) -> torch.Tensor:
                weight = self._positional_weight(conv)
                return F.conv1d(h, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

            patched = conv
        else:
            yield
            return
        patched.forward = forward
        try:
            yield
        finally:
            del patched.forward

    @contextmanager
    def instrument(
        self, activation: Callable[[int, FFN, torch.Tensor], torch.Tensor], layers: list[int] | None = None
    ) -> Iterator[None]:
        """Within the block, each chosen layer's FFN gets ``a = activation(layer_index, ffn, x)`` — which
        must return ``act(W1 x + b1)`` [B, T, D] — and then finishes exactly as HF does."""
        chosen = range(self.num_layers) if layers is None else layers
        with ExitStack() as stack:
            for i in chosen:
                ffn = self.ffns[i]
                stack.enter_context(ffn.instrumented(functools.partial(activation, i, ffn)))
            yield

    def observe(self, sink: Callable[[int, torch.Tensor], None], layers: list[int] | None = None):
        """Instrumentation that only looks: ``sink(layer_index, a)`` sees each FFN activation."""

        def activation(index: int, ffn: FFN, x: torch.Tensor) -> torch.Tensor:
            a = ffn.act(ffn.up(x))
            sink(index, a)
            return a

        return self.instrument(activation, layers)


WHISPER_FRONT_END = "whisper-log-mel"
"""The name a store records for Whisper's front end."""


class WhisperAdapter(ModelAdapter):
    """Whisper's encoder, from a ``WhisperModel`` or ``WhisperForConditionalGeneration`` checkpoint (the
    decoder and the head never run).

    Whisper sees fixed windows of the feature extractor's ``n_samples`` (``chunk_length`` seconds): the
    engine cuts utterances at window boundaries (:attr:`~neurostat.frames.FrameGeometry.window`), so every
    waveform of a batch fits one window.  Each is zero-padded to the window and made log-mel features by the
    checkpoint's own ``WhisperFeatureExtractor``'s operations (its torch STFT and mel filters, run on the
    device), as Whisper does itself; then the encoder runs on the whole batch of windows at once.
    Whisper's encoder has no attention mask: a window's padding is part of its input, as when Whisper
    transcribes it, so each window's activations equal its own batch-1 forward within float rounding.  The
    frames whose centre lies past the audio (:meth:`~neurostat.frames.FrameGeometry.num_frames`) are masked
    out: never tokens."""

    _stft: tuple[torch.Tensor, torch.Tensor] | None = None
    """The STFT window and the feature extractor's mel filters [frequencies, mel bins] on the device (made on
    first use)."""

    def _geometry(self) -> FrameGeometry:
        """The frame geometry of the feature extractor and the encoder's own convolutions (kernel, padding,
        stride), which must be the geometry the config alone gives (what ``prepare --model`` labels by)."""
        if self.config.model_type != "whisper":
            raise ModelError(f"{self.source}: model type {self.config.model_type!r} is not Whisper")
        fe, encoder = self.feature_extractor, self.backbone.encoder
        missing = [a for a in ("n_fft", "hop_length", "n_samples", "chunk_length") if not hasattr(fe, a)]
        if missing:
            raise ModelError(
                f"{self.source}: its feature extractor ({type(fe).__name__}) is not Whisper's (no {', '.join(missing)})"
            )
        if getattr(fe, "dither", 0.0):
            raise ModelError(
                f"{self.source}: its feature extractor dithers (dither={fe.dither}), which makes the log-mel "
                "features random; save it with dither=0.0"
            )
        if fe.feature_size != self.config.num_mel_bins:
            raise ModelError(
                f"{self.source}: the feature extractor makes {fe.feature_size} mel bins, the encoder takes "
                f"{self.config.num_mel_bins}"
            )
        convs = [encoder.conv1, encoder.conv2]
        try:
            geometry = FrameGeometry.whisper(self.config, fe, tuple((c.kernel_size[0], c.padding[0]) for c in convs))
            expected = FrameGeometry.from_config(self.config, fe.sampling_rate, fe)
        except ValueError as e:
            raise ModelError(f"{self.source}: {e}") from None
        if geometry != expected or tuple(c.stride[0] for c in convs) != geometry.conv_stride[1:]:
            raise ModelError(
                f"{self.source}: the encoder's convolutions (kernel, stride, padding) "
                f"{[(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs]} are not Whisper's "
                f"({geometry.describe()} from the config)"
            )
        return geometry

    @property
    def activation_name(self) -> str:
        return str(self.config.activation_function)

    def resolve_front_end(self, choice: str) -> str:
        """Whisper's own front end (log-mel, then the encoder's convolutions): ``--front-end`` chooses among
        the wav2vec2 family's."""
        if choice != "auto":
            raise ModelError(f"--front-end {choice}: {self.source} is Whisper, whose log-mel front end is its own")
        return WHISPER_FRONT_END

    def _head(self) -> dict:
        """The checkpoint's class; the decoder (and a generation head) that collecting its encoder leaves out."""
        names = getattr(self.config, "architectures", None) or [type(self.model).__name__]
        arch = names[0]
        left = "its decoder is" if arch == type(self.backbone).__name__ else "its decoder and head are"
        return {"architecture": arch, "head": f"{arch}: {left} not collected, its encoder is"}

    def log_mel(self, batch: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel features [B, mel bins, mel frames] of a batch [B, L] of waveforms of at most one
        window each (``lengths`` in samples, on the batch's device), each padded to the window with the
        extractor's padding value: the operations of the checkpoint's ``WhisperFeatureExtractor`` (its torch
        STFT, its mel filters), run where the batch is, so a batch on the GPU never goes back to the host
        (tests: equal to the extractor's output)."""
        fe = self.feature_extractor
        batch = batch[:, : fe.n_samples].to(torch.float32)
        past = torch.arange(batch.shape[1], device=batch.device)[None] >= lengths[:, None]
        batch = nn.functional.pad(
            batch.masked_fill(past, fe.padding_value), (0, fe.n_samples - batch.shape[1]), value=fe.padding_value
        )
        if self._stft is None or self._stft[0].device != batch.device:
            with torch.inference_mode(False):  # plain tensors, usable outside encode's inference mode too
                window = torch.hann_window(fe.n_fft, device=batch.device)
                self._stft = window, torch.from_numpy(fe.mel_filters).to(batch.device, torch.float32)
        window, filters = self._stft
        stft = torch.stft(batch, fe.n_fft, fe.hop_length, window=window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log = (filters.T @ power).clamp(min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return ((log + 4.0) / 4.0).to(self.dtype)

    @torch.inference_mode()
    def encode(
        self, waves: list[torch.Tensor] | torch.Tensor, lengths=None, front_end: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the encoder on waveforms of at most one window each — a list of 1-D tensors, or a zero-padded
        [B, L] batch with its ``lengths`` in samples — and returns (last hidden state [B, F, H], frame mask
        [B, F]), F the window's frames.  ``front_end`` is the wav2vec2 family's choice: Whisper has one."""
        if isinstance(waves, torch.Tensor):
            lengths = [int(n) for n in lengths]
        else:
            lengths = [len(w) for w in waves]
            waves = nn.utils.rnn.pad_sequence(list(waves), batch_first=True)
        window = self.geometry.window
        if any(n > window for n in lengths):
            raise ModelError(
                f"{self.source}: Whisper takes windows of at most {window} samples "
                f"({self.feature_extractor.chunk_length} s), got {max(lengths)}; cut utterances into windows"
            )
        hidden = self.backbone.encoder(self.log_mel(waves.to(self.device), _host_values(lengths, self.device)))[0]
        frames = _host_values([self.geometry.num_frames(n) for n in lengths], self.device)
        mask = torch.arange(hidden.shape[1], device=self.device)[None] < frames[:, None]
        return hidden, mask


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
    try:
        cache = weights_digest_file(folder)
        cached = json.loads(cache.read_text())
        if not fresh and cached["files"] == stamp:
            return cached["sha1"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha1("".join(f"{f.name}:{sha1_file(f)};" for f in files).encode()).hexdigest()
    try:
        cache = weights_digest_file(folder)
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


def adapter_for(
    model: nn.Module, feature_extractor, source: str = "<in-memory>", revision: str | None = None
) -> ModelAdapter:
    """The adapter of a loaded model's family: :class:`WhisperAdapter` for Whisper, else :class:`ModelAdapter`."""
    family = WhisperAdapter if model.config.model_type == "whisper" else ModelAdapter
    return family(model, feature_extractor, source, revision)


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
        try:
            geometry = FrameGeometry.from_config(config, fe.sampling_rate, fe)
        except ValueError as e:
            raise ModelError(f"{source}: {e}") from None
    if sample_rate is not None and sample_rate != geometry.sample_rate:
        geometry = geometry.at_rate(sample_rate)
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
