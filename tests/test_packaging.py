"""Nothing in the repository shadows an installed package, and neurostat.kernels imports from a source
checkout, an editable install and a wheel alike.

Each check runs in a fresh interpreter whose current directory is the one a user would run from
(``python -m pytest`` or ``python -m neurostat`` from the root, ``python bench/x.py``), because that
directory is the first entry of ``sys.path``.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the folders whose modules a user's run puts first on sys.path: the root (python -m, pytest), bench/ (its
# scripts), tests/ and tests/kernels/ (pytest's rootdir-relative imports)
RUN_FOLDERS = [ROOT, ROOT / "bench", ROOT / "tests", ROOT / "tests" / "kernels"]


def run_python(code: str, cwd: Path, path: list[Path] = ()) -> str:
    """Runs ``code`` in a new interpreter from ``cwd`` (first on sys.path) with ``path`` after it."""
    env = {"PYTHONPATH": ":".join(map(str, path)), "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def where(module: str, cwd: Path, path: list[Path] = ()) -> list[str]:
    """The files or folders that ``import module`` would load, seen from ``cwd``."""
    code = (
        f"import importlib.util, json; s = importlib.util.find_spec({module!r}); "
        "print(json.dumps(None if s is None else [s.origin] if s.origin else list(s.submodule_search_locations)))"
    )
    return json.loads(run_python(code, cwd, path)) or []


def inside(paths: list[str], folder: Path) -> bool:
    return any(Path(p).resolve().is_relative_to(folder.resolve()) for p in paths)


def test_a_regular_kernels_package_wins_over_the_kernels_folder(tmp_path):
    """Whatever is installed: any package named ``kernels`` later on sys.path is the one imported."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = object\n")
    assert where("kernels", ROOT, [tmp_path / "site"]) == [str(fake / "__init__.py")]


@pytest.mark.skipif(not importlib.metadata.packages_distributions().get("kernels"), reason="hub kernels not installed")
def test_the_hub_kernels_package_resolves_from_the_root_and_a_tiny_hubert_builds():
    """transformers >= 5.25 imports the hub's ``kernels`` whenever it builds a model."""
    found = where("kernels", ROOT)
    assert found and not any(inside(found, folder) for folder in (ROOT / "kernels", ROOT / "tests" / "kernels"))
    code = (
        "from transformers import HubertConfig, HubertModel; "
        "m = HubertModel(HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=37, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), "
        "num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)); print(type(m).__name__)"
    )
    assert run_python(code, ROOT) == "HubertModel"


def test_no_module_of_the_repository_shares_a_name_with_an_installed_package():
    """A module or regular package in a folder that runs put first on sys.path would hide an installed one
    of that name (a folder without ``__init__.py`` cannot: Python prefers any regular package to it)."""
    installed = set(importlib.metadata.packages_distributions()) - {"neurostat"}
    mine = {
        p.stem if p.suffix == ".py" else p.name: p
        for folder in RUN_FOLDERS
        for p in folder.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    clashes = {name: str(mine[name].relative_to(ROOT)) for name in set(mine) & installed}
    assert not clashes, f"these shadow installed packages: {clashes}"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a plain folder (see kernels/README.md)"


def test_the_kernels_import_from_the_source_checkout():
    code = "import neurostat.kernels.label_stats as m, os; print(os.path.realpath(m.__file__))"
    assert run_python(code, ROOT) == str((ROOT / "kernels" / "label_stats.py").resolve())


def test_the_kernels_import_from_the_installed_package(tmp_path):
    """From any other folder the installed neurostat (editable or not) serves neurostat.kernels."""
    if not importlib.metadata.packages_distributions().get("neurostat"):
        pytest.skip("neurostat is not installed (tests run from a bare checkout)")
    code = "import neurostat.kernels.fold_sums as m; print(m.__name__)"
    assert run_python(code, tmp_path) == "neurostat.kernels.fold_sums"


def test_a_wheel_carries_the_kernels(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools in the venv")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, ROOT],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("neurostat-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    names = {p.name for p in (site / "neurostat" / "kernels").iterdir()}
    assert {p.name for p in (ROOT / "kernels").glob("*.py")} <= names
    code = "import neurostat.kernels.label_stats as m; print(m.__file__)"
    assert Path(run_python(code, tmp_path, [site])).is_relative_to(site)


def pins(path: Path) -> dict[str, str]:
    """name → version of a pip constraints file's ``name==version`` lines."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.lower().replace("_", "-").split("==") for line in lines if line)


def requirements() -> dict:
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name.lower(): r.specifier for r in map(Requirement, deps)}


def test_the_requirements_admit_the_tested_stacks():
    """The ranges admit every version we claim to have run: constraints.txt, the floors and the H200 image's."""
    specs = requirements()
    for name, version in pins(ROOT / "constraints.txt").items():
        assert name not in specs or specs[name].contains(version), f"constraints.txt: {name} {version} vs {specs[name]}"
    for name, version in pins(ROOT / ".ci" / "oldest.txt").items():
        assert f">={version}" in str(specs[name]).split(","), f"{name}: the floor must be the tested {version}"
    for version in ("2.11.0", "2.12.0", "2.13.0"):
        assert specs["torch"].contains(version)
    assert specs["transformers"].contains("5.17.0") and specs["triton"].contains("3.6.0")
