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

from ..neuronset import NeuronModel, NeuronSet
from .adapter import FFN
from .checkpoints import model_source, save_feature_extractor, weights_fingerprint
from .loading import load_full_model, model_ffns
from .outputs import check_checkpoint_out, checkpoint_folder
from .provenance import EditRecord


def neuron_model(source: str, model: nn.Module) -> NeuronModel:
    """The model ``source`` (loaded as ``model``) as a neuron file's settings record one (a store's model)."""
    widths = [f.width for f in model_ffns(model)]
    return NeuronModel(source, len(widths), max(widths), weights_fingerprint(source))


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
    model: str, neurons: str | Path, out: str | Path, overwrite: bool = False, allow_other_model: bool = False
) -> tuple[NeuronSet, bool]:
    """Loads ``model`` (hub id or folder, with its own head), zeroes the W2 columns of the neurons in the
    ``neurons`` file and saves the edited checkpoint to ``out`` (through a temporary folder; an existing
    ``out`` only with ``overwrite`` and only when it is a checkpoint, never one that is, holds or lies inside
    the source or the neurons file); returns the neurons and whether a
    feature-extractor config was copied along."""
    model = model_source(model)
    check_checkpoint_out(out, model, (neurons,))
    net = load_full_model(model)
    chosen = NeuronSet.load(neurons, model=neuron_model(model, net), allow_other_model=allow_other_model)
    zero_neurons(net, chosen)
    with checkpoint_folder(out, model, (neurons,), overwrite) as tmp:
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
