"""The import graph runs one way, down the pipeline, and has no loops (read from the source with ast).

corpus → label space → engine → store → stats/select → model editing; cluster, demo and the CLI on
top; kernels import nothing of neurostat; no module imports the package face (``neurostat/__init__``,
whose lazy attributes import the library).  Imports inside functions count too.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "neurostat.version",
    "neurostat.choices",
    "neurostat.declarations",
    "neurostat.errors",
    "neurostat.files",
    "neurostat.frames",
    "neurostat.machine",
    "neurostat.moments",
    "neurostat.phones",
    "neurostat.presets",
}
ENCODERS = {
    f"neurostat.model.{m}"
    for m in (
        "families",
        "inputs",
        "frontend",
        "adapter",
        "wav2vec2",
        "whisper",
        "filterbank",
        "checkpoints",
        "provenance",
        "loading",
    )
}
"""The model package's encoder side: the family table, the front ends, the adapters, checkpoints and the loader
(what the engine may use; editing and pruning build on it)."""
ALLOWED = {  # unit -> the units it may import (besides itself); a module belongs to its longest listed prefix
    "neurostat": {"neurostat.version"},  # the face: it re-exports the library lazily, nothing imports it
    **{unit: {"neurostat.errors"} for unit in BASE},  # the base modules may share the error classes
    "neurostat.kernels": set(),
    "neurostat.corpus": BASE,
    "neurostat.labelspace": BASE,
    "neurostat.store": BASE,
    "neurostat.neuronset": BASE,
    "neurostat.model": BASE | {"neurostat.neuronset"} | ENCODERS,  # editing: ablation, pruning, test models
    **{unit: BASE | ENCODERS for unit in ENCODERS},  # the families behind the one loader (no loops: below)
    "neurostat.engine": BASE
    | {"neurostat.corpus", "neurostat.labelspace", "neurostat.store", "neurostat.kernels"}
    | ENCODERS,
    "neurostat.stats": BASE | {"neurostat.labelspace", "neurostat.store"},
    "neurostat.select": BASE | {"neurostat.labelspace", "neurostat.store", "neurostat.stats", "neurostat.neuronset"},
    "neurostat.cluster": BASE | {"neurostat.corpus", "neurostat.labelspace", "neurostat.engine", "neurostat.model"},
    "neurostat.tiny": BASE | {"neurostat.corpus", "neurostat.cluster", "neurostat.model"},
    "neurostat.demo": BASE | {"neurostat.corpus", "neurostat.model", "neurostat.tiny"},
    "neurostat.probe": BASE | {"neurostat.corpus", "neurostat.engine", "neurostat.model"},
    "neurostat.compare": BASE | {"neurostat.corpus", "neurostat.engine"},
    "neurostat.report": BASE
    | {"neurostat.neuronset", "neurostat.probe", "neurostat.select", "neurostat.stats", "neurostat.store"},
    "neurostat.diff": BASE | {"neurostat.report", "neurostat.select", "neurostat.stats", "neurostat.store"},
    "neurostat.browse": BASE
    | {"neurostat.corpus", "neurostat.neuronset", "neurostat.report", "neurostat.select", "neurostat.stats"},
    "neurostat.cli": None,  # the library, all of it
    "neurostat.__main__": None,
}


def modules() -> dict[str, Path]:
    """Module name → file, for the package and the kernels folder (imported as neurostat.kernels)."""
    out = {}
    for path in (ROOT / "neurostat").rglob("*.py"):
        if "kernels" in path.relative_to(ROOT / "neurostat").parts:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        stem = "" if path.stem == "__init__" else "." + path.stem
        out["neurostat.kernels" + stem] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The neurostat modules that ``name`` imports (relative imports resolved; ``from a import b`` is the
    module a.b when that is a module, else a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = {f"{target}.{alias.name}" for alias in node.names} & set(known)
            found |= subs or {target}
    return {m for m in found if m == "neurostat" or m.startswith("neurostat.")}


def unit(module: str) -> str:
    return max((u for u in ALLOWED if module == u or module.startswith(u + ".")), key=len)


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a unit that its row of ALLOWED does not list."""
    bad = []
    for module, targets in sorted(graph.items()):
        mine, allowed = unit(module), ALLOWED[unit(module)]
        if allowed is None:
            continue
        for m in sorted(targets):
            theirs = unit(m)
            if theirs != mine and not any(theirs == a or theirs.startswith(a + ".") for a in allowed):
                bad.append(f"{module} ({mine}) imports {m}; it may import {sorted(allowed)}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import loops between files (depth-first search)."""
    seen, stack, found = set(), [], []

    def visit(module):
        if module in stack:
            found.append(stack[stack.index(module) :] + [module])
            return
        if module in seen:
            return
        seen.add(module)
        stack.append(module)
        for other in sorted(graph.get(module, ())):
            visit(other)
        stack.pop()

    for module in sorted(graph):
        visit(module)
    return found


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_no_import_climbs_up_the_pipeline():
    assert len(GRAPH) > 40 and not upward(GRAPH), "\n".join(upward(GRAPH))


def test_no_import_cycles():
    assert not cycles(GRAPH), "import cycles: " + "; ".join(" -> ".join(c) for c in cycles(GRAPH))


def test_the_checks_can_fail(tmp_path):
    """A relative import that climbs (engine → cli) and a loop between two files are both caught."""
    engine = tmp_path / "neurostat" / "engine"
    engine.mkdir(parents=True)
    (engine / "x.py").write_text("from ..cli import app\nfrom . import y\nfrom .. import __version__\n")
    (engine / "y.py").write_text("from .x import thing\n")
    known = {
        "neurostat": None,
        "neurostat.engine.x": engine / "x.py",
        "neurostat.engine.y": engine / "y.py",
        "neurostat.cli.app": None,
    }
    graph = {name: imports(name, path, known) for name, path in known.items() if path is not None}
    assert graph == {
        "neurostat.engine.x": {"neurostat", "neurostat.cli.app", "neurostat.engine.y"},
        "neurostat.engine.y": {"neurostat.engine.x"},
    }
    bad = upward(graph)
    assert "neurostat.engine.x (neurostat.engine) imports neurostat.cli.app" in bad[1]
    assert "neurostat.engine.x (neurostat.engine) imports neurostat;" in bad[0]  # the face
    assert cycles(graph) == [["neurostat.engine.x", "neurostat.engine.y", "neurostat.engine.x"]]


def test_every_cli_choice_is_a_library_constant():
    """A ``click.Choice`` offers a tuple the library validates against (``auto`` aside), never a copy."""
    import click

    from neurostat import choices, presets
    from neurostat.cli import main
    from neurostat.declarations import COUNT_STATS, DECLARATIONS
    from neurostat.engine.tokens import MODES

    library = {tuple(v) for k, v in vars(choices).items() if k.isupper()}
    library |= {MODES, COUNT_STATS, tuple(DECLARATIONS), tuple(sorted(presets.PRESETS))}

    def commands(group):
        for cmd in group.commands.values():
            yield cmd
            if isinstance(cmd, click.Group):
                yield from commands(cmd)

    seen = 0
    for cmd in commands(main):
        for param in cmd.params:
            if isinstance(param.type, click.Choice):
                offered = tuple(c for c in param.type.choices if c != "auto")
                assert offered in library, f"{cmd.name} {param.opts}: {offered} copies a library constant"
                seen += 1
    assert seen >= 15
    for path in (ROOT / "neurostat" / "cli").glob("*.py"):  # and none of them is spelt out in the CLI
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Choice":
                spelt = [e for e in ast.walk(node) if isinstance(e, ast.Constant) and e.value != "auto"]
                assert not spelt, f"{path.name}:{node.lineno}: a Choice spells out {[e.value for e in spelt]}"


def test_the_readme_table_states_these_rules():
    """Each row of the README's architecture table lists its modules and exactly what ALLOWED lets them import."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture") : text.index("## Development")]
    rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| `")]

    def named(cell: str) -> set[str]:
        return {"neurostat." + n.rstrip("/") for n in re.findall(r"`([\w./]+)`", cell)}

    seen = set()
    for units, _, may in rows:
        if may == "everything":
            allowed = None
        elif may.startswith("nothing"):
            allowed = set()
        else:
            allowed = named(may) | (BASE if may.startswith("base") else set())
        for unit in named(units.split(" (")[0]):
            expected = ALLOWED[unit]
            assert allowed == (None if expected is None else set(expected)), (unit, allowed, expected)
            seen.add(unit)
    assert seen == set(ALLOWED) - {"neurostat"}, set(ALLOWED) - {"neurostat"} - seen
