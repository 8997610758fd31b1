"""The README's Python example runs as written: offline, on a CPU, from an empty folder."""

import json
import re
from pathlib import Path

import pytest

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


def quick_start_commands() -> list[list[str]]:
    """The Quick Start's commands as argument lists (continuation lines joined, comments dropped)."""
    import shlex

    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("## Quick start") :], re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_quick_start_runs_as_written_and_finds_property_neurons(tmp_path, monkeypatch):
    """Every command of the Quick Start but torchrun (tests/test_distributed.py runs that one) from an
    empty folder: the selections hold neurons of every property in every layer, and the report and the
    browser have something to show."""
    from click.testing import CliRunner

    from neurostat.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEUROSTAT_CACHE", str(tmp_path / "cache"))
    commands = [c for c in quick_start_commands() if c and c[0] != "torchrun"]
    assert [c[0] for c in commands] == ["neurostat"] * len(commands) and len(commands) >= 12
    for args in commands:
        res = CliRunner().invoke(main, args[1:])
        assert res.exit_code == 0, (args, res.output)
    for prop in ("phone-type", "gender", "pitch"):
        neurons = json.loads((tmp_path / "demo" / "selections" / f"{prop}.json").read_text())
        assert len(neurons) == 4 and all(neurons.values()), (prop, {k: len(v) for k, v in neurons.items()})
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    pages = list((tmp_path / "demo" / "browser").rglob("*.html"))
    assert len(pages) > 10 and list((tmp_path / "demo" / "browser").rglob("*.flac"))
    assert (tmp_path / "demo" / "pruned" / "model.safetensors").is_file()
