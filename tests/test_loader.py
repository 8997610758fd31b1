"""The loader (issue 27): batches decoded into one buffer, labels from the prepared corpus's memory-mapped
arrays; its items must equal the per-utterance path it replaced, bit for bit."""

import json
import shlex
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from click.testing import CliRunner
from transformers import Wav2Vec2FeatureExtractor

from neurostat.cli import main
from neurostat.corpus.pitch import assign_bins
from neurostat.corpus.prepare import PrepareSettings, prepare
from neurostat.corpus.prepared import PreparedCorpus, PreparedCorpusError, read_utterance_file
from neurostat.engine.batching import BatchDataset, TokenBatch, chunk_tokens, in_place_normalizer, plan_batches
from neurostat.engine.tokens import token_mask
from neurostat.frames import default_geometry, label_frames
from neurostat.labelspace import LabelSpace
from neurostat.model.inputs import normalize_waveform
from neurostat.phones import NON_SPEECH

SUBSET = "dev-clean"


def flacs(corpus):
    return sorted((corpus / "LibriSpeech" / SUBSET).rglob("*.flac"))


def prepared_copy(corpus, out) -> PreparedCorpus:
    prepare(
        corpus / "LibriSpeech", SUBSET, corpus / "alignments", out, PrepareSettings(default_geometry()), progress=False
    )
    return PreparedCorpus(out)


@pytest.fixture
def odd_corpus(corpus_copy, tmp_path) -> PreparedCorpus:
    """The demo corpus with one file at 22050 Hz (resampled at decode), one cut to an odd sample count
    and one cut short (less than a frame's time, so its TextGrid still fits): lengths of 1-6 s."""
    files = flacs(corpus_copy)
    wave, sr = sf.read(files[0], dtype="float32")
    sf.write(files[0], soxr.resample(wave, sr, 22050), 22050)
    for f, cut in ((files[1], 137), (files[2], 301)):
        wave, sr = sf.read(f, dtype="float32")
        sf.write(f, wave[: len(wave) - cut - (len(wave) - cut) % 2 + 1], sr)  # an odd count
    return prepared_copy(corpus_copy, tmp_path / "p")


def reference_item(corpus, pieces, fe, tokens, space):
    """The per-utterance path the loader replaced: each file decoded and normalised on its own by the
    feature extractor, labels from prepare's per-utterance files (utts/<id>.utt), pad_sequence."""
    geo, non_speech = corpus.geometry, [corpus.phones.index(p) for p in NON_SPEECH]
    waves, labels = [], []
    for piece in pieces:
        utt = corpus[piece.index]
        z = read_utterance_file(corpus.path / "utts" / f"{utt.id}.utt")[2]
        phones = label_frames(z["starts"], z["ends"], z["phone"], geo.centres(utt.num_frames))
        bins = assign_bins(z["f0"].astype(np.float64), corpus.edges, corpus.meta.pitch.rule)
        gender = corpus.vocabularies["gender"].index(utt.gender)
        joint = space.encode({"phone": phones, "gender": gender, "pitch_bin": bins})
        joint = np.where(token_mask(phones, tokens, non_speech), joint, -1)
        wave = normalize_waveform(fe, utt.load_audio())
        waves.append(torch.from_numpy(wave[piece.sample_start : piece.sample_start + piece.num_samples].copy()))
        labels.append(joint[piece.frame_start : piece.frame_start + geo.num_frames(piece.num_samples)])
    flat = np.full((len(labels), max(len(lab) for lab in labels)), -1, dtype=np.int64)
    for b, lab in enumerate(labels):
        flat[b, : len(lab)] = lab
    return torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), flat


def frame_labels(item) -> np.ndarray:
    """The per-frame joint labels (−1: no token) a loader item carries in its TokenBatch."""
    waves, tokens = item["waves"], item["tokens"]
    frames = item["padded_frames"] // max(len(waves), 1)
    flat = np.full(len(waves) * frames, -1, dtype=np.int64)
    flat[tokens.index.numpy()] = tokens.labels[tokens.local].numpy()
    return flat.reshape(len(waves), frames)


@pytest.mark.parametrize("tokens, max_seconds", [("phone-mid", None), ("all", 0.9)])
def test_loader_items_equal_the_per_utterance_path(odd_corpus, tokens, max_seconds):
    corpus, fe = odd_corpus, Wav2Vec2FeatureExtractor(do_normalize=True)
    assert corpus.meta.resampled == 1
    space = LabelSpace.of_corpus(corpus)
    batches = plan_batches(corpus, list(range(len(corpus))), 7.0, max_seconds)
    if max_seconds:
        assert any(p.sample_start > 0 for batch in batches for p in batch)  # utterances cut into pieces
    data = BatchDataset(corpus, batches, fe, tokens, space)
    for i, batch in enumerate(batches):
        item = data[i]
        waves, flat = reference_item(corpus, batch, fe, tokens, space)
        assert item["waves"].dtype == torch.float32 and torch.equal(item["waves"], waves)
        assert item["lengths"].tolist() == [p.num_samples for p in batch]
        assert np.array_equal(frame_labels(item), flat)
        assert item["frames"] == sum(corpus.geometry.num_frames(p.num_samples) for p in batch)
        assert item["errors"] == [] and item["changed"] == []


def test_stored_frame_labels_equal_the_labels_from_intervals(odd_corpus):
    corpus = odd_corpus
    for utt in corpus:
        phones = label_frames(*utt.intervals, corpus.geometry.centres(utt.num_frames))
        assert np.array_equal(utt.phone_frames(), phones) and utt.phone_frames().dtype == np.int64
        assert np.array_equal(utt.pitch_bins(), assign_bins(utt.f0.astype(np.float64), corpus.edges))


def test_a_damaged_file_is_reported_and_the_rest_of_its_batch_is_intact(corpus_copy, tmp_path):
    corpus, fe = prepared_copy(corpus_copy, tmp_path / "p"), Wav2Vec2FeatureExtractor(do_normalize=True)
    space = LabelSpace.of_corpus(corpus)
    batches = plan_batches(corpus, list(range(len(corpus))), 1e4, None)  # one batch of everything
    broken, changed = corpus[0].audio_path, corpus[1].audio_path
    clean = [p for p in batches[0] if p.index not in (0, 1)]
    waves, flat = reference_item(corpus, clean, fe, "all", space)
    broken.write_bytes(b"not a flac" + broken.read_bytes()[10:])  # cannot be decoded
    wave, sr = sf.read(changed)
    sf.write(changed, 0.5 * wave, sr)  # decodes, at the same length, but is not what prepare read
    item = BatchDataset(corpus, batches, fe, "all", space)[0]
    assert [(e["id"], e["reason"]) for e in item["errors"]] == [(corpus[0].id, "corrupt-audio")]
    assert (
        len(item["changed"]) == 1 and f"{changed}: the audio of utterance {corpus[1].id} changed" in item["changed"][0]
    )
    assert torch.equal(item["waves"], waves) and np.array_equal(frame_labels(item), flat)
    assert item["lengths"].tolist() == [p.num_samples for p in clean]


def test_an_old_prepared_folder_is_refused_with_the_command_that_rewrites_it(corpus_copy, tmp_path):
    out = tmp_path / "p"
    before = prepared_copy(corpus_copy, out)
    labels = [(u.phone_frames(), u.pitch_bins(), u.f0) for u in before]
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": 2}))  # as format 2 left it: no label arrays
    for name in ("frames.npy", "intervals.npy", "index.npy"):
        (out / name).unlink()
    with pytest.raises(PreparedCorpusError, match="format 2 is not 3") as e:
        PreparedCorpus(out)
    command = str(e.value).split("reuses its cached utterances: ")[1]
    assert command.startswith("neurostat prepare --root ") and f"--out {out}" in command
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "utts").iterdir()}
    r = CliRunner().invoke(main, shlex.split(command)[1:])
    assert r.exit_code == 0, r.output
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "utts").iterdir()}  # the cache was reused
    after = PreparedCorpus(out)
    assert after.meta.digests == meta["digests"]
    for utt, (phones, bins, f0) in zip(after, labels):
        assert np.array_equal(utt.phone_frames(), phones) and np.array_equal(utt.pitch_bins(), bins)
        assert np.array_equal(utt.f0, f0, equal_nan=True)


def test_the_command_names_the_labelling_options(tmp_path):
    from neurostat.corpus.prepared import prepare_command

    meta = {"root": "/c", "subset": "dev-clean", "alignments": "/a", "frame_labels": "overlap", "strict": True}
    meta["pitch"] = {"method": "yaapt", "edges": [1.0, 2.5], "quantiles": None, "rule": "paper", "step_seconds": 0.02}
    meta["geometry"] = {
        "sample_rate": 16000,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    }
    assert prepare_command(meta, tmp_path) == (
        "neurostat prepare --root /c --subset dev-clean --alignments /a --pitch yaapt --frame-labels overlap "
        f"--pitch-rule paper --pitch-edges 1.0,2.5 --pitch-step-ms 20 --strict --out {tmp_path}"
    )
    quantiles = {**meta, "pitch": {"method": "praat", "quantiles": [0.33, 0.66], "step_seconds": 0.01}}
    assert "--pitch-percentiles 33,66 --strict" in prepare_command(quantiles, tmp_path)
    paper = {
        "root": "/c",
        "subset": "dev-clean",
        "paper_labels": "/info",
        "geometry": {**meta["geometry"], "sample_rate": 8000},
    }
    assert prepare_command(paper, tmp_path).endswith(f"--paper-labels /info --model MODEL --out {tmp_path}")


def test_a_manifest_out_of_step_with_the_label_arrays_is_a_clear_error(corpus_copy, tmp_path):
    out = tmp_path / "p"
    prepared_copy(corpus_copy, out)
    shutil.copy(out / "index.npy", tmp_path / "index.npy")
    index = np.load(out / "index.npy")
    np.save(out / "index.npy", index[1:])
    with pytest.raises(
        PreparedCorpusError, match=f"no labels for 1 utterances, first: {index['id'][0]}.*re-run neurostat"
    ):
        PreparedCorpus(out)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 160_001])
def test_in_place_normalisation_is_the_feature_extractors_bit_for_bit(n):
    rng = np.random.default_rng(n)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 + 0.01, np.full(n, 0.25, dtype=np.float32)]

    class Custom(Wav2Vec2FeatureExtractor):  # another __call__: the loader calls the feature extractor itself
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    for fe in (Wav2Vec2FeatureExtractor(do_normalize=True), Wav2Vec2FeatureExtractor(do_normalize=False), Custom()):
        normalize = in_place_normalizer(fe)
        for wave in waves:
            inplace = wave.copy()
            normalize(inplace)
            assert np.array_equal(inplace, normalize_waveform(fe, wave), equal_nan=True)


def test_token_masks_of_concatenated_utterances_are_each_utterances_own():
    rng = np.random.default_rng(0)
    utts = [rng.integers(-1, 3, int(n)) for n in rng.integers(1, 12, 40)]
    utts[3] = utts[2][-1:].repeat(3)  # the same phone across an utterance boundary: two runs
    starts = np.cumsum([0] + [len(u) for u in utts[:-1]])
    for mode in ("phone-mid", "all", "no-silence"):
        for drop in (False, True):
            joint = token_mask(np.concatenate(utts), mode, [2], drop, starts)
            assert np.array_equal(joint, np.concatenate([token_mask(u, mode, [2], drop) for u in utts]))


def test_token_batches_equal_the_torch_work_list():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(0, 300))
        flat = rng.integers(-1, int(rng.integers(1, 40)), n)
        batch = TokenBatch.from_labels(flat)
        index = np.flatnonzero(flat >= 0)
        labels, local, counts = np.unique(flat[index], return_inverse=True, return_counts=True)
        rows, sorted_local, starts, chunk_labels = chunk_tokens(torch.arange(len(index)), torch.from_numpy(local))
        assert batch.labels.tolist() == labels.tolist() and batch.counts.tolist() == counts.tolist()
        assert batch.local.tolist() == local.tolist() and batch.index.tolist() == index.tolist()
        for mine, theirs in (
            (batch.sorted_tokens, rows),
            (batch.sorted_local, sorted_local),
            (batch.chunk_starts, starts),
        ):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
        assert torch.equal(batch.chunk_labels, chunk_labels)
        assert batch.perm.tolist() == index[rows.numpy()].tolist() + np.flatnonzero(flat < 0).tolist()
