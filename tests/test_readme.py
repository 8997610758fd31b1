"""The README runs as written: every ``bash`` and ``python`` block, in order, offline, on a CPU, from an empty
folder (``sh`` blocks need what a test cannot have: real data, a hub model, a GPU, hours)."""

import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN = ("bash", "python")
SHOWN = ("sh", "csv")  # commands for real data, hub models, GPUs and long jobs; file contents


def blocks() -> list[tuple[str, str, int]]:
    """Every fenced block of the README, indented ones (in a list item) too: (language, text, line of the
    fence)."""
    text = README.read_text()
    return [
        (m.group(2), textwrap.dedent(m.group(3)), text.count("\n", 0, m.start()) + 1)
        for m in re.finditer(r"^([ \t]*)```(\w*)\n(.*?)^\1```$", text, re.S | re.M)
    ]


def python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.S).group(1)


def commands(block: str) -> list[list[str]]:
    """A bash block's commands as argument lists: continuation lines joined, comments dropped, ``&&`` split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while "&&" in words:
            out.append(words[: words.index("&&")])
            words = words[words.index("&&") + 1 :]
        if words:
            out.append(words)
    return out


def test_every_block_is_run_or_says_why_not():
    """A block without a language, or with another, would be skipped without anyone deciding it."""
    found = [(language, line) for language, _, line in blocks()]
    assert all(language in RUN + SHOWN for language, _ in found), [f for f in found if f[0] not in RUN + SHOWN]
    assert sum(language in RUN for language, _ in found) >= 15
    assert len(found) == README.read_text().count("```") // 2  # no fence the pattern above misses


def test_the_setup_block_is_what_ci_runs():
    """The first screen's install and test commands are .ci/run's (which runs them on a fresh machine)."""
    language, block, _ = blocks()[0]
    ci = (ROOT / ".ci" / "run").read_text()
    install, tests = block.strip().splitlines()
    assert language == "bash" and install.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install -e '.[dev]' -c constraints.txt" in install
    assert "pip install -q -e '.[dev]' -c constraints.txt" in ci
    assert tests.endswith("HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 python -m pytest -q")
    assert "export HF_HUB_OFFLINE=1 TRITON_INTERPRET=1\npython -m pytest -q\n" in ci


def test_the_same_in_python_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(python_block("### The same in Python"), "README.md", "exec"), scope)
    assert (tmp_path / "demo-py" / "pruned" / "model.safetensors").is_file()
    protected = json.loads((tmp_path / "demo-py" / "selections" / "phone-type.json").read_text())
    assert sum(map(len, protected.values())) > 0  # the example protects real phone-type neurons
    assert set(scope["p"].dims) == {"layer", "gender", "phone", "neuron"} and scope["p"].sizes["layer"] == 3


def is_setup(args: list[str]) -> bool:
    """An install step or the test command of the README's first block (CI runs those)."""
    return args[:3] == ["python3", "-m", "venv"] or args[:1] in (["."], ["pip"]) or args[-3:] == ["-m", "pytest", "-q"]


def run_command(args: list[str], cwd: Path, setup: bool) -> None:
    """One README command: ``neurostat`` in this process, ``torchrun`` as its own job; in the first block
    (``setup``) the install steps and the test command itself are CI's (the test above checks them)."""
    from click.testing import CliRunner

    from neurostat.cli import main

    if args[0] == "neurostat":
        res = CliRunner().invoke(main, args[1:])
        assert res.exit_code == 0, (args, res.output)
    elif args[0] == "torchrun":
        job = [sys.executable, "-m", "torch.distributed.run", *args[1:]]
        res = subprocess.run(job, cwd=cwd, capture_output=True, text=True)
        assert res.returncode == 0, (args, res.stdout[-3000:], res.stderr[-3000:])
    else:
        assert setup and is_setup(args), f"README runs {shlex.join(args)!r}: run it here, or show it in an sh block"


@pytest.mark.slow
def test_the_readme_runs_top_to_bottom(tmp_path, monkeypatch):
    """Every bash and python block in the README's order, in one folder, as a reader would: then the Quick
    Start's selections hold neurons of every property in every layer, and its report and browser have
    something to show."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEUROSTAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline and on a CPU whatever the machine (torchrun's job too)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for i, (language, block, line) in enumerate(blocks()):
        if language == "python":
            exec(compile(block, f"README.md, the block at line {line}", "exec"), {})
        elif language == "bash":
            for args in commands(block):
                run_command(args, tmp_path, setup=i == 0)
    for prop in ("phone-type", "gender", "pitch"):
        neurons = json.loads((tmp_path / "demo" / "selections" / f"{prop}.json").read_text())
        assert len(neurons) == 4 and all(neurons.values()), (prop, {k: len(v) for k, v in neurons.items()})
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    pages = list((tmp_path / "demo" / "browser").rglob("*.html"))
    assert len(pages) > 10 and list((tmp_path / "demo" / "browser").rglob("*.flac"))
    assert (tmp_path / "demo" / "pruned" / "model.safetensors").is_file()
    assert (tmp_path / "cache" / "demo-v4" / "stats.zarr").is_dir()  # the setup line's `neurostat collect`
