"""What the engine needs of any encoder: :class:`ModelAdapter`.

An adapter holds a loaded model of a family (:mod:`neurostat.model.families`), finds its backbone inside
task wrappers, exposes its layer axis — one entry per FFN, in layer order, a Conformer layer's ffn1 then
ffn2, each named (``3`` or ``3.ffn1``) — with each FFN's pieces (W1, b1, act, W2), runs batches so that each
utterance's activations equal its own unpadded forward (:meth:`ModelAdapter.encode`, one subclass per input
kind: :mod:`~neurostat.model.wav2vec2`, :mod:`~neurostat.model.whisper`, :mod:`~neurostat.model.filterbank`),
and instruments the FFNs so that the engine sees ``a = act(W1 x + b1)`` as it is computed, without a second
GEMM.  :meth:`ModelAdapter.describe` is the model's record in a store, and :meth:`ModelAdapter.batching`
what its forward does to a padded batch: both from the family and the loaded modules, never assumed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..frames import FrameGeometry
from .checkpoints import weights_fingerprint
from .families import Family, FFNPlace, ModelError, architecture, set_part
from .frontend import resolve_front_end
from .inputs import normalize_waveform, normalizes


@dataclass
class FFN:
    """One feed-forward block of the layer axis: ``out = W2 · act(W1 · x + b1) + b2``; ``module`` holds the
    pieces at the names ``place`` gives (None: pieces outside a model), ``name`` names the entry (``3``,
    ``3.ffn1``)."""

    module: nn.Module | None
    up: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    down: nn.Linear | None
    place: FFNPlace | None = None
    name: str = ""

    @property
    def width(self) -> int:
        return self.up.out_features

    def replace(self, up: nn.Linear, down: nn.Linear) -> None:
        """Swaps in new projections W1 and W2 (a pruned layer's), in the model and here."""
        set_part(self.module, self.place.up, up)
        set_part(self.module, self.place.down, down)
        self.up, self.down = up, down

    @torch.no_grad()
    def keep(self, indices: list[int]) -> None:
        """Keeps only the neurons ``indices`` (rows of W1 and b1, columns of W2), physically: pruning."""
        index = torch.tensor(indices, dtype=torch.long, device=self.up.weight.device)
        like = dict(device=index.device, dtype=self.up.weight.dtype)
        up = nn.Linear(self.up.in_features, len(indices), bias=self.up.bias is not None, **like)
        down = nn.Linear(len(indices), self.down.out_features, bias=self.down.bias is not None, **like)
        up.weight.copy_(self.up.weight.index_select(0, index))
        if up.bias is not None:
            up.bias.copy_(self.up.bias.index_select(0, index))
        down.weight.copy_(self.down.weight.index_select(1, index))
        if down.bias is not None:
            down.bias.copy_(self.down.bias)
        self.replace(up, down)

    def hook_activation(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Passes the activation ``act(W1 x + b1)`` through ``fn`` on its way to W2 (a pre-hook on W2, so it
        holds in an instrumented forward too); returns the handle that removes it."""
        return self.down.register_forward_pre_hook(lambda module, args: (fn(args[0]), *args[1:]))

    @contextmanager
    def instrumented(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block W1 computes ``activation(x)`` — which returns ``act(W1 x + b1)`` — and the
        activation passes it on unchanged, so the block finishes (dropout, W2, residual) exactly as HF does."""
        place, previous = self.place, (self.up, self.act)
        set_part(self.module, place.up, _Computed(activation))
        set_part(self.module, place.act, nn.Identity())
        try:
            yield
        finally:
            set_part(self.module, place.up, previous[0])
            set_part(self.module, place.act, previous[1])


class _Computed(nn.Module):
    """A module that computes ``fn(x)`` (an instrumented activation standing in for a projection)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def family_ffns(family: Family, backbone: nn.Module, name: str) -> list[FFN]:
    """The layer axis of a backbone of ``family``: every FFN in layer order, named."""
    layers = family.encoder_layers(backbone)
    if layers is None or len(layers) == 0:
        raise ModelError(f"{name}: the encoder has no layers")
    out = []
    for i, layer in enumerate(layers, 1):
        for place in family.ffns:
            module, up, act, down = family.ffn_parts(layer, place)
            if not (isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and isinstance(act, nn.Module)):
                where = f"{place.container}." if place.container else ""
                raise ModelError(
                    f"{name}: layer {i} has no FFN with {where}{place.up} / {where}{place.act} / {where}{place.down}"
                )
            out.append(FFN(module, up, act, down, place, f"{i}.{place.name}" if place.name else str(i)))
    return out


class ModelAdapter:
    """A loaded encoder, ready for instrumented, padding-safe batched forwards (a subclass per input kind
    implements :meth:`encode`; :func:`~neurostat.model.loading.load_adapter` picks it from the family)."""

    def __init__(
        self,
        model: nn.Module,
        feature_extractor,
        family: Family,
        source: str = "<in-memory>",
        revision: str | None = None,
    ):
        self.family, self.source, self.revision = family, source, revision
        self.model = model.eval()
        self.backbone = family.find_backbone(model, source)
        self.config = family.config_of(self.backbone.config)
        self.feature_extractor = feature_extractor
        self.ffns = family_ffns(family, self.backbone, source)
        self.geometry = self._geometry()
        self.weights: str | None = None  # SHA-1 of the weight files when loaded from a folder
        self.kept: dict[int, list[int]] | None = None  # a pruned model's neurons per entry: original indices
        self.pruned_from: str | None = None  # the model a pruned checkpoint was pruned from

    def _geometry(self) -> FrameGeometry:
        """The frame geometry of the config and feature extractor (an input kind may check it against the
        modules)."""
        return self.family.geometry(self.config, self.feature_extractor, self.source)

    def check_geometry(self, geometry: FrameGeometry) -> None:
        """A prepared corpus's frame geometry must be this model's (else its frame labels are wrong)."""
        if geometry != self.geometry:
            raise ModelError(
                f"{self.source}: frame geometry {self.geometry.describe()} differs from the prepared corpus "
                f"({geometry.describe()}); re-run prepare with --model {self.source}"
            )

    @property
    def num_layers(self) -> int:
        """Encoder layers (Transformer or Conformer blocks)."""
        return len(self.family.encoder_layers(self.backbone))

    @property
    def entries(self) -> list[str]:
        """The layer axis: each FFN's name, in order (``3``, or ``3.ffn1`` and ``3.ffn2`` for a Conformer)."""
        return [f.name for f in self.ffns]

    def hash_weights(self) -> str | None:
        """Hashes the weight files' content now, as a run does when it starts or resumes (the digest the
        loader took may come from the cache), and keeps it as :attr:`weights`."""
        self.weights = weights_fingerprint(self.source, fresh=True)
        return self.weights

    def layer_entries(self, layers: list[int] | None) -> list[int]:
        """The layer axis's entries (0-based) of the encoder layers ``layers`` (1-based; None: all): each
        layer's FFNs, in order.  An unknown layer is an error naming the model's layers."""
        per, total = self.family.ffns_per_layer, self.num_layers
        chosen = range(1, total + 1) if layers is None else sorted(set(layers))
        bad = [n for n in chosen if not 1 <= n <= total]
        if bad:
            raise ModelError(f"{self.source} has layers 1..{total}; no layer {bad}")
        return [(n - 1) * per + j for n in chosen for j in range(per)]

    def width_of(self, entries: list[int]) -> int:
        """The FFN width of the entries (0-based), which must be one (a pruned checkpoint's layers may differ)."""
        by_width: dict[int, list[str]] = {}
        for i in entries:
            by_width.setdefault(self.ffns[i].width, []).append(self.ffns[i].name)
        if len(by_width) != 1:
            kinds = "; ".join(f"{w} neurons in {', '.join(names)}" for w, names in sorted(by_width.items()))
            raise ModelError(
                f"{self.source}: the FFNs have different widths ({kinds}); collect the layers of one width at a "
                "time with --layers"
            )
        return next(iter(by_width))

    @property
    def width(self) -> int:
        return self.width_of(list(range(len(self.ffns))))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def activation_name(self) -> str:
        """The FFN activation's name in the config (``gelu``: what the fused kernels compute)."""
        return self.family.activation_name(self.config)

    @property
    def attention(self) -> str:
        """The attention implementation that runs (transformers' ``attn_implementation``)."""
        return str(getattr(self.config, "_attn_implementation", None) or "eager")

    def describe(self) -> dict:
        """The model's record in a store: what it is and how it was read."""
        widths = sorted({f.width for f in self.ffns})
        return {
            "model": self.source,
            "revision": self.revision,
            "model_type": self.config.model_type,
            "family": self.family.key,
            "input": self.family.input,
            "num_layers": self.num_layers,
            "ffns_per_layer": self.family.ffns_per_layer,
            "num_entries": len(self.ffns),
            "entries": self.entries,
            "width": widths[0] if len(widths) == 1 else max(widths),
            "hidden_size": self.ffns[0].up.in_features,
            "activation": self.activation_name,
            "geometry": self.geometry.to_dict(),
            "normalize": normalizes(self.feature_extractor),
            "attention": self.attention,
            "weights_sha1": self.weights,
            "pruned_from": self.pruned_from,
            **self._head(),
        }

    def _head(self) -> dict:
        """The checkpoint's class (its config's ``architectures``) and, for a fine-tuned one (CTC,
        classification, a decoder), what collecting its encoder leaves out."""
        arch = architecture(self.config, self.model)
        base = arch == type(self.backbone).__name__ or arch.endswith(("Model", "ForPreTraining", "Encoder"))
        return {"architecture": arch, "head": None if base else f"{arch}: its head is not collected, its encoder is"}

    def resolve_front_end(self, choice: str) -> str:
        """The front end a ``--front-end`` choice runs on this model (:func:`~.frontend.resolve_front_end`)."""
        return resolve_front_end(self.family, choice, self.device, self.source)

    def batching(self, front_end: str) -> dict:
        """What the forward does to a padded batch, for the store: the front end, how a group norm sees
        padding, and how padded frames are kept out of the encoder."""
        raise NotImplementedError

    def normalize(self, wave: np.ndarray) -> np.ndarray:
        """The checkpoint's own waveform normalisation (its feature extractor)."""
        return normalize_waveform(self.feature_extractor, wave)

    def encode(
        self, waves: list[torch.Tensor] | torch.Tensor, lengths=None, front_end: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the encoder on waveforms — a list of 1-D tensors, or a zero-padded [B, L] batch with its
        ``lengths`` in samples — and returns (last hidden state [B, T, H], frame mask [B, T]); each
        utterance's activations equal its own unpadded forward within float rounding."""
        raise NotImplementedError

    @contextmanager
    def instrument(
        self, activation: Callable[[int, FFN, torch.Tensor], torch.Tensor], entries: list[int] | None = None
    ) -> Iterator[None]:
        """Within the block, each chosen entry's FFN (0-based; None: all) gets ``a = activation(entry, ffn,
        x)`` — which must return ``act(W1 x + b1)`` [B, T, D] — and then finishes exactly as HF does."""
        chosen = range(len(self.ffns)) if entries is None else entries
        with ExitStack() as stack:
            for i in chosen:
                ffn = self.ffns[i]
                stack.enter_context(ffn.instrumented(functools.partial(activation, i, ffn)))
            yield

    def observe(self, sink: Callable[[int, torch.Tensor], None], entries: list[int] | None = None):
        """Instrumentation that only looks: ``sink(entry, a)`` sees each FFN activation."""

        def activation(index: int, ffn: FFN, x: torch.Tensor) -> torch.Tensor:
            a = ffn.act(ffn.up(x))
            sink(index, a)
            return a

        return self.instrument(activation, entries)
