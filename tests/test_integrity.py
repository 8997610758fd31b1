"""Nothing silent, nothing lost: moved corpora, edited metadata, checkpoints written over their source."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from corpusedit import flip_sex

from neurostat.cli import main
from neurostat.corpus.prepare import PrepareSettings, prepare
from neurostat.corpus.prepared import PreparedCorpus, PreparedCorpusError
from neurostat.engine.collect import CollectConfig, collect
from neurostat.frames import default_geometry
from neurostat.model.loading import load_adapter
from neurostat.neuronset import NeuronSet


def _prepare(root, out):
    return prepare(
        root / "LibriSpeech", "dev-clean", root / "alignments", out, PrepareSettings(default_geometry()), progress=False
    )


def test_prepared_corpus_holds_absolute_paths_and_a_moved_corpus_is_one_error(
    demo_corpus, tiny_model, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    shutil.copytree(demo_corpus, work / "c")
    monkeypatch.chdir(work)
    prepare(
        "c/LibriSpeech", "dev-clean", "c/alignments", "prepared", PrepareSettings(default_geometry()), progress=False
    )
    monkeypatch.chdir(tmp_path)  # another folder: the corpus still reads
    corpus = PreparedCorpus(work / "prepared")
    assert all(os.path.isabs(r["audio"]) and os.path.isfile(r["audio"]) for r in corpus.records)
    corpus.check_audio()
    (work / "c").rename(work / "moved")
    out = tmp_path / "s.zarr"
    with pytest.raises(PreparedCorpusError, match=r"12 of 12 audio files are not where prepare found them .*--root"):
        collect(corpus, load_adapter(str(tiny_model)), out, CollectConfig(), progress=False)
    assert not out.exists()  # refused before any work


def test_editing_speakers_txt_updates_the_cached_gender(corpus_copy, tmp_path):
    out = tmp_path / "p"
    _prepare(corpus_copy, out)
    first = PreparedCorpus(out)[0]
    flipped = flip_sex(corpus_copy, first.speaker)
    _prepare(corpus_copy, out)
    again = PreparedCorpus(out)
    assert again[0].gender == flipped
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["gender"] == flipped


@pytest.mark.parametrize("command", ["prune", "ablate"])
def test_checkpoints_never_overwrite_their_source_or_an_existing_folder(tiny_model, tmp_path, command):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    neurons = tmp_path / "n.json"
    NeuronSet({1: [0, 2]}).save(neurons)
    extra = ["--keep-ratio", "0.5"] if command == "prune" else ["--neurons", str(neurons)]

    def run(out, *more):
        return CliRunner().invoke(main, [command, "--model", str(model), "--out", str(out), *extra, *more])

    for args in ((), ("--overwrite",)):
        r = run(model, *args)
        assert r.exit_code == 1 and f"--out {model} is the input {model}" in r.output, r.output
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    out = tmp_path / "out"
    out.mkdir()
    (out / "neurostat.json").write_text("{}")  # a leftover that would break load_pruned
    r = run(out)
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.output
    r = run(out, "--overwrite")
    assert r.exit_code == 0, r.output
    record = json.loads((out / "neurostat.json").read_text())  # the leftover is replaced by this edit's record
    assert record["edit"] == ("pruned" if command == "prune" else "ablated") and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # the temporary folder was renamed


def test_third_party_progress_bars_are_quiet(tiny_model, tmp_path):
    neurons = tmp_path / "n.json"
    NeuronSet({1: [0]}).save(neurons)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    args = ["--model", str(tiny_model), "--neurons", str(neurons), "--out", str(tmp_path / "o")]
    res = subprocess.run([sys.executable, "-m", "neurostat", "ablate", *args], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Loading weights" not in res.stderr and "Writing model shards" not in res.stderr


def test_user_errors_are_one_line_without_a_traceback(prepared, tiny_model, tmp_path):
    run = CliRunner().invoke
    base = ["collect", "--prepared", str(prepared.path), "--model", str(tiny_model), "--out", str(tmp_path / "s.zarr")]
    if not torch.cuda.is_available():
        r = run(main, [*base, "--device", "cuda"])
        assert r.exit_code == 1 and "sees no CUDA device" in r.output and "Traceback" not in r.output
    r = run(main, [*base, "--topk-ratio", "0"])
    assert r.exit_code == 1 and "--topk-ratio must be in (0, 1]" in r.output
    r = run(main, [*base, "--batch-seconds", "-5"])
    assert r.exit_code == 1 and "--batch-seconds must be positive" in r.output
    assert not (tmp_path / "s.zarr").exists()  # refused before a store was made
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    collect_broken = ["collect", "--prepared", str(prepared.path), "--model", str(broken), "--out", str(tmp_path / "b")]
    for damage in ("corrupt", "missing"):  # corrupt weights, then none at all
        if damage == "missing":
            (broken / "model.safetensors").unlink()
        r = run(main, collect_broken)
        assert r.exit_code == 1 and "cannot load the model's weights" in r.output and "Traceback" not in r.output
    for args, message in ((["--keep", "0"], "leave at least one"), (["--keep-ratio", "1.5"], "--keep-ratio")):
        r = run(main, ["prune", "--model", str(tiny_model), "--out", str(tmp_path / "p"), *args])
        assert r.exit_code == 1 and message in r.output, r.output


def test_a_missing_or_damaged_store_file_is_an_error_naming_it(prepared, tiny_model, tmp_path):
    out = tmp_path / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=0.1), progress=False)
    run = CliRunner().invoke
    r = run(main, ["info", str(out), "--verify"])
    assert r.exit_code == 0 and "verified" in r.output
    chunk = out / "topk_count" / "c" / "1" / "0" / "0"
    original = chunk.read_bytes()
    chunk.write_bytes(bytes(len(original)))  # garbage of the same size: it does not decode; the checksum sees it
    r = run(main, ["select", str(out)])
    assert r.exit_code == 1 and "variable 'topk_count' does not read back" in r.output and "Traceback" not in r.output
    r = run(main, ["info", str(out), "--verify"])
    assert r.exit_code == 1 and "variable 'topk_count', chunk 1/0/0 is damaged" in r.output
    chunk.write_bytes(original[:-7])  # truncated: the cheap check on open sees it
    r = run(main, ["select", str(out)])
    assert r.exit_code == 1 and "variable 'topk_count', chunk 1/0/0 is damaged" in r.output
    chunk.unlink()  # gone: never read as zeros
    for command in (["select", str(out)], ["info", str(out)]):
        r = run(main, command)
        assert r.exit_code == 1 and "chunk 1/0/0 is missing" in r.output and "Traceback" not in r.output
    chunk.write_bytes(original)
    (out / "frames" / "c" / "0").unlink()
    r = run(main, ["select", str(out)])
    assert r.exit_code == 1 and "variable 'frames', chunk 0 is missing" in r.output
    meta = out / "zarr.json"
    meta.write_text(meta.read_text()[:100])
    r = run(main, ["info", str(out)])
    assert r.exit_code == 1 and "metadata is damaged" in r.output and "Traceback" not in r.output


def test_swapped_weights_in_the_same_folder_are_refused_on_resume_and_merge(prepared, tiny_model, tmp_path):
    from neurostat.engine.merge import merge_stores
    from neurostat.model.factory import save_model
    from neurostat.store import StoreError

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    first = load_adapter(str(model))
    assert first.weights and load_adapter(str(model)).weights == first.weights  # cached, stable
    config = lambda i: CollectConfig(topk_ratio=0.1, shard=(i, 2))  # noqa: E731
    collect(prepared, first, tmp_path / "a.zarr", config(0), progress=False)
    save_model(model, seed=7)  # other weights, same folder, same path
    second = load_adapter(str(model))
    assert second.weights != first.weights
    with pytest.raises(StoreError, match="other settings .*weights"):
        collect(prepared, second, tmp_path / "a.zarr", config(0), resume=True, progress=False)
    collect(prepared, second, tmp_path / "b.zarr", config(1), progress=False)
    with pytest.raises(StoreError, match="differs from .* in weights"):
        merge_stores([tmp_path / "a.zarr", tmp_path / "b.zarr"], tmp_path / "m.zarr")


def test_messages_that_used_to_mislead(prepared, tiny_model, tmp_path, monkeypatch):
    from neurostat.engine.accumulate import Accumulator
    from neurostat.store import StoreError, StoreMeta, StoreWriter

    r = CliRunner().invoke(main, ["collect", "--prepared", str(prepared.path), "--model", str(tmp_path / "no" / "dir")])
    assert r.exit_code == 1 and "no such directory" in r.output
    monkeypatch.setattr(sys, "argv", ["neurostat", "collect", "--model", "my models/hubert"])
    out = tmp_path / "s.zarr"
    args = ["collect", "--prepared", str(prepared.path), "--model", str(tiny_model), "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--topk-ratio", "0.1", "--shard", "0/4"])
    assert r.exit_code == 0, r.output
    assert (
        "command: neurostat collect --model 'my models/hubert'" in CliRunner().invoke(main, ["info", str(out)]).output
    )
    meta = StoreMeta.read(out)
    other = meta.replace(fingerprint={**meta.fingerprint, "model": "another"})
    with pytest.raises(StoreError, match="collected with other settings .*model.*new --out or --overwrite"):
        StoreWriter(out, other)  # without --resume: not "pass --resume", which would be refused
    with StoreWriter(out, meta, resume=True):  # another writer holds the store: say so, not "pass --resume"
        with pytest.raises(StoreError, match="being written by pid"):
            StoreWriter(out, meta)
    acc = Accumulator(1, 2, 3, 1, ("moments",))
    acc.tokens[:] = torch.tensor([2, 0])
    acc.totals["moments"]["m2"][0, 0] = torch.tensor([-8.6e-9, 0.5, 0.0], dtype=torch.float64)  # rounding below zero
    var = acc.compute()["var"]
    assert var[0, 0].tolist() == [0.0, 0.25, 0.0] and torch.isnan(torch.from_numpy(var[0, 1])).all()


def test_a_store_written_from_python_says_so(prepared, tiny_model, tmp_path):
    """`info` showed an empty `command:` for a store that `collect` wrote from Python (issue 42, item 7)."""
    out = tmp_path / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=0.1, shard=(0, 4)), progress=False)
    info = CliRunner().invoke(main, ["info", str(out)]).output
    assert f"command: from Python: collect of {prepared.path} with model {tiny_model} into {out}\n" in info


def test_xarray_opens_a_complete_store_without_a_warning(prepared, tiny_model, tmp_path):
    import warnings

    import xarray as xr

    out = tmp_path / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=0.1, shard=(0, 4)), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(out)
    assert {"frames", "topk_count", "mean"} <= set(ds.data_vars)
    assert ds.attrs["progress"] == json.loads((out / "zarr.json").read_text())["attributes"]["progress"]


def test_select_out_is_a_file_only_when_it_says_so(prepared, tiny_model, tmp_path):
    out = tmp_path / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=0.1, shard=(0, 4)), progress=False)
    run = CliRunner().invoke
    r = run(main, ["select", str(out), "--property", "gender", "--out", str(tmp_path / "one")])
    assert r.exit_code == 0 and (tmp_path / "one" / "gender.json").is_file()
    r = run(main, ["select", str(out), "--property", "gender", "--out", str(tmp_path / "g.json")])
    assert r.exit_code == 0 and (tmp_path / "g.json").is_file()
    r = run(
        main, ["select", str(out), "--property", "gender", "--property", "pitch", "--out", str(tmp_path / "two.json")]
    )
    assert r.exit_code == 2 and "give a folder" in r.output and not (tmp_path / "two.json").exists()


def _flip_a_bit_zstd_misses(chunk) -> None:
    """Flips one bit of a chunk (zstd, then its 4-byte CRC-32C) where the zstd frame still decodes to the
    chunk's size: a flip only the checksum sees."""
    from numcodecs import Zstd

    data = chunk.read_bytes()
    size = len(Zstd().decode(data[:-4]))
    for i in range(len(data) - 5, 0, -1):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        try:
            if len(Zstd().decode(bytes(flipped[:-4]))) == size:
                chunk.write_bytes(bytes(flipped))
                return
        except Exception:  # that flip breaks the zstd frame: try the next byte
            continue
    raise AssertionError(f"no silent flip found in {chunk}")


def test_a_flipped_bit_in_a_chunk_is_an_error_naming_the_array(prepared, tiny_model, tmp_path):
    from neurostat.stats import open_stats
    from neurostat.store import StoreError

    out = tmp_path / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=0.1, shard=(0, 4)))
    for name in ("frames", "topk_count", "mean", "phone", "layer"):
        assert json.loads((out / name / "zarr.json").read_text())["codecs"][-1]["name"] == "crc32c", name
    _flip_a_bit_zstd_misses(out / "topk_count" / "c" / "1" / "0" / "0")
    with pytest.raises(StoreError, match="variable 'topk_count' does not read back .*chunk 1/0/0.*checksum"):
        open_stats(out).probability("topk", by=("phone",))
    for command in (["select", str(out)], ["info", str(out)]):
        r = CliRunner().invoke(main, command)
        assert r.exit_code == 1 and "variable 'topk_count' does not read back" in r.output, r.output
        assert "chunk 1/0/0" in r.output and "Traceback" not in r.output


def test_a_store_of_format_2_reads_with_a_note(tmp_path, monkeypatch):
    import numpy as np
    from storefactory import SPACE, make_store
    from zarr.codecs import ZstdCodec

    import neurostat.store
    from neurostat.stats import open_stats

    monkeypatch.setattr(neurostat.store, "_compressors", lambda: (ZstdCodec(level=0),))  # format 2's chain
    frames = np.full(SPACE.size, 3)
    out = make_store(tmp_path / "old.zarr", frames, topk=np.ones((2, SPACE.size, 4)), store_format=2)
    monkeypatch.undo()
    assert json.loads((out / "topk_count" / "zarr.json").read_text())["codecs"][-1]["name"] == "zstd"
    assert int(open_stats(out).tokens(("gender",)).sum()) == frames.sum()
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0 and "note: store format 2 has no checksum in its chunks" in r.output, r.output
    r = CliRunner().invoke(main, ["select", str(out), "--property", "gender"])
    assert r.exit_code == 0, r.output


def test_a_relabelled_corpus_is_refused_on_resume_and_merge_naming_the_labels(corpus_copy, tiny_model, tmp_path):
    """SPEAKERS.TXT corrected between a kill and --resume: prepare runs again into the same folder (as
    `collect --root ... --resume` does), and the store must not mix the two labellings."""
    from neurostat.engine.merge import merge_stores
    from neurostat.store import StoreError

    out = tmp_path / "p"
    _prepare(corpus_copy, out)
    adapter = load_adapter(str(tiny_model))
    config = lambda i: CollectConfig(topk_ratio=0.1, shard=(i, 2))  # noqa: E731
    collect(PreparedCorpus(out), adapter, tmp_path / "a.zarr", config(0), progress=False)
    flip_sex(corpus_copy, PreparedCorpus(out)[0].speaker)
    _prepare(corpus_copy, out)
    relabelled = PreparedCorpus(out)
    with pytest.raises(StoreError, match=r"other settings \(corpus_content\[gender labels\]: store has [0-9a-f]{12}, "):
        collect(relabelled, adapter, tmp_path / "a.zarr", config(0), resume=True, progress=False)
    collect(relabelled, adapter, tmp_path / "b.zarr", config(1), progress=False)
    with pytest.raises(StoreError, match=r"differs from .* in corpus_content\[gender labels\]: the first has") as e:
        merge_stores([tmp_path / "a.zarr", tmp_path / "b.zarr"], tmp_path / "m.zarr")
    assert "phone labels" not in str(e.value) and "audio" not in str(e.value)
    parts = ("phone", "gender", "pitch_bin")
    after = relabelled.content_digests(parts)
    meta = json.loads((out / "meta.json").read_text())  # a folder prepared before digests: computed on opening
    assert set(meta.pop("digests")) == {"phone", "gender", "pitch_bin", "vocabularies", "audio"}
    (out / "meta.json").write_text(json.dumps(meta))
    assert PreparedCorpus(out).content_digests(parts) == after


def test_weights_edited_in_place_keeping_size_and_mtime_are_refused_on_resume(prepared, tiny_model, tmp_path):
    from neurostat.store import StoreError

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = CollectConfig(topk_ratio=0.1, shard=(0, 4))
    collect(prepared, load_adapter(str(model)), tmp_path / "a.zarr", config, progress=False)
    weights = model / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40  # a bit of the last tensor's last value: the file still loads, the model differs
    with open(weights, "r+b") as f:  # in place, the same size
        f.write(data)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(StoreError, match="other settings .*weights: store has [0-9a-f]{12}, this run [0-9a-f]{12}"):
        collect(prepared, load_adapter(str(model)), tmp_path / "a.zarr", config, resume=True, progress=False)


def test_prepared_files_edited_after_prepare_are_refused_by_collect_naming_them(corpus_copy, tiny_model, tmp_path):
    """A label changed in place in the memory-mapped frames.npy (AH -> AO), a gender in the manifest, a value
    in an attached label set: each is refused before any work, naming the file (issue 41, item 3)."""
    import numpy as np

    from neurostat.corpus.labelsets import attach_label_set
    from neurostat.phones import PHONES

    out = tmp_path / "p"
    _prepare(corpus_copy, out)
    adapter, config = load_adapter(str(tiny_model)), CollectConfig(tokens="all")
    collect(PreparedCorpus(out), adapter, tmp_path / "before.zarr", config, progress=False)
    frames = np.load(out / "frames.npy", mmap_mode="r+")
    ah = np.flatnonzero(frames["phone"] == PHONES.index("AH"))
    assert len(ah)
    frames["phone"][ah[0]] = PHONES.index("AO")
    frames.flush()
    del frames
    with pytest.raises(PreparedCorpusError, match=r"frames.npy: changed after prepare .*run prepare again"):
        collect(PreparedCorpus(out), adapter, tmp_path / "s.zarr", config, progress=False)
    assert not (tmp_path / "s.zarr").exists()
    _prepare(corpus_copy, out)  # prepare again: the labels it makes, counted as before
    collect(PreparedCorpus(out), adapter, tmp_path / "again.zarr", config, progress=False)

    manifest = (out / "manifest.jsonl").read_text()
    (out / "manifest.jsonl").write_text(manifest.replace('"gender": "M"', '"gender": "F"', 1))
    with pytest.raises(PreparedCorpusError, match=r"manifest.jsonl: changed after prepare"):
        collect(PreparedCorpus(out), adapter, tmp_path / "s.zarr", config, progress=False)
    (out / "manifest.jsonl").write_text(manifest)

    corpus = PreparedCorpus(out)
    attach_label_set(corpus, "spk", {u.id: [u.speaker] for u in corpus}, "utterance", "speakers")
    values = next((out / "labels").glob("spk-*.values.npy"))
    array = np.load(values)
    np.save(values, (array + 1) % (array.max() + 1))
    with pytest.raises(PreparedCorpusError, match=r"spk-.*values.npy: changed after prepare"):
        collect(PreparedCorpus(out), adapter, tmp_path / "s.zarr", CollectConfig(labels=("spk",)), progress=False)
    base = CollectConfig(labels=("phone", "gender", "pitch_bin"))  # a set not counted is not read
    collect(PreparedCorpus(out), adapter, tmp_path / "s2.zarr", base, progress=False)
