import numpy as np
import pytest
import torch
from rounding import forward_path, unit_roundoff
from transformers import HubertForCTC

from neurostat.model import frontend as frontend_module
from neurostat.model.factory import model_config, save_model
from neurostat.model.families import ModelError
from neurostat.model.frontend import ConvGemm, masked_group_norm
from neurostat.model.loading import adapter_for, load_adapter

TYPES = [
    ("hubert", False),
    ("hubert", True),
    ("wav2vec2", False),
    ("wav2vec2", True),
    ("wavlm", False),
    ("data2vec-audio", False),
]


def _waves(adapter, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(adapter.normalize(rng.standard_normal(n).astype(np.float32) * 0.1)) for n in lengths]


def _acts(adapter, waves):
    got = {}

    def sink(layer, a):
        got.setdefault(layer, []).append(a.detach().clone())

    with adapter.observe(sink):
        hidden, mask = adapter.encode(waves, front_end="batched")
    return hidden, mask, {k: torch.cat(v) for k, v in got.items()}


@pytest.mark.fp32
@pytest.mark.parametrize("model_type, stable", TYPES)
def test_batched_equals_unpadded_and_outputs_unchanged(tmp_path, model_type, stable):
    adapter = load_adapter(str(save_model(tmp_path / "m", model_type, stable_layer_norm=stable)))
    assert adapter.num_layers == 3 and adapter.width == 37
    waves = _waves(adapter, [16000, 9001, 4321])
    plain, plain_mask = adapter.encode(waves, front_end="batched")
    hidden, mask, acts = _acts(adapter, waves)
    assert torch.equal(plain, hidden) and torch.equal(plain_mask, mask)
    lengths = mask.sum(1).tolist()
    for b, w in enumerate(waves):
        # the model's own forward on the unpadded utterance, activations captured by a hook
        captured = {}
        hooks = [
            ffn.act.register_forward_hook(lambda m, i, o, layer=layer: captured.__setitem__(layer, o))
            for layer, ffn in enumerate(adapter.ffns)
        ]
        with torch.no_grad():
            out = adapter.model(w[None]).last_hidden_state[0]
        for h in hooks:
            h.remove()
        n = lengths[b]
        assert out.shape[0] == n == adapter.geometry.num_frames(len(w))
        rtol = _forward_rtol(adapter, max(lengths))  # of each tensor's largest |value|
        assert (hidden[b, :n] - out).abs().max() <= rtol[-1] * out.abs().max()
        for layer in range(3):
            assert (acts[layer][b, :n] - captured[layer][0]).abs().max() <= rtol[layer] * captured[layer].abs().max()


def test_wrapper_models_are_unwrapped(tmp_path):
    torch.manual_seed(0)
    config = model_config(num_hidden_layers=2, intermediate_size=21, vocab_size=12)
    model = HubertForCTC(config)
    from transformers import Wav2Vec2FeatureExtractor

    adapter = adapter_for(model, Wav2Vec2FeatureExtractor())
    assert adapter.backbone is model.hubert and adapter.width == 21


def test_bad_models(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="cannot load model 'no/such-model'"):
        load_adapter("no/such-model")
    with pytest.raises(ModelError, match="as a directory"):
        load_adapter(str(tmp_path))
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="model type 'bert' is not supported"):
        load_adapter(str(tmp_path / "bert"))
    adapter = load_adapter(str(tiny_model))
    adapter.backbone.encoder.layers[1].feed_forward = torch.nn.Identity()
    with pytest.raises(ModelError, match="layer 2 has no FFN"):
        adapter_for(adapter.model, adapter.feature_extractor, "broken")
    import shutil

    shutil.copytree(tiny_model, tmp_path / "nofe")
    (tmp_path / "nofe" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="feature-extractor config"):
        load_adapter(str(tmp_path / "nofe"))


SHORT_AND_LONG = [16000, 400, 720, 1040, 9001, 401]  # 1, 2 and 3 frames beside long utterances


def _front_end_runs(adapter, waves, front_ends):
    """Per front end: (last hidden state, frame mask, each layer's FFN activations)."""
    runs = {}
    for front_end in front_ends:
        got = {}
        with adapter.observe(lambda layer, a: got.__setitem__(layer, a.clone())):
            hidden, mask = adapter.encode(waves, front_end=front_end)
        runs[front_end] = hidden, mask, got
    return runs


def _forward_rtol(adapter, samples: int) -> list[float]:
    """2·P·u per FFN layer, then for the output (:data:`rounding.FORWARD_BOUND`): how far two evaluations of
    the model may differ, relative to the largest |value| of the layer, on waves of at most ``samples``."""
    frames = adapter.geometry.num_frames(samples)
    return [2 * p * unit_roundoff(adapter.dtype) for p in forward_path(adapter.config, frames)]


def _assert_close_at_valid_frames(run, reference, rtol):
    (h1, m1, a1), (h2, m2, a2) = run, reference
    assert torch.equal(m1, m2)
    scale = lambda t: t[m1].abs().max()  # noqa: E731
    assert (h1[m1] - h2[m1]).abs().max() <= rtol[-1] * scale(h2)
    for layer in a2:  # every valid frame of every layer's FFN activations
        assert (a1[layer][m1] - a2[layer][m1]).abs().max() <= rtol[layer] * scale(a2[layer]), layer


@pytest.mark.fp32
@pytest.mark.parametrize("front_end", ["batched", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("model_type, stable", TYPES)
def test_batched_front_ends_equal_per_utterance_reference(tmp_path, model_type, stable, dtype, front_end):
    adapter = load_adapter(str(save_model(tmp_path / "m", model_type, stable_layer_norm=stable)), dtype=dtype)
    waves = [w.to(dtype) for w in _waves(adapter, SHORT_AND_LONG, seed=3)]
    runs = _front_end_runs(adapter, waves, (front_end, "per-utterance"))
    assert runs[front_end][1].sum(1).tolist() == [adapter.geometry.num_frames(n) for n in SHORT_AND_LONG]
    _assert_close_at_valid_frames(runs[front_end], runs["per-utterance"], _forward_rtol(adapter, max(SHORT_AND_LONG)))


@pytest.mark.fp32
@pytest.mark.parametrize("stable", [False, True], ids=["group-norm", "layer-norm"])
def test_gemm_front_end_in_blocks_equals_it_in_one_pass(tmp_path, monkeypatch, stable):
    """On a CPU the norm and activation run block by block of frames; a small block makes tiny models use it."""
    adapter = load_adapter(str(save_model(tmp_path / "m", stable_layer_norm=stable)), dtype=torch.float64)
    waves = [w.double() for w in _waves(adapter, SHORT_AND_LONG, seed=5)]
    whole = _front_end_runs(adapter, waves, ("gemm",))["gemm"]
    monkeypatch.setattr(frontend_module, "BLOCK_ELEMENTS", 1000)
    blocks = _front_end_runs(adapter, waves, ("gemm", "per-utterance"))
    rtol = _forward_rtol(adapter, max(SHORT_AND_LONG))
    _assert_close_at_valid_frames(blocks["gemm"], whole, rtol)
    _assert_close_at_valid_frames(blocks["gemm"], blocks["per-utterance"], rtol)


def test_gemm_weights_and_positional_weight_follow_parameter_updates(tmp_path):
    """The re-laid-out conv weights and the weight-normed positional weight are cached, and rebuilt after an
    in-place update of the parameters they come from; the result is the model's own forward either way."""
    adapter = load_adapter(str(save_model(tmp_path / "m")), dtype=torch.float64)
    waves = [w.double() for w in _waves(adapter, [9001, 4321, 400], seed=6)]

    def check():
        hidden, mask = adapter.encode(waves, front_end="gemm")
        for b, w in enumerate(waves):
            with torch.no_grad():
                out = adapter.model(w[None]).last_hidden_state[0]
            torch.testing.assert_close(hidden[b, : mask[b].sum()], out, rtol=1e-10, atol=1e-12)

    check()
    layers = adapter._conv_gemms()
    assert adapter._conv_gemms() is layers  # nothing rebuilt while the parameters stay
    pos = adapter.backbone.encoder.pos_conv_embed.conv
    with torch.no_grad():
        adapter.backbone.feature_extractor.conv_layers[1].conv.weight.mul_(1.5)
        pos.parametrizations.weight.original1.mul_(-2.0)  # the direction v of weight = g v / |v|
        pos.parametrizations.weight.original0.mul_(3.0)  # the magnitude g
    check()
    assert adapter._conv_gemms() is not layers


@pytest.mark.parametrize("groups, channels_in, bias", [(6, 1, True), (2, 1, False), (3, 4, True)])
def test_gemm_group_norm_is_group_norm_of_each_unpadded_utterance(groups, channels_in, bias):
    """The group norm's statistics, taken from the conv's input windows, over each utterance's valid frames."""
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Module()
    layer.conv = torch.nn.Conv1d(channels_in, 6, kernel_size=4, stride=2, bias=bias).double()
    layer.layer_norm = torch.nn.GroupNorm(groups, 6).double()
    layer.activation = torch.nn.GELU()
    for p in layer.parameters():
        torch.nn.init.normal_(p, generator=g)
    gemm = ConvGemm.of((layer.conv, layer.layer_norm, layer.activation))
    steps, lengths = 40, [40, 6, 11, 23]  # 2 frames at least: the native group norm refuses one value per group
    x = torch.randn(len(lengths), steps, channels_in, generator=g, dtype=torch.float64)
    valid = [(n - 4) // 2 + 1 for n in lengths]
    out = gemm.convolve(x.reshape(-1, channels_in), torch.empty(len(lengths) * steps // 2, 6, dtype=torch.float64))
    got = gemm.finish(x, valid)(out.view(len(lengths), -1, 6))
    for b, n in enumerate(lengths):
        expected = layer.activation(layer.layer_norm(layer.conv(x[b : b + 1, :n].transpose(1, 2))))[0].T
        torch.testing.assert_close(got[b, : valid[b]], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.fp32
@pytest.mark.parametrize("model_type", ["hubert", "wav2vec2", "data2vec-audio"])
def test_sdpa_equals_eager_attention_on_padded_batches(tmp_path, model_type):
    path = save_model(tmp_path / "m", model_type)
    for dtype in (torch.float64, torch.float32):
        sdpa = load_adapter(str(path), dtype=dtype, attention="sdpa")
        eager = load_adapter(str(path), dtype=dtype, attention="eager")
        assert (sdpa.attention, eager.attention) == ("sdpa", "eager")
        waves = [w.to(dtype) for w in _waves(sdpa, SHORT_AND_LONG, seed=4)]
        (a, mask), (b, _) = sdpa.encode(waves, front_end="batched"), eager.encode(waves, front_end="batched")
        assert (a[mask] - b[mask]).abs().max() <= _forward_rtol(sdpa, max(SHORT_AND_LONG))[-1] * b[mask].abs().max()


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "per-utterance"])
def test_masked_group_norm_is_group_norm_of_each_unpadded_utterance(vectorized):
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(3, 6, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight, generator=g)
    torch.nn.init.normal_(norm.bias, generator=g)
    x = torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
    valid = torch.tensor([11, 1, 5, 2])
    got = masked_group_norm(x, valid, norm, vectorized)
    for b, n in enumerate(valid.tolist()):
        torch.testing.assert_close(got[b, :, :n], norm(x[b : b + 1, :, :n])[0], rtol=1e-12, atol=1e-12)
        assert (got[b, :, n:] == 0).all()


def test_model_dtype_names_are_checked():
    import torch

    from neurostat.engine.device import model_dtype
    from neurostat.model.families import ModelError

    assert model_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ModelError, match="--dtype 'int8' is not a model dtype"):
        model_dtype("int8")
