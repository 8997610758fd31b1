"""The waveform families, laid out as wav2vec 2.0 (HuBERT, wav2vec 2.0, WavLM, data2vec-audio, UniSpeech,
UniSpeech-SAT, Wav2Vec2-Conformer): a normalised waveform in, a conv feature encoder, a projection, then an
encoder of Transformer or Conformer layers.

Batching, exact: every utterance's activations equal its own unpadded forward within float rounding.  The
whole model runs on the padded batch.  The conv front end (:mod:`~neurostat.model.frontend`) takes a group
norm's statistics per utterance over its valid positions.  The encoder runs with a boolean frame mask and
SDPA attention.  HF zeroes padded frames before the positional convolution; data2vec-audio stacks several
with layer norms, so padded frames are zeroed again between them.  A Conformer layer's depthwise convolution
reads its neighbours, and HF's Wav2Vec2-Conformer lets it read the padded frames after an utterance: they
are zeroed before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .adapter import ModelAdapter
from .families import Family
from .frontend import ConvGemm, Workspace, gemm_features, host_values, module_features, parameters_key


class WaveformAdapter(ModelAdapter):
    """A loaded model of a waveform family (see the module docstring)."""

    def __init__(self, model: nn.Module, feature_extractor, family: Family, source: str = "<in-memory>", revision=None):
        super().__init__(model, feature_extractor, family, source, revision)
        self._gemm_cache: tuple[tuple, list[ConvGemm]] | None = None
        self._workspace = Workspace()
        self._pos_weight_cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def group_norm(self) -> bool:
        """Whether the conv front end has a group norm (base models), which sees a whole utterance."""
        return any(isinstance(norm, nn.GroupNorm) for _, norm, _ in self.family.conv_stack(self.backbone))

    def batching(self, front_end: str) -> dict:
        conformer = "; padded frames zeroed before each Conformer convolution" if self.family.conformer_conv else ""
        return {
            "front_end": front_end,
            "group_norm": "statistics per utterance over its valid positions"
            if self.group_norm
            else "none (a layer-norm front end normalises each frame)",
            "frame_mask": f"boolean frame mask to the encoder, {self.attention} attention{conformer}",
        }

    @torch.inference_mode()
    def encode(
        self, waves: list[torch.Tensor] | torch.Tensor, lengths=None, front_end: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the model on normalised waveforms — a list of 1-D tensors, or a zero-padded [B, L] batch
        with its ``lengths`` in samples — and returns (last hidden state [B, T, H], frame mask [B, T]).
        ``front_end``: one of :data:`~neurostat.choices.FRONT_ENDS` (default: :func:`default_front_end`)."""
        front_end = self.resolve_front_end(front_end or "auto")
        if isinstance(waves, torch.Tensor):
            lengths = [int(n) for n in lengths]
            waves = [waves[b, :n] for b, n in enumerate(lengths)] if front_end == "per-utterance" else waves
        else:
            lengths = [len(w) for w in waves]
            waves = waves if front_end == "per-utterance" else nn.utils.rnn.pad_sequence(waves, batch_first=True)
        counts = [self.geometry.num_frames(n) for n in lengths]
        frames = host_values(counts, self.device)
        layers = self.family.conv_stack(self.backbone)
        if front_end == "per-utterance":
            feats = [
                self._project(module_features(layers, w.to(self.device, self.dtype)[None], None))[0] for w in waves
            ]
            hidden = nn.utils.rnn.pad_sequence(feats, batch_first=True)
        elif front_end == "gemm":
            x = waves.to(self.device, self.dtype, non_blocking=True)
            features = gemm_features(self._conv_gemms(), x, lengths, self._workspace)
            hidden = self._project(features[:, : max(counts)])
        else:
            x = waves.to(self.device, self.dtype, non_blocking=True)
            padded = min(lengths) < x.shape[1]  # without padding the model's own layers are exact
            hidden = self._project(module_features(layers, x, host_values(lengths, self.device) if padded else None))
            hidden = hidden[:, : max(counts)]
        mask = torch.arange(hidden.shape[1], device=self.device)[None] < frames[:, None]
        with self._padding_kept_out(mask):
            out = self.family.run_encoder(self.backbone)(hidden, attention_mask=mask)
        return out[0], mask

    def _conv_gemms(self) -> list[ConvGemm]:
        """The feature encoder's layers re-laid-out for :func:`gemm_features`, rebuilt only when one of its
        parameters changed (:func:`parameters_key`)."""
        layers = self.family.conv_stack(self.backbone)
        key = parameters_key(
            p for conv, norm, _ in layers for m in (conv, norm) if m is not None for p in m.parameters()
        )
        if self._gemm_cache is None or self._gemm_cache[0] != key:
            self._gemm_cache = key, [ConvGemm.of(layer) for layer in layers]
        return self._gemm_cache[1]

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        proj = self.family.projection_of(self.backbone)(features)
        return proj[0] if isinstance(proj, tuple) else proj

    def _positional_weight(self, conv: nn.Conv1d) -> torch.Tensor:
        """The weight-normed positional convolution's weight, which HF recomputes at every forward:
        computed once and kept until its parameters change (:func:`parameters_key`)."""
        key = parameters_key(conv.parametrizations.weight.parameters())
        if self._pos_weight_cache is None or self._pos_weight_cache[0] != key:
            self._pos_weight_cache = key, conv.weight
        return self._pos_weight_cache[1]

    @contextmanager
    def _padding_kept_out(self, mask: torch.Tensor) -> Iterator[None]:
        """Within the block the encoder runs as HF runs it, with three changes: a weight-normed positional
        convolution uses :meth:`_positional_weight`; a stack of them (data2vec-audio) has padded frames zeroed
        after each layer (HF zeroes them only before the first); a Conformer convolution sees padded frames as
        zeros.  Otherwise padding leaks into valid frames."""
        keep = mask[:, None, :]
        with ExitStack() as stack:
            for depthwise in self.family.conformer_convs(self.backbone):
                handle = depthwise.register_forward_pre_hook(lambda m, args: (args[0] * keep.to(args[0].dtype),))
                stack.callback(handle.remove)
            with self._positional_convolution(keep):
                yield

    @contextmanager
    def _positional_convolution(self, keep: torch.Tensor) -> Iterator[None]:
        """A weight-normed positional convolution's cached weight; a stack of them zeroing padded frames."""
        pos, layers, conv = self.family.positional_parts(self.backbone)
        if layers is not None:

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
