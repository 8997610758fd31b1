import numpy as np
import pytest
import torch
from float64_reference import count_slack, phone_mid, stats_reference, topk_reference
from rounding import SUM_BOUND, assert_within, layer_scale, moment_tolerances, unit_roundoff

from neurostat.engine.accumulate import Accumulator
from neurostat.engine.batching import TokenBatch
from neurostat.engine.statistics import TABLE, topk_mask
from neurostat.engine.tokens import token_mask


@pytest.mark.parametrize("n, d, k", [(1, 1, 1), (7, 13, 3), (33, 101, 10), (5, 40, 40)])
def test_topk_mask_matches_stable_sort_with_ties(n, d, k):
    g = torch.Generator().manual_seed(n * d + k)
    x = torch.randn(n, d, generator=g)
    x[:, ::3] = torch.round(x[:, ::3])  # many exact ties in |x|, also at the k-th value
    x[0] = 0.5 * torch.sign(torch.randn(d, generator=g))  # a whole row of ties
    got = topk_mask(x, k).numpy()
    assert (got.sum(1) == k).all()
    np.testing.assert_array_equal(got, topk_reference(x.double().numpy(), k))


def _random_batch(g, n_frames, num_labels, width, dtype=torch.float32):
    flat = torch.randint(-1, num_labels, (n_frames,), generator=g).numpy()
    flat[flat == 2] = 5  # label 2 never appears: an empty class
    x = torch.randn(n_frames, width, generator=g, dtype=dtype) * 3 + 1
    return flat, x


def test_accumulator_against_float64_reference_and_merge():
    g = torch.Generator().manual_seed(0)
    L, U, D, k = 2, 7, 29, 4
    rows = {0: [], 1: []}
    every = tuple(TABLE)
    whole = Accumulator(L, U, D, k, every)
    parts = [Accumulator(L, U, D, k, every) for _ in range(3)]
    for step in range(6):
        flat, x0 = _random_batch(g, 41 + step, U, D, torch.float64)
        batch = TokenBatch.from_labels(flat)
        xs = [x0, torch.randn(x0.shape, generator=g, dtype=torch.float64)]
        for layer, x in enumerate(xs):
            whole.update(layer, x, batch)
            parts[step % 3].update(layer, x, batch)
            for t, lab in zip(batch.index.tolist(), flat[batch.index.numpy()]):
                rows[layer].append((x[t].double().numpy(), int(lab)))
    ref = stats_reference(rows, U, D, k)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for acc in (whole, merged):
        got = acc.compute()
        assert got["frames"][2] == 0 and np.isnan(got["mean"][:, 2]).all() and np.isnan(got["max_abs"][:, 2]).all()
        for name in ("frames", "topk_count", "positive_count", "max_abs"):
            np.testing.assert_array_equal(got[name], ref[name])
        np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["var"], ref["var"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["abs_sum"], ref["abs_sum"], rtol=1e-12, atol=0)
    back = Accumulator.from_state(whole.state_dict(), k, whole.stats).compute()
    for name, value in whole.compute().items():
        np.testing.assert_array_equal(back[name], value)
    # a checkpoint written before each statistic had its own totals keyed them by state name alone
    flat = {key.rpartition(".")[2]: v for key, v in whole.state_dict().items()}
    assert "mean" in flat and "moments.mean" in whole.state_dict()
    old = Accumulator.from_state(flat, k, whole.stats).compute()
    for name, value in whole.compute().items():
        np.testing.assert_array_equal(old[name], value)


def test_subset_of_stats_and_bad_arguments():
    acc = Accumulator(1, 3, 5, 2, stats=("positive",))
    assert set(acc.totals) == {"positive"} and set(acc.totals["positive"]) == {"positive"}
    flat = np.array([0, 1, -1, 1])
    batch = TokenBatch.from_labels(flat)
    acc.update(0, torch.tensor([[1.0, -1, 0, 2, 3], [-1, -1, -1, -1, 1], [9.0] * 5, [0.5, 0.5, 0.5, 0.5, 0.5]]), batch)
    out = acc.compute()
    assert set(out) == {"frames", "positive_count"}
    assert out["positive_count"][0].tolist() == [[1, 0, 0, 1, 1], [1, 1, 1, 1, 2], [0] * 5]
    partial = Accumulator(2, 3, 5, 2)
    partial.update(0, torch.randn(4, 5), batch)
    with pytest.raises(RuntimeError, match="different tokens"):
        partial.compute()  # layer 2 never saw the batch
    with pytest.raises(ValueError, match="unknown statistics"):
        Accumulator(1, 3, 5, 2, stats=("median",))
    with pytest.raises(ValueError, match="1 <= k <= width"):
        Accumulator(1, 3, 5, 6)


@pytest.mark.parametrize("seed", range(5))
def test_token_modes_against_plain_loops(seed):
    rng = np.random.default_rng(seed)
    phones = np.repeat(rng.integers(-1, 6, 25), rng.integers(1, 6, 25))
    non_speech = [4, 5]
    assert np.flatnonzero(token_mask(phones, "phone-mid")).tolist() == phone_mid(phones)
    assert token_mask(phones, "all").tolist() == [p >= 0 for p in phones]
    assert token_mask(phones, "no-silence", non_speech).tolist() == [p >= 0 and p not in non_speech for p in phones]


def test_phone_mid_keeps_final_run():
    phones = np.array([3, 3, 3, 7, 7, 39, 39, 39, 39])
    assert np.flatnonzero(token_mask(phones, "phone-mid")).tolist() == [1, 3, 6]
    assert not token_mask(np.array([], dtype=np.int64), "phone-mid").any()


@pytest.mark.fp32
@pytest.mark.parametrize("design", ["split", "one-read"])
def test_triton_backend_matches_torch_backend(design):
    g = torch.Generator().manual_seed(7)
    L, U, D, k = 2, 7, 23, 3
    accs = {b: Accumulator(L, U, D, k, tuple(TABLE), backend=b, design=design) for b in ("torch", "triton")}
    assert accs["triton"].backend.design == design and accs["torch"].backend.design is None
    longest = 0
    for step in range(3):
        flat, x = _random_batch(g, 19 + step, U, D)
        x[:, ::5] = torch.round(x[:, ::5])
        batch = TokenBatch.from_labels(flat)
        longest = max(longest, np.bincount(flat[flat >= 0]).max())
        for layer in range(L):
            for acc in accs.values():
                acc.update(layer, x * (layer + 1), batch)
    a, b = accs["torch"].compute(), accs["triton"].compute()
    for name in ("frames", "topk_count", "positive_count", "max_abs"):
        np.testing.assert_array_equal(a[name], b[name])
    tolerance = moment_tolerances(0.0, layer_scale(a["max_abs"]), longest, a["frames"], unit_roundoff(np.float32))
    for name in ("mean", "var"):  # the same values summed in another order
        assert_within(a[name], b[name], tolerance[name], name, SUM_BOUND)
    with pytest.raises(ValueError, match="unknown backend"):
        Accumulator(1, 2, 3, 1, backend="cuda")


def test_label_stats_design_choice():
    """Without a GPU ``auto`` is the kernels' default, untimed; a named design is taken as asked; a backend
    that calls no label_stats has none; an unknown design is refused."""
    from neurostat.engine.backends import choose_design, make_backend
    from neurostat.engine.statistics import Params, statistics
    from neurostat.kernels.label_stats import DEFAULT_DESIGN

    stats = statistics(("topk", "positive", "moments", "max_abs"))
    triton = make_backend("triton", stats, Params(3))
    fused = make_backend("triton-fused", stats, Params(3))
    assert triton.label_stats_kinds() == {"topk", "positive", "moments"} and fused.label_stats_kinds() == {"topk"}
    auto = choose_design("auto", triton, "cpu", torch.float32, 11)
    assert auto.design == DEFAULT_DESIGN and auto.microseconds is None and "without a GPU" in auto.reason
    assert choose_design("one-read", fused, "cpu", torch.float32, 11).to_dict() == {
        "design": "one-read",
        "chosen": "asked for",
    }
    assert choose_design("one-read", make_backend("torch", stats, Params(3)), "cpu", torch.float32, 11) is None
    no_kernel = make_backend("triton", statistics(("max_abs",)), Params(3))
    assert choose_design("auto", no_kernel, "cpu", torch.float32, 11) is None
    with pytest.raises(ValueError, match="unknown label_stats design 'chunk'"):
        choose_design("chunk", triton, "cpu", torch.float32, 11)
    with pytest.raises(ValueError, match="unknown label_stats design 'chunk'"):
        make_backend("triton", stats, Params(3), design="chunk")


def test_the_start_of_run_timing_survives_a_failing_new_design(monkeypatch):
    """The timing's plumbing on CPU (each design run once in the interpreter, a made-up time; CUDA events
    need a card): every design runs on the same rows with the same counts, and a design other than the
    default that fails there is reported instead of stopping the run."""
    import contextlib

    from neurostat.engine import backends
    from neurostat.kernels.label_stats import TUNING

    monkeypatch.setattr(backends, "TIMING_ROWS", 12)
    monkeypatch.setattr(backends, "TIMING_LABELS", 3)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    sums = []
    monkeypatch.setattr(backends, "_median_microseconds", lambda call, repeat: len(sums.append(call()) or sums))
    times, failed = backends.time_designs("cpu", torch.float32, 9, 2, {"topk", "positive"})
    assert times == {"split": 1, "one-read": 2} and not failed
    assert set(sums[0]) == {"topk", "positive"} and all(torch.equal(sums[0][n], sums[1][n]) for n in sums[0])
    monkeypatch.setitem(TUNING, "one_read_rows", 3)
    times, failed = backends.time_designs("cpu", torch.float32, 9, 2, {"topk"})
    assert list(times) == ["split"] and "power of two" in failed["one-read"]


def test_an_accumulator_takes_a_backend_instance():
    from neurostat.engine.backends import make_backend
    from neurostat.engine.statistics import Params, statistics

    stats = ("topk", "positive")
    backend = make_backend("torch", statistics(stats), Params(3))
    flat = np.array([0, 1, 1, -1, 2])
    x = torch.randn(5, 11, generator=torch.Generator().manual_seed(1))
    by_name, given = Accumulator(1, 3, 11, 3, stats), Accumulator(1, 3, 11, 3, stats, backend=backend)
    assert given.backend is backend
    for acc in (by_name, given):
        acc.update(0, x, TokenBatch.from_labels(flat))
    for name, value in by_name.compute().items():
        np.testing.assert_array_equal(given.compute()[name], value)
    with pytest.raises(ValueError, match="other statistics"):
        Accumulator(1, 3, 11, 4, stats, backend=backend)


def test_statistics_overlap_by_default_on_cuda_only():
    from neurostat.engine.overlap import resolve_overlap

    assert resolve_overlap(None, "cuda") and resolve_overlap(None, "cuda:1")
    assert not resolve_overlap(None, "cpu") and not resolve_overlap(False, "cuda") and resolve_overlap(True, "cpu")
    assert not Accumulator(1, 2, 3, 1).side.overlap
    on = Accumulator(1, 2, 3, 1, overlap=True).side
    assert on.overlap and on.stream is None  # on CPU every stream is the same one


OVERLAP_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.fp32
@torch.no_grad()
@pytest.mark.parametrize("device", OVERLAP_DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_counts_are_identical_with_and_without_the_side_stream(device, backend):
    """fp16 FFNs with fp32 statistics through ``ffn_activation`` (batches with most rows tokens and with
    few): the side stream changes no count and no moment, and both equal the float64 reference of the
    fp32 activations."""
    from neurostat.model.adapter import FFN

    g = torch.Generator().manual_seed(4)
    L, U, H, D, k = 2, 5, 16, 45, 4
    ffns = []
    for _ in range(L):
        up = torch.nn.Linear(H, D).half().to(device)
        ffns.append(FFN(module=None, up=up, act=torch.nn.GELU(), down=None))
    accs = {
        on: Accumulator(L, U, D, k, ("topk", "positive", "moments"), device, backend, precision="fp32", overlap=on)
        for on in (False, True)
    }
    rows, terms = {layer: [] for layer in range(L)}, np.zeros(L)
    for step in range(4):
        flat = torch.randint(-1, U, (2 * 13,), generator=g).numpy()
        if step % 2:
            flat[flat != 0] = -1  # few tokens: the statistics gather the token rows
        batch = TokenBatch.from_labels(flat).to(device)
        hidden = torch.randn(2, 13, H, generator=g).half().to(device)
        for layer, ffn in enumerate(ffns):
            outs = [acc.ffn_activation(layer, ffn, hidden, batch) for acc in accs.values()]
            assert torch.equal(outs[0], outs[1])
            x, w, b = hidden.double().reshape(-1, H), ffn.up.weight.double(), ffn.up.bias.double()
            exact = ffn.act(x @ w.T + b).cpu()
            rows[layer] += [(exact[t].numpy(), int(flat[t])) for t in np.flatnonzero(flat >= 0)]
            terms[layer] = max(terms[layer], (x.abs() @ w.abs().T + b.abs()).max().item())
    off, on = accs[False].compute(), accs[True].compute()
    ref = stats_reference(rows, U, D, k)
    # the fp32 route: products of halves are exact in fp32, their sum of H + 1 terms within (H + 1)·u·Σ|x w|,
    # GELU's slope below 1.13, its own fp32 evaluation within a few ulps of its value
    u, scale = unit_roundoff(np.float32), layer_scale(ref["max_abs"])
    delta = 1.13 * (H + 1) * u * terms.reshape(-1, 1, 1) + 4 * u * scale
    slack = count_slack(rows, U, D, k, dict(enumerate(delta.ravel())))
    tolerance = moment_tolerances(delta, scale, ref["frames"].max(), ref["frames"], u)
    for name in ("frames", "topk_count", "positive_count"):
        np.testing.assert_array_equal(on[name], off[name], err_msg=name)
        assert (np.abs(on[name] - ref[name]) <= slack.get(name, 0)).all(), name
    for name in ("mean", "var"):
        np.testing.assert_array_equal(on[name], off[name], err_msg=name)
        assert_within(on[name], ref[name], tolerance[name], name, "the fp32 route's bound")
