"""The filterbank families: the feature extractor's frames of a whole utterance in, Conformer layers on them.
w2v-BERT 2.0 (``Wav2Vec2BertModel``): ``SeamlessM4TFeatureExtractor``'s Kaldi filterbank, two 10 ms frames
stacked into each 20 ms model frame, a projection, then the encoder.  Parakeet / FastConformer
(``ParakeetEncoder``, alone or inside ``ParakeetForCTC``, whose head never runs): ``ParakeetFeatureExtractor``'s
log-mel filterbank, subsampled 8x by the encoder's convolutions to 80 ms frames.

Batching, exact: the checkpoint's own feature extractor runs on each utterance alone, on the host (as the
utterance's own forward runs it), and the features are padded into one batch with zeros; the encoder runs
on the batch with the extractor's frame mask.  w2v-BERT masks padded frames out of attention and zeroes them
before each Conformer convolution, which is causal (padding after an utterance is never read);
FastConformer's subsampling zeroes padded frames after each of its convolutions, and its Conformer
convolutions zero them before reading.  So each utterance's activations equal its own forward within float
rounding (tests: float64, against the HF forward one utterance at a time).
"""

from __future__ import annotations

import numpy as np
import torch

from .adapter import ModelAdapter
from .families import ModelError
from .frontend import host_values
from .inputs import filterbank


class FilterbankAdapter(ModelAdapter):
    """A loaded model of a filterbank family (see the module docstring)."""

    def batching(self, front_end: str) -> dict:
        return {
            "front_end": front_end,
            "group_norm": "none (the feature extractor normalises each utterance alone)",
            "frame_mask": f"the feature extractor's frame mask to the encoder, {self.attention} attention",
        }

    def features(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature extractor on each waveform alone → (its valid frames, zero-padded [B, T, F] to the most
        valid frames of the batch, on the device in the model's dtype; input frame mask [B, T]).  Each utterance's count of valid frames must be the one
        the frame geometry gives (else the extractor is not the one the geometry was read from)."""
        out = [filterbank(self.feature_extractor, w) for w in waves]
        for (feats, valid), wave in zip(out, waves):
            expected = self._input_frames(len(wave))
            if valid != expected:
                raise ModelError(
                    f"{self.source}: its feature extractor gave {valid} valid frames for {len(wave)} samples, the "
                    f"frame geometry {expected} ({self.geometry.describe()})"
                )
        steps = max(1, max(valid for _, valid in out))  # the padding an extractor adds past them is masked anyway
        batch = np.zeros((len(out), steps, out[0][0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(out), steps), dtype=bool)
        for b, (feats, valid) in enumerate(out):  # the valid frames only: the rest is padding, zeros
            batch[b, :valid] = feats[:valid]
            mask[b, :valid] = True
        return torch.from_numpy(batch).to(self.device, self.dtype), torch.from_numpy(mask).to(self.device)

    def _input_frames(self, num_samples: int) -> int:
        """The encoder's input frames of an utterance: the model frames themselves when the extractor's frames
        are the model's (w2v-BERT's stacked frames), else the filterbank's whole hops (FastConformer)."""
        if self.geometry.rule == "hops":
            return num_samples // self.geometry.conv_stride[0]
        return self.geometry.num_frames(num_samples)

    @torch.inference_mode()
    def encode(
        self, waves: list[torch.Tensor] | torch.Tensor, lengths=None, front_end: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the encoder on waveforms — a list of 1-D tensors, or a zero-padded [B, L] batch with its
        ``lengths`` in samples — and returns (last hidden state [B, T, H], frame mask [B, T]).  ``front_end``
        is the waveform families' choice: the filterbank is the feature extractor's."""
        self.resolve_front_end(front_end or "auto")  # the filterbank is the feature extractor's: no choice
        if isinstance(waves, torch.Tensor):
            host = waves.detach().cpu().float().numpy()
            waves = [host[b, : int(n)] for b, n in enumerate(lengths)]
        else:
            waves = [w.detach().cpu().float().numpy() for w in waves]
        features, input_mask = self.features(waves)
        projection = self.family.projection_of(self.backbone) if self.family.projection else None
        if projection is not None:
            projected = projection(features)
            features = projected[0] if isinstance(projected, tuple) else projected
        hidden = self.family.run_encoder(self.backbone)(features, attention_mask=input_mask)[0]
        counts = [self.geometry.num_frames(len(w)) for w in waves]
        if hidden.shape[1] != max(max(counts), 1):  # the engine's token rows index frames of the longest
            raise ModelError(
                f"{self.source}: the encoder made {hidden.shape[1]} frames of a batch whose longest utterance has "
                f"{max(counts)} by the frame geometry ({self.geometry.describe()})"
            )
        frames = host_values(counts, self.device)
        mask = torch.arange(hidden.shape[1], device=self.device)[None] < frames[:, None]
        return hidden, mask
