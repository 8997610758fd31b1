"""What neurostat did to a checkpoint it wrote: the ``neurostat.json`` beside a pruned or an ablated model.

One record for both edits, written by ``prune`` and ``ablate`` and read by ``load_adapter`` (a pruned
checkpoint needs its widths to load), ``probe`` (which tags its results with the edit, so that
``report --probe`` can draw ablation bars and pruning curves) and anyone auditing a checkpoint.
Records written before the ``edit`` field existed are pruned ones (only ``prune`` wrote them then).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..version import __version__

FORMAT = 1
FILE = "neurostat.json"
EDITS = ("pruned", "ablated")


class ProvenanceError(UserError):
    """A ``neurostat.json`` that does not read back."""


@dataclass(frozen=True)
class EditRecord:
    """``edit``: pruned or ablated; ``neurons``: the ablated neurons or, pruned, the kept ones
    ({layer 1-based: indices}); the pruning fields stay empty for an ablation."""

    edit: str
    source_model: str
    architecture: str
    neurons: dict[str, list[int]]
    revision: str | None = None
    neurons_file: str | None = None
    criterion: str | None = None
    widths: dict[str, int] = field(default_factory=dict)
    params_before: int | None = None
    params_after: int | None = None
    protected: dict[str, dict] = field(default_factory=dict)
    keep_ratio: float | None = None  # the --keep-ratio asked for (the kept fraction rounds it per layer)
    neurostat_version: str = __version__
    format: int = FORMAT

    def write(self, folder: str | Path) -> Path:
        """Writes the record into the checkpoint ``folder``; pruned records keep their ``kept`` key."""
        data = asdict(self)
        if self.edit == "pruned":
            data["kept"] = data.pop("neurons")
        path = Path(folder) / FILE
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def read(cls, folder: str | Path) -> EditRecord | None:
        """The record of the checkpoint ``folder``, None when neurostat did not edit it."""
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            data.setdefault("edit", "pruned")
            if "kept" in data:
                data["neurons"] = data.pop("kept")
            if data.get("format") != FORMAT or data["edit"] not in EDITS:
                raise ValueError(f"format {data.get('format')}, edit {data['edit']!r}")
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as e:
            raise ProvenanceError(f"{path}: not a neurostat checkpoint record ({e})") from None

    def tag(self, width: int) -> dict:
        """How ``probe`` labels this model's results: the edit, the neurons (their file) and, pruned, the
        method and the kept fraction of the FFN neurons (``width``: the source model's FFN width, which
        the checkpoint's config keeps)."""
        if self.edit == "ablated":
            return {"edit": "ablated", "neurons": Path(self.neurons_file or "neurons").stem}
        kept = sum(len(v) for v in self.neurons.values())
        total = width * len(self.neurons)
        method = self.criterion or "?"
        if self.protected:
            method += " protecting " + "+".join(sorted(self.protected))
        keep = self.keep_ratio if self.keep_ratio is not None else round(kept / max(total, 1), 4)
        return {"edit": "pruned", "method": method, "keep": keep}
