"""``neurostat diff``: two stores of one model differ in nothing; planted changes are found exactly; the
z statistic, p-values and BH q-values equal float64 formulas written out here; mismatched stores are errors."""

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from storefactory import SPACE, joint, make_store

from neurostat.cli import main
from neurostat.diff import DiffError, StoreDiff, benjamini_hochberg, diff_stores, two_proportion_test
from neurostat.labelspace import LabelSpace
from neurostat.phones import ARPABET, PHONES

L, D, K = 2, 10, 2  # chance r = k / D = 0.2
N = 1000  # tokens per (phone, gender) cell
BASE = 200  # P = 0.2 = r everywhere: no property neuron


def counts(space: LabelSpace = SPACE, width: int = D):
    frames = np.zeros(space.size, np.int64)
    topk = np.zeros((L, space.size, width), np.int64)
    for p in ARPABET:
        for g in ("M", "F"):
            frames[joint(p, g, space=space)] = N
            topk[:, joint(p, g, space=space), :] = BASE
    return frames, topk


def planted(tmp_path):
    """A: a female neuron (layer 2, neuron 5); B: that one gone, a male neuron (layer 1, neuron 3) new, and one
    cell (layer 2, AA, M, neuron 0) up from 0.2 to 0.3.  Returns both stores and the changed cells."""
    frames, topk_a = counts()
    topk_b = topk_a.copy()
    changed = set()
    for p in ARPABET:
        topk_a[1, joint(p, "F"), 5] = 900
        topk_b[0, joint(p, "M"), 3] = 900
        changed |= {(2, p, "F", 5), (1, p, "M", 3)}
    topk_b[1, joint("AA", "M"), 0] = 300
    changed.add((2, "AA", "M", 0))
    a = make_store(tmp_path / "a.zarr", frames, topk_a, k=K)
    b = make_store(tmp_path / "b.zarr", frames, topk_b, k=K)
    return a, b, changed


def test_the_same_model_differs_in_nothing(tmp_path):
    frames, topk = counts()
    for p in ARPABET:
        topk[0, joint(p, "M"), 1] = 900  # a male neuron
    a = make_store(tmp_path / "a.zarr", frames, topk, k=K)
    shutil.copytree(a, tmp_path / "b.zarr")
    d = diff_stores(a, tmp_path / "b.zarr", properties=("gender", "phone-type"))
    assert d.empty and d.significant == 0 and d.top == []
    assert d.tested == L * len(ARPABET) * 2 * D  # the empty joint labels are not tested
    assert d.changed_neurons == {1: 0, 2: 0}
    assert d.properties["gender"].kept == {1: 1, 2: 0}  # the male neuron, kept
    assert not any(d.properties["gender"].gained.values()) and not any(d.properties["gender"].lost.values())


def test_planted_changes_found_exactly(tmp_path):
    a, b, changed = planted(tmp_path)
    d = diff_stores(a, b, properties=("gender",), top=1000)
    found = {(c.layer, c.label["phone"], c.label["gender"], c.neuron) for c in d.top}
    assert found == changed and d.significant == len(changed)
    assert all(c.label["pitch_bin"] == "low" for c in d.top)
    assert d.changed_neurons == {1: 1, 2: 2}
    gender = d.properties["gender"]
    assert gender.gained == {1: [3], 2: []} and gender.lost == {1: [], 2: [5]} and gender.kept == {1: 0, 2: 0}
    assert not d.empty
    # the single-cell change is the least significant one; on the marginal (gender, phone) the same cells
    assert d.top[-1].neuron == 0 and (d.top[-1].count_a, d.top[-1].count_b) == (BASE, 300)
    marginal = diff_stores(a, b, properties=("gender",), by=("gender", "phone"), top=1000)
    assert {(c.layer, c.label["phone"], c.label["gender"], c.neuron) for c in marginal.top} == changed
    assert StoreDiff.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def reference(ca, na, cb, nb):
    """The two-proportion z-test written out in float64, one cell."""
    pa, pb, pooled = ca / na, cb / nb, (ca + cb) / (na + nb)
    z = (pb - pa) / math.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
    return z, math.erfc(abs(z) / math.sqrt(2))


def test_statistic_against_a_float64_formula(tmp_path):
    cells = [(200, 1000, 300, 1000), (3, 17, 11, 20), (50, 4000, 41, 3100), (1, 5, 0, 9), (999, 1000, 1000, 1000)]
    z, p = two_proportion_test(*(np.array(c, dtype=np.int64) for c in zip(*cells)))
    for cell, zi, pi in zip(cells, z, p):
        rz, rp = reference(*cell)
        assert zi == pytest.approx(rz, rel=1e-12) and pi == pytest.approx(rp, rel=1e-10)
    z, p = two_proportion_test(np.array([0, 7]), np.array([5, 7]), np.array([0, 9]), np.array([8, 9]))
    assert list(z) == [0.0, 0.0] and list(p) == [1.0, 1.0]  # no variance: no change
    pvals = np.array([0.01, 0.04, 0.03, 0.2, 0.001])
    m = len(pvals)
    expected = [min(1.0, min(sorted(pvals)[j] * m / (j + 1) for j in range(i, m))) for i in range(m)]
    assert np.allclose(benjamini_hochberg(pvals), np.array(expected)[np.argsort(np.argsort(pvals))], rtol=1e-14)
    a, b, _ = planted(tmp_path)
    d = diff_stores(a, b, properties=("gender",), top=1000)
    cell = next(c for c in d.top if c.neuron == 0)
    rz, rp = reference(cell.count_a, cell.tokens_a, cell.count_b, cell.tokens_b)
    assert cell.z == pytest.approx(rz, rel=1e-12) and cell.p == pytest.approx(rp, rel=1e-10)
    assert cell.q == pytest.approx(rp * d.tested / d.significant, rel=1e-10)  # ranked last of the significant


def test_cli_page_and_json(tmp_path):
    a, b, changed = planted(tmp_path)
    out = tmp_path / "diff"
    for _ in range(2):  # a diff page may be rewritten
        result = CliRunner().invoke(main, ["diff", str(a), str(b), "--property", "gender", "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert "gender gained" in result.stdout and "Benjamini-Hochberg" in result.stdout
    page = (out / "index.html").read_text()
    assert "<title>neurostat diff" in page and 'data-property="gender" data-kind="lost" data-layer="2">1<' in page
    assert (out / "diff_gender.png").read_bytes()[:4] == b"\x89PNG"
    saved = StoreDiff.from_dict(json.loads((out / "diff.json").read_text()))
    assert saved.properties["gender"].gained == {1: [3], 2: []} and saved.significant == len(changed)
    assert "Benjamini-Hochberg" in saved.correction
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["diff", str(a), str(b), "--out", str(other)])
    assert result.exit_code == 1 and "is not a diff page" in result.output


def test_mismatched_stores_are_errors(tmp_path):
    frames, topk = counts()
    a = make_store(tmp_path / "a.zarr", frames, topk, k=K, fingerprint={"corpus_content": {"phone": "a" * 40}})
    runs = {
        "digests": make_store(
            tmp_path / "b.zarr", frames, topk, k=K, fingerprint={"corpus_content": {"phone": "b" * 40}}
        ),
        "subset": make_store(tmp_path / "c.zarr", frames, topk, k=K, corpus={"subset": "dev-other"}),
    }
    space = LabelSpace.of({"phone": PHONES, "gender": ("M", "F"), "pitch_bin": ("low", "mid", "high")})
    runs["labels"] = make_store(tmp_path / "d.zarr", *counts(space), k=K, space=space)
    runs["width"] = make_store(tmp_path / "e.zarr", *counts(width=12), k=K)
    same = make_store(tmp_path / "f.zarr", frames, topk, k=K)
    expected = {
        "digests": ["different corpora", "corpus_content[phone]: A aaaaaaaaaaaa, B bbbbbbbbbbbb"],
        "subset": ["different corpora", "corpus subset: A '-', B 'dev-other'"],
        "labels": [
            "different label vocabularies",
            "pitch_bin: A ['low', 'mid', 'high', 'unvoiced'], B ['low', 'mid', 'high']",
        ],
        "width": ["layers [1, 2] × 10 neurons", "[1, 2] × 12"],
    }
    for name, other in runs.items():
        first = a if name == "digests" else same
        result = CliRunner().invoke(main, ["diff", str(first), str(other)])
        assert result.exit_code == 1, (name, result.output)
        assert str(other) in result.output and all(e in result.output for e in expected[name]), result.output
        with pytest.raises(DiffError):
            diff_stores(first, other)


def test_different_settings_are_a_warning_listing_them(tmp_path):
    frames, topk = counts()
    a = make_store(tmp_path / "a.zarr", frames, topk, k=K)
    b = make_store(tmp_path / "b.zarr", frames, topk, k=K, statistics={"tokens": "all", "topk_ratio": 0.3})
    result = CliRunner().invoke(main, ["diff", str(a), str(b), "--property", "gender"])
    assert result.exit_code == 0, result.output
    assert "warning: the stores were collected with different settings" in result.stderr
    assert "tokens A 'phone-mid', B 'all'; topk_ratio A 0.2, B 0.3" in result.stderr
    with pytest.warns(UserWarning, match="tokens A 'phone-mid', B 'all'"):
        assert diff_stores(a, b, properties=("gender",)).empty


def test_label_parts_only_one_store_counts_are_summed_out(tmp_path):
    """The Quick Start attaches k-means units to the prepared corpus after the first collect: a store collected
    later counts them too.  diff compares over the label parts both count and says what it summed out; two
    stores with no part in common are an error saying how to collect them (issue 42, item 1)."""
    content = {"phone labels": "p" * 40, "gender labels": "g" * 40, "vocabularies": "v" * 40, "audio": "a" * 40}
    frames, topk = counts()
    a = make_store(tmp_path / "a.zarr", frames, topk, k=K, fingerprint={"corpus_content": content})
    space = LabelSpace.of({**{p: SPACE.vocab(p) for p in SPACE.parts}, "unit": ("u0", "u1")})
    frames_b, topk_b = np.zeros(space.size, np.int64), np.zeros((L, space.size, D), np.int64)
    for p in ARPABET:
        for g in ("M", "F"):
            for unit, share in (("u0", 0.6), ("u1", 0.4)):  # the same cells split over two units
                cell = joint(p, g, space=space, unit=unit)
                frames_b[cell], topk_b[:, cell] = round(N * share), round(BASE * share)
    unit_content = {**content, "unit labels": "u" * 12}
    b = make_store(tmp_path / "b.zarr", frames_b, topk_b, k=K, space=space, fingerprint={"corpus_content": unit_content})
    d = diff_stores(a, b, properties=("gender",))
    assert d.empty and d.by == ["phone", "gender", "pitch_bin"] and d.summed_out == {"A": [], "B": ["unit"]}
    assert "summed out, as only one store counts them: B's unit" in d.describe()
    result = CliRunner().invoke(main, ["diff", str(a), str(b), "--by", "unit"])
    assert result.exit_code == 1 and "--by unit: not a label part of both stores" in result.output
    only_units = LabelSpace.of({"unit": ("u0", "u1")})
    c = make_store(tmp_path / "c.zarr", np.full(2, N, np.int64), np.full((L, 2, D), BASE, np.int64), k=K,
                   space=only_units)  # fmt: skip
    with pytest.raises(DiffError, match="none in common; collect both with the same --labels"):
        diff_stores(a, c)
