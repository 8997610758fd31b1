"""The family table and what a store records of the model that wrote it (issue 39): the records come from the
loaded model and the run's settings, never assumed."""

import torch
from click.testing import CliRunner

from neurostat.cli import main
from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.spec import RunSpec
from neurostat.model.factory import save_model
from neurostat.model.loading import load_adapter
from neurostat.store import StoreMeta


def test_a_store_records_what_its_model_does(prepared, tiny_model, tmp_path):
    """Group norm or not from the front end's modules, the frame mask and front end the run used, and a float64
    run's moments and precision in float64; `info` prints them."""
    base = RunSpec.resolve(CollectConfig(), load_adapter(str(tiny_model)), prepared).store_meta(prepared)
    assert base.batching["group_norm"] == "statistics per utterance over its valid positions"
    assert base.batching["frame_mask"].startswith("boolean frame mask to the encoder")
    assert base.batching["front_end"] == "gemm" and base.batching["dtype"] == "float32"
    assert base.statistics["moments"].startswith("per-batch fp32 sums")
    stable = load_adapter(str(save_model(tmp_path / "ln", stable_layer_norm=True)), dtype=torch.float64)
    config = CollectConfig(front_end="per-utterance", stats=("topk", "moments"))
    meta = RunSpec.resolve(config, stable, prepared).store_meta(prepared)
    assert meta.batching["group_norm"] == "none (a layer-norm front end normalises each frame)"
    assert meta.batching["front_end"] == "per-utterance" and meta.batching["dtype"] == "float64"
    assert meta.statistics["moments"].startswith("per-batch float64 sums")
    assert meta.statistics["precision"].startswith("fp32: the model's own float64 activations")
    out = tmp_path / "s.zarr"
    collect(prepared, stable, out, config, progress=False)
    assert StoreMeta.read(out).batching == meta.batching
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0, res.output
    assert "forward: per-utterance front end on cpu; group norm: none (a layer-norm front end" in res.output
    assert "precision: float64 model; statistics fp32: the model's own float64 activations" in res.output
    assert "moments: per-batch float64 sums" in res.output


def _table_names() -> set[str]:
    """The transformers attribute names the family table and its input readers use: every module path of the
    table, and every attribute they read of a config or a feature extractor."""
    import ast
    from pathlib import Path

    from neurostat.model.families import FAMILIES

    names = set()
    for f in FAMILIES.values():
        paths = [*f.backbones, f.encoder, f.layers, f.conv_layers, f.projection, f.positional, *f.convs]
        paths += [p for place in f.ffns for p in (place.container, place.up, place.act, place.down)]
        names |= {a for p in paths if p for a in p.split(".")} | {f.activation}
    root = Path(__file__).resolve().parent.parent / "neurostat" / "model"
    for file in ("families.py", "inputs.py"):
        for node in ast.walk(ast.parse((root / file).read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("config", "encoder", "fe", "feature_extractor"):
                    names.add(node.attr)
    from neurostat.frames import FrameGeometry
    from neurostat.model.inputs import LogMelSettings

    own = {*FrameGeometry.__dataclass_fields__, *LogMelSettings.__dataclass_fields__, "feature_extractor"}
    return names - own - {"", "encoder", "layers", "model"}  # neurostat's own names; words too plain to tell


def test_transformers_names_appear_only_in_the_family_table():
    """No module outside the table and its input readers reaches a part of a model, a config or a feature
    extractor by transformers' attribute name (the test models' factory builds configs, so it may)."""
    import ast
    from pathlib import Path

    hf = _table_names()
    assert {"intermediate_dense", "fc1", "feed_forward", "pos_conv_embed", "max_source_positions", "hop_length"} <= hf
    root = Path(__file__).resolve().parent.parent / "neurostat"
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() in ("model/families.py", "model/inputs.py", "model/factory.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                arg = node.args[1] if len(node.args) > 1 else None
                name = arg.value if isinstance(arg, ast.Constant) else None
            if name in hf:
                found.append(f"{path.relative_to(root)}:{node.lineno} .{name}")
    assert not found, found


def test_no_file_of_the_model_package_is_over_300_lines():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "neurostat" / "model"
    sizes = {p.name: len(p.read_text().splitlines()) for p in root.glob("*.py")}
    assert max(sizes.values()) <= 320, sizes
