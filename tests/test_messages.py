"""Messages that were tracebacks or misled (issue 31, item 5): reading stores."""

import os
import subprocess
import sys

import numpy as np
import pytest
from storefactory import SPACE, make_store

from neurostat.stats import open_stats
from neurostat.store import Progress, StoreError, StoreMeta, StoreWriter


def test_reduce_takes_frames_like_any_variable_over_the_labels(tmp_path):
    frames = np.arange(SPACE.size, dtype=np.int64)
    stats = open_stats(make_store(tmp_path / "s.zarr", frames, np.ones((2, SPACE.size, 4), np.int64)))
    by_gender = stats.reduce("frames", by=("gender", "phone"))
    assert by_gender.dims == ("gender", "phone")
    assert by_gender.sum().item() == frames.sum()
    assert (by_gender == stats.tokens(("gender", "phone"))).all()
    sil = list(SPACE.vocab("phone")).index("sil")
    expected = frames.reshape(SPACE.shape)[sil].sum(axis=1)  # parts: phone, gender, pitch_bin
    assert by_gender.sel(phone="sil").values.tolist() == expected.tolist()


def test_an_incomplete_store_says_how_many_utterances_are_checkpointed(tmp_path):
    done = make_store(tmp_path / "done.zarr", np.ones(SPACE.size, np.int64), np.ones((1, SPACE.size, 3), np.int64))
    meta = StoreMeta.read(done).replace(complete=False, progress=Progress())
    with StoreWriter(tmp_path / "part.zarr", meta) as writer:
        writer.save_checkpoint({}, ["a", "b", "c"], Progress(utterances_done=3))
    with pytest.raises(StoreError, match="interrupted, 3 utterances checkpointed\\); finish it with"):
        open_stats(tmp_path / "part.zarr")


def test_a_damaged_chunk_is_one_error_without_asyncio_noise(tmp_path):
    """Twelve layer chunks read at once, the first garbled: the other reads must not be left pending."""
    store = make_store(tmp_path / "s.zarr", np.ones(SPACE.size, np.int64), np.ones((12, SPACE.size, 64), np.int64))
    chunk = store / "topk_count" / "c" / "0" / "0" / "0"
    chunk.write_bytes(bytes(len(chunk.read_bytes())))
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "neurostat", "select", str(store)], capture_output=True, text=True)
        assert r.returncode == 1 and "variable 'topk_count' does not read back" in r.stderr
        assert "Task was destroyed" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_hubs_retry_lines_stay_quiet_unless_debug(tmp_path):
    """Loading a hub id without network printed a line per retry of huggingface_hub before our one error."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from neurostat.cli import main\n"
        "CliRunner().invoke(main, sys.argv[1:])\n"
        "from huggingface_hub.utils import logging\n"
        "logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
    )
    # a CLI run earlier in this process (CliRunner) may have set HF_HUB_VERBOSITY, and a user may have
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_VERBOSITY"}
    for debug in ([], ["--debug"]):
        args = [sys.executable, "-c", code, *debug, "info", str(tmp_path / "none.zarr")]
        res = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        assert ("Retrying" in res.stderr) == bool(debug), res.stderr


def test_an_interrupted_merge_says_to_write_it_again_and_info_shows_the_merge(prepared, tiny_model, tmp_path):
    """A merge killed while it wrote the arrays: select advised `collect --resume`, which is refused, and
    info showed the first shard's command (issue 41, item 6)."""
    from click.testing import CliRunner

    from neurostat.cli import main
    from neurostat.engine.collect import CollectConfig, collect
    from neurostat.model.loading import load_adapter

    adapter = load_adapter(str(tiny_model))
    shards = [tmp_path / f"s{i}.zarr" for i in range(2)]
    for i, shard in enumerate(shards):
        collect(prepared, adapter, shard, CollectConfig(shard=(i, 2), layers=[1]), progress=False)
    out = tmp_path / "merged.zarr"
    killed = subprocess.run(
        [sys.executable, "-c", "import os, sys, neurostat.store as s; from neurostat.cli import main\n"
         "s.StoreWriter.finalize = lambda *a, **k: os._exit(9)\nmain(sys.argv[1:])",
         "merge", *map(str, shards), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert killed.returncode == 9, killed.stderr
    again = f"neurostat merge {shards[0]} {shards[1]} --out {out} --overwrite"
    with pytest.raises(StoreError, match=f"a merge is running or was interrupted\\); write the merge again: `{again}`"):
        open_stats(out)
    info = CliRunner().invoke(main, ["info", str(out)]).output
    assert "INCOMPLETE" in info and f"command: neurostat merge {shards[0]}" in info and again in info
    assert "--resume" not in info
    result = CliRunner().invoke(main, again.split()[1:])
    assert result.exit_code == 0, result.output
    assert open_stats(out).meta.complete
