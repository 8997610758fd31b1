import numpy as np
import torch
from transformers import HubertConfig, HubertModel

from neurostat.frames import FrameGeometry, default_geometry, label_frames


def test_geometry_matches_hf_for_many_lengths():
    geo = default_geometry()
    assert (geo.stride, geo.receptive_field, geo.sample_rate) == (320, 400, 16000)
    model = HubertModel(
        HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, conv_dim=(4,) * 7)
    )
    lengths = torch.tensor([0, 1, 399, 400, 401, 719, 720, 721, 16000, 16321, 123457])
    hf = model._get_feat_extract_output_lengths(lengths).tolist()
    ours = [geo.num_frames(int(n)) for n in lengths]
    assert [max(h, 0) for h in hf] == ours
    assert ours == [max(0, (int(n) - 400) // 320 + 1) if n >= 400 else 0 for n in lengths]


def test_geometry_from_other_config():
    geo = FrameGeometry(8000, (4, 2), (2, 2))
    assert geo.stride == 4 and geo.receptive_field == 6
    assert geo.num_frames(6) == 1 and geo.num_frames(9) == 1 and geo.num_frames(10) == 2
    np.testing.assert_allclose(geo.centres(3), [3 / 8000, 7 / 8000, 11 / 8000])


def test_centres_and_labels_by_centre():
    geo = default_geometry()
    c = geo.centres(4)
    np.testing.assert_allclose(c, [0.0125, 0.0325, 0.0525, 0.0725])
    # frame 1's centre is exactly at the boundary 0.0325: it belongs to the interval starting there
    starts, ends, ids = np.array([0.0, 0.0325]), np.array([0.0325, 0.06]), np.array([5, 7])
    assert label_frames(starts, ends, ids, c).tolist() == [5, 7, 7, -1]


def test_labels_with_gap_and_before_first_interval():
    starts, ends, ids = np.array([0.02, 0.05]), np.array([0.04, 0.09]), np.array([1, 2])
    assert label_frames(starts, ends, ids, np.array([0.01, 0.03, 0.045, 0.05, 0.0899, 0.09])).tolist() == [
        -1,
        1,
        -1,
        2,
        2,
        -1,
    ]


def test_the_default_geometry_is_the_family_tables_for_transformers_default_config(tmp_path):
    """``prepare`` without ``--model`` takes :func:`default_geometry` instead of reading transformers' default
    config (which imports torch): both must agree, at the default rate and at another."""
    from transformers import HubertConfig, Wav2Vec2FeatureExtractor

    from neurostat.model.loading import load_geometry

    HubertConfig().save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor().save_pretrained(tmp_path)
    assert load_geometry(str(tmp_path)) == default_geometry()
    assert load_geometry(str(tmp_path), 8000) == default_geometry(8000) == default_geometry().at_rate(8000)
