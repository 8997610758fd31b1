"""k-means label sets: the k-means itself, frame units and utterance clusters of a tiny model, the CLI."""

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from rounding import SUM_BOUND, unit_roundoff
from transformers import AutoFeatureExtractor, AutoModel

from neurostat.cli import main
from neurostat.cluster.features import cluster_features, cluster_vectors
from neurostat.cluster.kmeans import assign, kmeans
from neurostat.corpus.labelsets import LabelSetError
from neurostat.corpus.prepared import PreparedCorpus
from neurostat.model.families import ModelError
from neurostat.model.loading import load_adapter


@pytest.fixture
def corpus(prepared, tmp_path) -> PreparedCorpus:
    shutil.copytree(prepared.path, tmp_path / "prepared")
    return PreparedCorpus(tmp_path / "prepared")


def blobs(rng, sizes, dim=5, spread=0.1):
    centres = rng.normal(0, 10, (len(sizes), dim))
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return x, truth


def same_partition(a, b) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.fp32
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_recovers_blobs_and_is_a_lloyd_fixed_point(dtype):
    rng = np.random.default_rng(3)
    x, truth = blobs(rng, [37, 11, 52, 5])
    xt = torch.from_numpy(x).to(dtype)
    fit = kmeans(xt, 4, seed=1)
    labels, dists = assign(xt, fit.centroids)
    assert same_partition(labels.numpy(), truth)
    # converged: every centroid is the mean of its points, every point is at its nearest centroid
    u = unit_roundoff(dtype)
    for c in range(4):  # a mean of n points, each rounded to dtype: within (n + 1)·u·max|x| (SUM_BOUND)
        members = x[labels.numpy() == c]
        bound = (len(members) + 1) * u * np.abs(members).max()
        assert (np.abs(fit.centroids[c].double().numpy() - members.mean(0)) <= bound).all(), SUM_BOUND
    full = ((x[:, None, :] - fit.centroids.double().numpy()[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels.numpy(), full.argmin(1))
    # a sum of N distances, each |x|² - 2x·c + |c|² over D coordinates: within (N + 3D)·u·Σ(|x| + |c|)²
    scale = ((np.abs(x) + np.abs(fit.centroids.double().numpy()[labels.numpy()])) ** 2).sum()
    assert abs(fit.inertia - full.min(1).sum()) <= (len(x) + 3 * x.shape[1]) * u * scale, SUM_BOUND
    again = kmeans(xt, 4, seed=1)
    torch.testing.assert_close(again.centroids, fit.centroids, rtol=0, atol=0)


def test_kmeans_errors_and_duplicates():
    x = torch.zeros(6, 3)
    with pytest.raises(ValueError, match="fewer than 2 distinct points"):
        kmeans(x, 2)
    with pytest.raises(ValueError, match="need 1 <= clusters <= points, got 7 clusters for 6 points"):
        kmeans(x, 7)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.zeros(4), 1)
    x = torch.tensor([[0.0]] * 50 + [[10.0]] * 50 + [[5.0]])
    labels, _ = assign(x, kmeans(x, 3, seed=0).centroids)
    assert torch.bincount(labels, minlength=3).min() >= 1


def reference_features(corpus, model_dir, layer):
    """Output of Transformer layer ``layer`` from the model's own batch-1 forward (hidden_states)."""
    model = AutoModel.from_pretrained(model_dir).eval()
    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    out = {}
    for utt in corpus:
        wave, sr = sf.read(utt.audio_path, dtype="float32")
        x = torch.from_numpy(fe(wave, sampling_rate=sr, return_tensors="np").input_values[0])
        with torch.no_grad():
            out[utt.id] = model(x[None], output_hidden_states=True).hidden_states[layer][0].double().numpy()
    return out


def test_frame_units_are_the_nearest_centroid_of_the_layer_output(corpus, tiny_model):
    adapter = load_adapter(str(tiny_model))
    total = sum(r["num_frames"] for r in corpus.records)
    entry = cluster_features(
        corpus, adapter, "unit", 2, 6, "frame", fit_frames=total // 3, batch_seconds=8.0, progress=False
    )
    assert entry["level"] == "frame" and entry["vocab"] == [str(c) for c in range(6)]
    assert entry["kmeans"]["layer"] == 2 and entry["kmeans"]["fit_frames"] == total // 3
    centroids = np.load(corpus.path / entry["kmeans"]["centroids"])
    assert centroids.shape == (6, adapter.config.hidden_size)
    feats = reference_features(corpus, tiny_model, 2)
    labelled = PreparedCorpus(corpus.path)
    for utt in labelled:
        expect = ((feats[utt.id][:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(utt.part_labels("unit"), expect, err_msg=utt.id)
    assert "unit" in labelled.vocabularies
    with pytest.raises(ModelError, match="has layers 1..3; no layer 4"):
        cluster_features(corpus, adapter, "unit2", 4, 2, progress=False)


def test_utterance_clusters_of_mean_features_and_of_vectors(corpus, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model))
    entry = cluster_features(corpus, adapter, "utt", 3, 2, "utterance", progress=False)
    assert entry["level"] == "utterance" and entry["utterances"] == len(corpus) and len(entry["vocab"]) == 2
    feats = reference_features(corpus, tiny_model, 3)
    centroids = np.load(corpus.path / entry["kmeans"]["centroids"])
    labelled = PreparedCorpus(corpus.path)
    for utt in labelled:
        mean = feats[utt.id].mean(0)
        assert utt.part_labels("utt") == ((centroids - mean) ** 2).sum(1).argmin()
    # given vectors (say i-vectors) that separate the genders: the clusters are the genders
    rng = np.random.default_rng(0)
    offset = {"M": -5.0, "F": 5.0}
    lines = [
        f"{r['id']} " + " ".join(f"{v:.4f}" for v in offset[r["gender"]] + rng.normal(size=4)) for r in corpus.records
    ]
    vectors = tmp_path / "ivectors.txt"
    vectors.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(LabelSetError, match="no labels for 1 of"):
        cluster_vectors(labelled, "ivec", vectors, 2)
    vectors.write_text("\n".join(lines) + "\n")
    cluster_vectors(labelled, "ivec", vectors, 2)
    clusters = np.array([utt.part_labels("ivec") for utt in labelled])
    genders = np.array([utt.gender for utt in labelled])
    assert same_partition(clusters, genders)
    vectors.write_text(lines[0] + "\n" + lines[1] + " 1.0\n")
    with pytest.raises(LabelSetError, match=r"ivectors.txt:2: every vector needs the same"):
        cluster_vectors(labelled, "ivec", vectors, 2)


def test_cli_cluster(corpus, tiny_model, tmp_path):
    run = CliRunner().invoke
    r = run(
        main,
        [
            "cluster",
            str(corpus.path),
            "--name",
            "unit",
            "--clusters",
            "3",
            "--model",
            str(tiny_model),
            "--layer",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "unit: frame level, 3 labels (0, 1, 2); 12 utterances; from k-means of" in r.output
    r = run(main, ["cluster", str(corpus.path), "--name", "x", "--clusters", "3"])
    assert r.exit_code == 2 and "give --model and --layer" in r.output
    r = run(
        main,
        [
            "cluster",
            str(corpus.path),
            "--name",
            "gender",
            "--clusters",
            "2",
            "--model",
            str(tiny_model),
            "--layer",
            "1",
        ],
    )
    assert r.exit_code == 1 and "cannot name a label set" in r.output
    r = run(main, ["labels", "list", str(corpus.path)])
    assert "unit: frame level" in r.output and "k-means of" in r.output


@pytest.mark.parametrize(
    "options, message",
    [
        (["--clusters", "0"], "--clusters must be at least 1, got 0"),
        (["--clusters", "13", "--level", "utterance"], "--clusters 13 is more than the 12 utterances"),
        (["--clusters", "5", "--fit-frames", "4"], "--clusters 5 is more than the 4 frames to fit on"),
        (["--clusters", "3", "--batch-seconds", "0"], "--batch-seconds must be positive, got 0.0"),
    ],
)
def test_cluster_options_are_refused_before_the_model_is_loaded(corpus, tmp_path, options, message):
    """A model folder that does not exist: an option error that comes first proves the model was not loaded."""
    args = ["cluster", str(corpus.path), "--name", "u", "--model", str(tmp_path / "no-model"), "--layer", "1"]
    r = CliRunner().invoke(main, [*args, *options])
    assert r.exit_code == 2 and message in r.output, r.output
