"""Presets: named sets of option values for `prepare` and `collect`.

``paper`` reproduces Lin et al.'s choices where neurostat's defaults differ (the README's table
"neurostat default vs paper preset" gives each and the reason for the default).  A preset only fills
the options a user did not give.
"""

from __future__ import annotations

from collections.abc import Mapping

PRESETS: dict[str, dict[str, object]] = {
    "paper": {
        "frame_labels": "overlap",  # label the 20 ms cell [20i, 20i + 20) ms by the interval of largest overlap
        "pitch": "yaapt",  # YAAPT F0, 71-800 Hz ...
        "pitch_step_ms": 20.0,  # ... with a 20 ms frame space
        "pitch_align": "paper",  # the track's frames left-padded to the phone labels (not read by time)
        "pitch_percentiles": "33,66",  # np.percentile 33 and 66
        "pitch_rule": "paper",  # F0 <= t0 low, t0 < F0 <= t1 mid, F0 > t1 high
        "tokens": "phone-mid",
        "drop_final_run": True,  # the official code never counts an utterance's last run of frames
        "topk_ratio": 0.01,
    },
}


def apply_preset(name: str | None, options: Mapping[str, object], given: set[str]) -> dict[str, object]:
    """``options`` with the preset's values for those of its keys that ``options`` has and the user did
    not give (``given``)."""
    if name is None:
        return dict(options)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return {key: preset[key] if key in preset and key not in given else value for key, value in options.items()}
