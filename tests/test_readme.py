"""The README's Python example runs as written: offline, on a CPU, from an empty folder."""

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.S).group(1)


def test_the_same_in_python_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(python_block("### The same in Python"), "README.md", "exec"), scope)
    assert (tmp_path / "demo" / "pruned" / "model.safetensors").is_file()
    protected = json.loads((tmp_path / "demo" / "selections" / "phone-type.json").read_text())
    assert sum(map(len, protected.values())) > 0  # the example protects real phone-type neurons
    assert set(scope["p"].dims) == {"layer", "gender", "phone", "neuron"} and scope["p"].sizes["layer"] == 3
