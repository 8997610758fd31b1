"""Where a layer's statistics run: on CUDA by default on a second stream beside the model's next layers.

The statistics of layer l read only tensors the model has finished with (its activation, the fp32
pre-activation, the batch's index tensors), so queueing them on a side stream changes no value — the same
kernels run on the same inputs in the same order — and the model's stream no longer waits for them.  The
side stream waits for the model's stream before each layer's statistics; the tensors it reads are marked
as used by it (``record_stream``), so the allocator does not hand their memory to the model before the
statistics are done; readers of the totals join it first (:meth:`StatsStream.join`).  On CPU every stream
is the same one: the context is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_overlap(overlap: bool | None, device: torch.device | str) -> bool:
    """``None`` (the default) → a side stream on CUDA, none elsewhere; ``True``/``False`` as asked."""
    return torch.device(device).type == "cuda" if overlap is None else bool(overlap)


class StatsStream:
    """The stream the statistics are queued on (none: the current one)."""

    def __init__(self, device: torch.device | str, overlap: bool | None = None):
        device = torch.device(device)
        self.overlap = resolve_overlap(overlap, device)
        self.stream = torch.cuda.Stream(device) if self.overlap and device.type == "cuda" else None

    @contextlib.contextmanager
    def run(self, *tensors: torch.Tensor | None) -> Iterator[None]:
        """Work inside the block goes to the side stream, after what the current stream has queued;
        ``tensors`` (made on the current stream) stay allocated until the side stream has read them."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield
        for t in tensors:
            if t is not None:
                t.record_stream(self.stream)

    def join(self) -> None:
        """The current stream waits for the statistics queued so far (before anything reads the totals)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
