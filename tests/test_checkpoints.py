"""Fine-tuned checkpoints (issue 32): a CTC or sequence-classification checkpoint is collected through its
encoder, the store says which head it left out, and an edit writes the checkpoint's own class back."""

import numpy as np
import pytest
import torch
import transformers
import xarray as xr

from neurostat.engine.collect import CollectConfig, collect
from neurostat.model.edit import ablate_checkpoint
from neurostat.model.factory import feature_extractor, model_config
from neurostat.model.loading import load_adapter, load_full_model
from neurostat.neuronset import NeuronSet

HEADS = [("hubert", "HubertForCTC"), ("wav2vec2", "Wav2Vec2ForSequenceClassification"), ("wavlm", "WavLMForCTC")]


def saved(model, path):
    model.save_pretrained(path)
    feature_extractor().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family,head", HEADS)
def test_a_fine_tuned_checkpoint_collects_its_encoders_counts(family, head, prepared, tmp_path):
    torch.manual_seed(0)
    full = getattr(transformers, head)(model_config(family, num_hidden_layers=2, vocab_size=9, num_labels=3)).eval()
    with_head = saved(full, tmp_path / "fine-tuned")
    encoder = saved(full.base_model, tmp_path / "encoder")
    config = CollectConfig(topk_ratio=0.1, tokens="all", stats=("topk", "positive"))
    metas = {
        name: collect(prepared, load_adapter(src), tmp_path / f"{name}.zarr", config, progress=False)
        for name, src in (("head", with_head), ("encoder", encoder))
    }
    a, b = (xr.open_zarr(tmp_path / f"{n}.zarr", consolidated=False) for n in metas)
    for var in ("frames", "topk_count", "positive_count"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    assert a["topk_count"].values.sum() > 0
    assert metas["head"].model["architecture"] == head and head in metas["head"].model["head"]
    assert metas["encoder"].model["head"] is None


def test_ablating_a_ctc_checkpoint_keeps_its_class(tmp_path):
    torch.manual_seed(0)
    full = transformers.HubertForCTC(model_config("hubert", num_hidden_layers=2, vocab_size=9)).eval()
    neurons = tmp_path / "n.json"
    neurons.write_text(NeuronSet({1: [0, 3], 2: [5]}).to_json())
    ablate_checkpoint(saved(full, tmp_path / "ctc"), neurons, tmp_path / "ablated")
    back = load_full_model(str(tmp_path / "ablated"))
    assert type(back) is transformers.HubertForCTC
    assert torch.equal(back.lm_head.weight, full.lm_head.weight)
    down = back.hubert.encoder.layers[0].feed_forward.output_dense.weight
    assert not down[:, [0, 3]].any() and down[:, 1].any()


def test_info_names_the_head_left_out(prepared, tmp_path):
    from neurostat.stats import describe_store

    torch.manual_seed(0)
    full = transformers.HubertForCTC(model_config("hubert", num_hidden_layers=2, vocab_size=9)).eval()
    adapter = load_adapter(saved(full, tmp_path / "ctc"))
    collect(prepared, adapter, tmp_path / "s.zarr", CollectConfig(stats=("topk",)), progress=False)
    assert "HubertForCTC: its head is not collected, its encoder is" in describe_store(tmp_path / "s.zarr")
