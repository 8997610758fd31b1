"""Editing: removing neurons by zeroing their output.

Zeroing neuron j's activation (a mask after the activation) and zeroing column j of W2 give the same
FFN output; ``ablated`` does the first with hooks, for the duration of a ``with`` block;
``zero_neurons`` the second in place, and ``ablate_checkpoint`` writes a checkpoint edited that way
(`neurostat ablate`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..files import check_out_folder, new_folder
from ..neuronset import NeuronSet
from .adapter import FFN
from .checkpoints import is_checkpoint, model_source, save_feature_extractor
from .loading import load_full_model, model_ffns
from .provenance import EditRecord


def _checked(model: nn.Module, neurons: NeuronSet) -> list[FFN]:
    ffns = model_ffns(model)
    neurons.validate(len(ffns), max(f.width for f in ffns), "neurons to remove")
    for layer in neurons.layers:
        bad = [j for j in neurons[layer] if j >= ffns[layer - 1].width]
        if bad:
            raise ValueError(f"layer {layer} has {ffns[layer - 1].width} neurons; no neuron {bad[:5]}")
    return ffns


@contextmanager
def ablated(model: nn.Module, neurons: NeuronSet) -> Iterator[nn.Module]:
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
        handles.append(ffn.hook_activation(lambda a, mask=mask: a * mask))
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


def ablate_checkpoint(
    model: str, neurons: str | Path, out: str | Path, overwrite: bool = False
) -> tuple[NeuronSet, bool]:
    """Loads ``model`` (hub id or folder, with its own head), zeroes the W2 columns of the neurons in the
    ``neurons`` file and saves the edited checkpoint to ``out`` (through a temporary folder; an existing
    ``out`` only with ``overwrite`` and only when it is a checkpoint, never one that is, holds or lies inside
    the source or the neurons file); returns the neurons and whether a
    feature-extractor config was copied along."""
    model = model_source(model)
    check_out_folder(out, "checkpoint", is_checkpoint, (model, neurons))
    net = load_full_model(model)
    ffns = model_ffns(net)
    chosen = NeuronSet.load(neurons, num_layers=len(ffns), width=max(f.width for f in ffns))
    zero_neurons(net, chosen)
    with new_folder(out, "checkpoint", is_checkpoint, (model, neurons), overwrite) as tmp:
        net.save_pretrained(tmp)
        copied = save_feature_extractor(model, tmp)
        EditRecord(
            edit="ablated",
            source_model=model,
            architecture=type(net).__name__,
            neurons=json.loads(chosen.to_json()),
            neurons_file=str(Path(neurons).resolve()),
        ).write(tmp)
    return chosen, copied
