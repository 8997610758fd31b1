"""Statistics precision: the tie study.  fp16 activations built to tie often at the k-th |a|; the fp32
statistics match an fp32 forward of the same rounded weights and inputs exactly, the model-precision ones
do not, and their errors lean towards low neuron indices (the lower-index tie rule decides them)."""

import numpy as np
import pytest
import soundfile as sf
import torch
import xarray as xr
from float64_reference import stats_reference, topk_reference
from rounding import SUM_BOUND, assert_within, layer_scale, moment_tolerances, unit_roundoff
from transformers import AutoFeatureExtractor, AutoModel

from neurostat.engine.accumulate import Accumulator
from neurostat.engine.backends import ROUTE_BOUND, Backend, fp32_preactivation
from neurostat.engine.batching import TokenBatch
from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.statistics import Params
from neurostat.labelspace import LabelSpace
from neurostat.model.adapter import FFN
from neurostat.model.inputs import normalize_waveform
from neurostat.model.loading import load_adapter

pytestmark = pytest.mark.fp32
H, D, K, LABELS = 24, 193, 19, 5
GELU_ERROR = 16 * unit_roundoff(torch.float32)
"""torch's fp32 GELU is within GELU_ERROR·(|a| + |x|) of GELU(x) (measured: 5.4·u on [-12, 12]; GELU(x) = x·Φ(x))."""
STATS = ("topk", "positive", "moments")


def tie_prone_ffn(g: torch.Generator) -> FFN:
    """Pre-activations 3 + m·2⁻¹² (exact in fp32, several of them per fp16 step of 2⁻⁹ near 3)."""
    up = torch.nn.Linear(H, D)
    with torch.no_grad():
        up.weight.copy_(torch.randint(-8, 9, (D, H), generator=g) * 2.0**-12)
        up.bias.fill_(3.0)
    return FFN(module=None, up=up.half(), act=torch.nn.GELU(), down=None)


def batches(g: torch.Generator, n: int = 3):
    """(hidden [B, T, H] fp16 with integer values, per-frame labels with ignored frames)."""
    for step in range(n):
        b, t = 2 + step % 2, 17 + step
        hidden = torch.randint(-2, 3, (b, t, H), generator=g).half()
        labels = torch.randint(-1, LABELS, (b * t,), generator=g).numpy()
        yield hidden, labels


@torch.no_grad()
def run(precision: str, backend: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ffn = tie_prone_ffn(g)
    acc = Accumulator(1, LABELS, D, K, STATS, backend=backend, precision=precision)
    rows = {0: []}
    for hidden, labels in batches(g):
        batch = TokenBatch.from_labels(labels)
        a = acc.ffn_activation(0, ffn, hidden, batch)
        stock = ffn.act(ffn.up(hidden))
        pre = hidden.double() @ ffn.up.weight.double().T + ffn.up.bias.double()  # exact in fp32 by design
        if backend != "triton-fused":  # the fp32 route's rounding of these exact sums is the stock one
            assert torch.equal(a, stock), "the model's forward must not change"
        else:  # GELU of the fp32 sum, rounded once, against GELU (slope < 1.13) of the sum rounded to fp16
            bound = 1.13 * half_ulp(pre, torch.float16) / 2 + half_ulp(stock, torch.float16) + GELU_ERROR * pre.abs()
            assert ((a.double() - stock.double()).abs() <= bound).all()
        exact = torch.nn.functional.gelu(pre).reshape(-1, D)
        rows[0] += [(exact[i].numpy(), int(labels[i])) for i in batch.index.tolist()]
    return acc.compute(), stats_reference(rows, LABELS, D, K), rows[0]


BACKENDS = ["torch", "triton", "triton-fused"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_statistics_match_an_fp32_forward_in_an_fp16_run(backend):
    got, ref, _ = run("fp32", backend)
    for name in ("frames", "topk_count", "positive_count"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    # the exact pre-activations (here 3 ± 0.2) through fp32's GELU, then fp32 per-batch sums
    scale, u = layer_scale(ref["max_abs"]), unit_roundoff(np.float32)
    pre = 3 + H * 8 * 2.0**-12 * 2  # |x| of tie_prone_ffn's pre-activations, integer inputs within ±2
    tolerance = moment_tolerances(GELU_ERROR * (scale + pre), scale, ref["frames"].max(), ref["frames"], u)
    for name in ("mean", "var"):
        assert_within(got[name], ref[name], tolerance[name], name, SUM_BOUND)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_precision_top_k_is_decided_by_ties_towards_low_indices(backend):
    got, ref, rows = run("model", backend)
    half = np.stack([torch.tensor(v).half().float().numpy() for v, _ in rows])
    tied = np.mean([np.sum(np.abs(r) == np.sort(np.abs(r))[-K]) > 1 for r in half])  # rows with a tie at the k-th value
    assert tied > 0.5
    gained = np.clip(got["topk_count"] - ref["topk_count"], 0, None)[0].sum(0)
    lost = np.clip(ref["topk_count"] - got["topk_count"], 0, None)[0].sum(0)
    assert gained.sum() == lost.sum() > 0.05 * ref["topk_count"].sum()
    index = np.arange(D)
    assert (gained @ index) / gained.sum() < (lost @ index) / lost.sum()
    np.testing.assert_array_equal(got["frames"], ref["frames"])


@torch.no_grad()
@pytest.mark.parametrize("precision", ["fp32", "model"])
def test_a_float32_model_counts_its_own_activations_under_either_precision(precision):
    """For a float32 model both settings take the statistics of the activations the model computes: the
    counts equal a numpy reference on exactly those values (ties included), the moments within float64."""
    g = torch.Generator().manual_seed(3)
    ffn = tie_prone_ffn(g)
    ffn.up.float()
    acc = Accumulator(1, LABELS, D, K, STATS, precision=precision)
    rows = {0: []}
    for hidden, labels in batches(g):
        batch = TokenBatch.from_labels(labels)
        x = hidden.float() + 0.25
        acc.ffn_activation(0, ffn, x, batch)
        a = ffn.act(ffn.up(x)).reshape(-1, D).double()  # the model's own fp32 values, widened exactly
        rows[0] += [(a[i].numpy(), int(labels[i])) for i in batch.index.tolist()]
    got, ref = acc.compute(), stats_reference(rows, LABELS, D, K)
    assert (ref["topk_count"].sum(-1) == K * ref["frames"]).all() and ref["frames"].sum() > 0
    for name in ("frames", "topk_count", "positive_count"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    u = unit_roundoff(np.float32)
    tolerance = moment_tolerances(0.0, layer_scale(ref["max_abs"]), ref["frames"].max(), ref["frames"], u)
    for name in ("mean", "var"):  # the same values: only the fp32 per-batch sums differ
        assert_within(got[name], ref[name], tolerance[name], name, SUM_BOUND)


def half_ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |t| (float64; subnormal spacing below the smallest normal)."""
    info = torch.finfo(dtype)
    mag = t.abs().double().clamp_min(info.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_fp32_route_keeps_the_model_within_the_stated_bound_of_its_stock_forward(dtype):
    """fp32 statistics without a second GEMM: the model continues from the half rounding of the one fp32
    GEMM, each pre-activation within one ulp + the fp32 accumulation error of the stock one (ROUTE_BOUND),
    its activation equal to the stock one where the two pre-activations agree."""
    g = torch.Generator().manual_seed(5)
    k_in, width = 256, 301
    up = torch.nn.Linear(k_in, width).to(dtype)
    with torch.no_grad():
        up.bias.copy_(torch.randn(width, generator=g) * 2)
    ffn = FFN(module=None, up=up, act=torch.nn.GELU(), down=None)
    hidden = (torch.randn(3, 41, k_in, generator=g) * 3).to(dtype)
    backend = Backend((), Params(1), precision="fp32")
    a, pre = backend.ffn_forward(ffn, hidden)
    x = hidden.reshape(-1, k_in)
    stock_h, h = up(x), fp32_preactivation(up, x).to(dtype)
    assert torch.equal(pre.to(dtype), h) and pre.dtype == torch.float32
    stock_a = ffn.act(stock_h).reshape(a.shape)
    same = (h == stock_h).reshape(a.shape)
    assert a.dtype == dtype and torch.equal(a[same], stock_a[same]) and same.float().mean() > 0.99
    accumulation = x.double().abs() @ up.weight.double().abs().T + up.bias.double().abs()
    bound = half_ulp(torch.maximum(h.double().abs(), stock_h.double().abs()), dtype)
    bound += 2 * (k_in + 1) * 2.0**-24 * accumulation
    assert ((h.double() - stock_h.double()).abs() <= bound).all(), ROUTE_BOUND
    exact = x.double() @ up.weight.double().T + up.bias.double()  # and the statistics' fp32 values are close to it
    assert ((pre.double() - exact).abs() <= (k_in + 1) * 2.0**-24 * accumulation).all()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_collect_forward_with_fp32_statistics_stays_within_the_half_models_own_error(tiny_model, dtype):
    """Whole model: the last hidden state of the instrumented forward (fp32 statistics) differs from the
    stock half-precision forward by at most 2 % of what that forward itself differs from an fp32 forward of
    the same weights (on CPU it is bitwise the stock forward; rounding the fp32 activation instead of
    the pre-activation would move it by 6-11 %)."""
    half = load_adapter(str(tiny_model), dtype=dtype)
    full = load_adapter(str(tiny_model), dtype=dtype)
    full.model.float()
    g = torch.Generator().manual_seed(2)
    waves = [torch.randn(n, generator=g) * 0.1 for n in (16000, 11000)]
    stock, _ = half.encode(waves)
    reference, _ = full.encode(waves)
    frames = stock.shape[0] * stock.shape[1]
    batch = TokenBatch.from_labels(np.arange(frames) % 3)
    acc = Accumulator(half.num_layers, 3, half.width, 2, ("topk",), precision="fp32")
    with half.instrument(lambda i, f, h: acc.ffn_activation(i, f, h, batch)):
        ours, _ = half.encode(waves)
    assert acc.compute()["frames"].sum() == frames
    own_error = (stock.double() - reference.double()).norm()
    assert (ours.double() - stock.double()).norm() <= 0.02 * own_error, "the route moved the model too far"


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        Accumulator(1, 2, 3, 1, precision="fp64")


@torch.no_grad()
def ffn_input_reference(prepared, model_dir, dtype, k_ratio):
    """Top-k counts of act(x W1ᵀ + b1) in float64 from the FFN inputs x of the model's own batch-1 forward in
    ``dtype`` (captured by hooks), and those of the activations that forward computes."""
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).eval()
    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    seen = {}
    for i, layer in enumerate(model.encoder.layers):
        layer.feed_forward.intermediate_dense.register_forward_hook(
            lambda m, inp, out, i=i: seen.__setitem__(i, (inp[0][0], m))
        )
        layer.feed_forward.intermediate_act_fn.register_forward_hook(
            lambda m, inp, out, i=i: seen.__setitem__(("a", i), out[0])
        )
    space = LabelSpace.of_corpus(prepared)
    width = model.config.intermediate_size
    k = max(1, round(k_ratio * width))
    exact = np.zeros((len(model.encoder.layers), space.size, width), np.int64)
    rounded = np.zeros_like(exact)
    for utt in prepared:
        wave, _ = sf.read(utt.audio_path, dtype="float32")
        model(torch.from_numpy(normalize_waveform(fe, wave)).to(dtype)[None])
        joint = space.joint_frames(utt)
        phones = utt.phone_frames()
        frames = [t for t in range(len(phones)) if phones[t] >= 0]  # --tokens all
        for i in range(len(model.encoder.layers)):
            x, dense = seen[i]
            a = torch.nn.functional.gelu(x.double() @ dense.weight.double().T + dense.bias.double()).numpy()
            for t in frames:
                exact[i, joint[t]] += topk_reference(a[t][None], k)[0]
                rounded[i, joint[t]] += topk_reference(seen[("a", i)][t].double().numpy()[None], k)[0]
    return exact, rounded


def test_fp16_collect_records_the_precision_and_fp32_statistics_follow_the_unrounded_activations(
    prepared, tiny_model, tmp_path
):
    """The reference is the model's own fp16 forward, one utterance at a time: collect runs its modules the
    same way (the per-utterance front end), so only the statistics' precision differs — another front end
    rounds fp16 features otherwise, and model-precision ties follow every rounding."""
    adapter = load_adapter(str(tiny_model), dtype=torch.float16)
    counts = {}
    for precision in ("fp32", "model"):
        config = CollectConfig(
            stats=("topk",), topk_ratio=0.1, tokens="all", batch_seconds=1e-3, stats_precision=precision,
            front_end="per-utterance",
        )  # fmt: skip
        attrs = collect(prepared, adapter, tmp_path / f"{precision}.zarr", config, progress=False)
        assert attrs.statistics["precision"].startswith(precision)
        if precision == "fp32":  # the route is recorded with its bound
            assert "ran once with an fp32 output" in attrs.statistics["precision"]
            assert ROUTE_BOUND in attrs.statistics["precision"]
        assert attrs.fingerprint["stats_precision"] == precision
        counts[precision] = xr.open_zarr(tmp_path / f"{precision}.zarr", consolidated=False)["topk_count"].values
    exact, rounded = ffn_input_reference(prepared, tiny_model, torch.float16, 0.1)
    np.testing.assert_array_equal(counts["model"], rounded)
    off = {p: np.abs(c - exact).sum() / exact.sum() for p, c in counts.items()}
    assert off["fp32"] <= 0.002 and off["model"] > 5 * max(off["fp32"], 1e-4), off
