"""Editing: removing neurons by zeroing their output.

Zeroing neuron j's activation (a mask after the activation) and zeroing column j of W2 give the same
FFN output; ``ablate`` does the first with hooks (reversible), ``zero_neurons`` the second in place
(for an edited checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .engine.adapter import FFN, ModelAdapter
from .neuronset import NeuronSet


def model_ffns(model: nn.Module) -> list[FFN]:
    """The FFNs of a supported model (any wrapper), layer order."""
    from transformers import Wav2Vec2FeatureExtractor

    return ModelAdapter(model, Wav2Vec2FeatureExtractor(), getattr(model, "name_or_path", "model")).ffns


def _checked(model: nn.Module, neurons: NeuronSet) -> list[FFN]:
    ffns = model_ffns(model)
    neurons.validate(len(ffns), max(f.width for f in ffns), "neurons to remove")
    for layer in neurons.layers:
        bad = [j for j in neurons[layer] if j >= ffns[layer - 1].width]
        if bad:
            raise ValueError(f"layer {layer} has {ffns[layer - 1].width} neurons; no neuron {bad[:5]}")
    return ffns


@contextmanager
def ablate(model: nn.Module, neurons: NeuronSet) -> Iterator[nn.Module]:
    """Within the block, the given neurons' activations are zeroed (forward hooks after the activation)."""
    ffns = _checked(model, neurons)
    handles = []
    for layer in neurons.layers:
        idx = sorted(neurons[layer])
        if not idx:
            continue
        ffn = ffns[layer - 1]
        mask = torch.ones(ffn.width, dtype=ffn.up.weight.dtype, device=ffn.up.weight.device)
        mask[idx] = 0
        handles.append(ffn.module.intermediate_dropout.register_forward_hook(lambda m, i, out, mask=mask: out * mask))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def zero_neurons(model: nn.Module, neurons: NeuronSet) -> nn.Module:
    """Zeroes column j of W2 for every given neuron, in place; returns the model."""
    ffns = _checked(model, neurons)
    for layer in neurons.layers:
        idx = sorted(neurons[layer])
        if idx:
            ffns[layer - 1].down.weight[:, idx] = 0
    return model
