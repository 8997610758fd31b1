"""The conv front ends of the waveform families: how the conv feature encoder runs on a padded batch so
that every utterance's frames equal its own unpadded forward within float rounding.

A base model's group norm after the first convolution normalises each channel over time, padding
included, so the batched front ends take those statistics per utterance over its valid positions only;
the later convolutions are exact at valid frames because a valid frame's receptive field lies inside its
utterance (the frame-count rule says so).  Layer-norm front ends normalise per frame and need nothing.

Three front ends (:data:`~neurostat.choices.FRONT_ENDS`), exact alike: ``gemm`` (the default,
:func:`default_front_end`) keeps activations channels-last and runs each convolution as GEMMs on strided
views of one flat buffer (:func:`gemm_features`), which reach tensor cores on a GPU where cuDNN's kernels for
these convolutions do not; ``batched`` runs the model's own convolutions on the padded batch
(:func:`masked_group_norm`); ``per-utterance`` runs the model's modules one utterance at a time: the
reference.  A layer of the feature encoder is a (convolution, norm or None, activation) triple, as
:meth:`~neurostat.model.families.Family.conv_stack` gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import FRONT_ENDS
from .families import FILTERBANK, LOG_MEL, Family, ModelError

ConvLayer = tuple[nn.Conv1d, "nn.Module | None", Callable[[torch.Tensor], torch.Tensor]]
"""One layer of a conv feature encoder: its convolution, its norm (or None) and its activation."""


def host_values(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
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
    def of(cls, layer: ConvLayer) -> ConvGemm:
        """A conv layer (convolution, optional group/layer norm, activation) re-laid-out."""
        conv, norm, activation = layer
        if conv.padding != (0,) or conv.dilation != (1,) or conv.groups != 1:
            raise ModelError("the gemm front end needs unpadded, undilated, ungrouped feature convolutions")
        weight = conv.weight.detach().permute(2, 1, 0).reshape(-1, conv.out_channels).contiguous()
        bias = None if conv.bias is None else conv.bias.detach()
        return cls(conv.kernel_size[0], conv.stride[0], weight, bias, norm, activation)

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
        count = host_values(valid, h.device, torch.float64).clamp(min=1)[:, None]
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


OWN_FRONT_ENDS = {LOG_MEL: "whisper-log-mel", FILTERBANK: "filterbank"}
"""The names a store records for the front ends of the input kinds that have their own (no choice)."""


def resolve_front_end(family: Family, choice: str, device: torch.device | str, source: str = "model") -> str:
    """The front end a ``--front-end`` choice runs for a model of ``family``: for the waveform families one
    of :data:`~neurostat.choices.FRONT_ENDS` (``auto``: :func:`default_front_end`); an input kind with its own
    front end (Whisper's log-mel, a filterbank) takes only ``auto``."""
    own = OWN_FRONT_ENDS.get(family.input)
    if own is not None:
        if choice not in ("auto", own):
            raise ModelError(f"--front-end {choice}: {source} is {family.title}, whose front end ({own}) is its own")
        return own
    if choice == "auto":
        return default_front_end(device)
    if choice not in FRONT_ENDS:
        raise ModelError(f"unknown --front-end {choice!r}; choose auto or one of {FRONT_ENDS}")
    return choice


def parameters_key(parameters) -> tuple:
    """What identifies the current values of ``parameters``: each one's storage, version, dtype and device
    (an in-place update through torch bumps the version; ``.to()`` or a reload changes the storage)."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)


def conv_layer(layer: ConvLayer, h: torch.Tensor) -> torch.Tensor:
    """One conv layer through the model's own modules on [B, C, T], as the model runs it: a group norm over
    time, a layer norm per frame (channels last), then the activation."""
    conv, norm, activation = layer
    h = conv(h)
    if isinstance(norm, nn.GroupNorm):
        h = norm(h)
    elif norm is not None:
        h = norm(h.transpose(-2, -1)).transpose(-2, -1)
    return activation(h)


def module_features(layers: list[ConvLayer], x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """The conv front end on waveforms [B, L] → [B, T, C] through the model's own modules; with ``lengths``
    (a padded batch), a group norm takes its statistics over each utterance's valid positions only."""
    h, valid = x[:, None], lengths
    for conv, norm, activation in layers:
        if valid is not None:
            valid = (valid - conv.kernel_size[0]) // conv.stride[0] + 1
        if valid is not None and isinstance(norm, nn.GroupNorm):
            h = activation(masked_group_norm(conv(h), valid, norm))
        else:
            h = conv_layer((conv, norm, activation), h)
    return h.transpose(1, 2)
