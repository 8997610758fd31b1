import numpy as np
import pytest
import torch
from transformers import HubertForCTC

from neurostat.model.adapter import ModelAdapter, ModelError
from neurostat.model.factory import model_config, save_model

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
        hidden, mask = adapter.encode(waves)
    return hidden, mask, {k: torch.cat(v) for k, v in got.items()}


@pytest.mark.parametrize("model_type, stable", TYPES)
def test_batched_equals_unpadded_and_outputs_unchanged(tmp_path, model_type, stable):
    adapter = ModelAdapter.load(str(save_model(tmp_path / "m", model_type, stable_layer_norm=stable)))
    assert adapter.num_layers == 3 and adapter.width == 37
    waves = _waves(adapter, [16000, 9001, 4321])
    plain, plain_mask = adapter.encode(waves)
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
        torch.testing.assert_close(hidden[b, :n], out, atol=1e-5, rtol=1e-5)
        for layer in range(3):
            torch.testing.assert_close(acts[layer][b, :n], captured[layer][0], atol=1e-5, rtol=1e-5)


def test_wrapper_models_are_unwrapped(tmp_path):
    torch.manual_seed(0)
    config = model_config(num_hidden_layers=2, intermediate_size=21, vocab_size=12)
    model = HubertForCTC(config)
    from transformers import Wav2Vec2FeatureExtractor

    adapter = ModelAdapter(model, Wav2Vec2FeatureExtractor())
    assert adapter.backbone is model.hubert and adapter.width == 21


def test_bad_models(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="cannot load model 'no/such-model'"):
        ModelAdapter.load("no/such-model")
    with pytest.raises(ModelError, match="as a directory"):
        ModelAdapter.load(str(tmp_path))
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="model type 'bert' is not supported"):
        ModelAdapter.load(str(tmp_path / "bert"))
    adapter = ModelAdapter.load(str(tiny_model))
    adapter.backbone.encoder.layers[1].feed_forward = torch.nn.Identity()
    with pytest.raises(ModelError, match="layer 2 has no FFN"):
        ModelAdapter(adapter.model, adapter.feature_extractor, "broken")
    import shutil

    shutil.copytree(tiny_model, tmp_path / "nofe")
    (tmp_path / "nofe" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="feature-extractor config"):
        ModelAdapter.load(str(tmp_path / "nofe"))
