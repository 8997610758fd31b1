"""Whisper's encoder: log-mel windows in (a ``WhisperModel`` or ``WhisperForConditionalGeneration``
checkpoint; the decoder and the head never run).

Whisper sees fixed windows of the feature extractor's ``n_samples`` (``chunk_length`` seconds): the engine
cuts utterances at window boundaries (:attr:`~neurostat.frames.FrameGeometry.window`), so every waveform of
a batch fits one window.  Each is zero-padded to the window and made log-mel features by the checkpoint's
own ``WhisperFeatureExtractor``'s operations (its torch STFT and mel filters, run on the device), as Whisper
does itself; then the encoder runs on the whole batch of windows at once.  Whisper's encoder has no
attention mask: a window's padding is part of its input, as when Whisper transcribes it, so each window's
activations equal its own batch-1 forward within float rounding.  The frames whose centre lies past the
audio (:meth:`~neurostat.frames.FrameGeometry.num_frames`) are masked out: never tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..frames import FrameGeometry
from .adapter import ModelAdapter
from .families import ModelError, architecture, part
from .frontend import host_values
from .inputs import LogMelSettings, whisper_geometry


class WhisperAdapter(ModelAdapter):
    """Whisper's encoder (see the module docstring)."""

    _stft: tuple[torch.Tensor, torch.Tensor] | None = None
    """The STFT window and the feature extractor's mel filters [frequencies, mel bins] on the device (made on
    first use)."""

    def _geometry(self) -> FrameGeometry:
        """The frame geometry of the feature extractor and the encoder's own convolutions (kernel, padding,
        stride), which must be the geometry the config alone gives (what ``prepare --model`` labels by)."""
        expected = super()._geometry()  # the feature extractor's log-mel settings checked there
        self.mel = LogMelSettings.of(self.feature_extractor)
        convs = [part(self.backbone, path) for path in self.family.convs]
        layers = tuple((c.kernel_size[0], c.padding[0]) for c in convs)
        geometry = whisper_geometry(self.config, self.feature_extractor, layers)
        if geometry != expected or tuple(c.stride[0] for c in convs) != geometry.conv_stride[1:]:
            raise ModelError(
                f"{self.source}: the encoder's convolutions (kernel, stride, padding) "
                f"{[(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs]} are not Whisper's "
                f"({expected.describe()} from the config)"
            )
        return geometry

    def batching(self, front_end: str) -> dict:
        return {
            "front_end": front_end,
            "group_norm": "none (log-mel features, then convolutions without a norm)",
            "frame_mask": "none to the encoder: each window is padded as Whisper pads it, and the frames whose "
            "centre lies past the audio are not counted",
        }

    def _head(self) -> dict:
        """The checkpoint's class; the decoder (and a generation head) that collecting its encoder leaves out."""
        arch = architecture(self.config, self.model)
        left = "its decoder is" if arch == type(self.backbone).__name__ else "its decoder and head are"
        return {"architecture": arch, "head": f"{arch}: {left} not collected, its encoder is"}

    def log_mel(self, batch: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel features [B, mel bins, mel frames] of a batch [B, L] of waveforms of at most one
        window each (``lengths`` in samples, on the batch's device), each padded to the window with the
        extractor's padding value: the operations of the checkpoint's ``WhisperFeatureExtractor`` (its torch
        STFT, its mel filters), run where the batch is, so a batch on the GPU never goes back to the host
        (tests: equal to the extractor's output)."""
        mel = self.mel
        batch = batch[:, : mel.window].to(torch.float32)
        past = torch.arange(batch.shape[1], device=batch.device)[None] >= lengths[:, None]
        batch = nn.functional.pad(
            batch.masked_fill(past, mel.padding), (0, mel.window - batch.shape[1]), value=mel.padding
        )
        if self._stft is None or self._stft[0].device != batch.device:
            with torch.inference_mode(False):  # plain tensors, usable outside encode's inference mode too
                window = torch.hann_window(mel.n_fft, device=batch.device)
                self._stft = window, torch.from_numpy(mel.filters).to(batch.device, torch.float32)
        window, filters = self._stft
        stft = torch.stft(batch, mel.n_fft, mel.hop, window=window, return_complex=True)
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
        [B, F]), F the window's frames.  ``front_end`` is the waveform families' choice: Whisper has one."""
        if isinstance(waves, torch.Tensor):
            lengths = [int(n) for n in lengths]
        else:
            lengths = [len(w) for w in waves]
            waves = nn.utils.rnn.pad_sequence(list(waves), batch_first=True)
        window = self.geometry.window
        if any(n > window for n in lengths):
            raise ModelError(
                f"{self.source}: Whisper takes windows of at most {window} samples ({self.mel.seconds:g} s), "
                f"got {max(lengths)}; cut utterances into windows"
            )
        features = self.log_mel(waves.to(self.device), host_values(lengths, self.device))
        hidden = self.family.run_encoder(self.backbone)(features)[0]
        frames = host_values([self.geometry.num_frames(n) for n in lengths], self.device)
        mask = torch.arange(hidden.shape[1], device=self.device)[None] < frames[:, None]
        return hidden, mask
