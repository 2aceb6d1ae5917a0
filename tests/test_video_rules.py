"""Pure sampling / resize / segment rules of tempo_ops.video (docs/METHOD.md "Sampling")."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo_ops.errors import AbsurdDimensions, ConfigError, VideoTooShort
from tempo_ops.video import (
    SAMPLING_RULE,
    SamplingConfig,
    VideoInfo,
    check_dimensions,
    format_timestamp,
    plan_video,
    resize_shape,
    sample_frame_indices,
    segment_bounds,
    segment_timestamp,
)


# --------------------------------------------------------------------------- frame sampling
def test_indices_hand_computed():
    # 100 frames at 25 fps = 4 s -> n = 8; linspace(0, 99, 8) = 0, 14.14, 28.29, 42.43,
    # 56.57, 70.71, 84.86, 99 -> rounded to nearest (not floored: 56.57 -> 57)
    assert sample_frame_indices(100, 25.0) == [0, 14, 28, 42, 57, 71, 85, 99]
    # 10 s at 1 fps target -> 10 frames, step 11 exactly
    assert sample_frame_indices(100, 10.0, target_fps=1.0) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]


def test_one_frame_video_gives_last_index():
    assert sample_frame_indices(1, 30.0) == [0]
    assert sample_frame_indices(1, None) == [0]


def test_fewer_source_frames_than_samples_repeat_indices():
    # 3 frames at 1 fps: n = round(6) -> clamped to 8; linspace(0, 2, 8) = 0, .29, .57, .86,
    # 1.14, 1.43, 1.71, 2 -> rounded
    assert sample_frame_indices(3, 1.0) == [0, 0, 1, 1, 1, 1, 2, 2]


def test_indices_round_halves_to_even():
    # linspace(0, 15, 11) = 0, 1.5, 3, 4.5, 6, 7.5, 9, 10.5, 12, 13.5, 15: np.round sends
    # 1.5 -> 2, 4.5 -> 4, 7.5 -> 8, 10.5 -> 10, 13.5 -> 14 (halves to the even neighbour)
    assert sample_frame_indices(16, 2.0, min_frames=11, max_frames=11) == [0, 2, 3, 4, 6, 8, 9, 10, 12, 14, 15]
    # linspace(0, 4, 9) = 0, .5, 1, 1.5, 2, 2.5, 3, 3.5, 4 -> 0, 0, 1, 2, 2, 2, 3, 4, 4
    assert sample_frame_indices(5, 1.0, min_frames=9, max_frames=9) == [0, 0, 1, 2, 2, 2, 3, 4, 4]
    # linspace(0, 7, 3) = 0, 3.5, 7 -> 4; linspace(0, 5, 3) = 0, 2.5, 5 -> 2
    assert sample_frame_indices(8, 1.0, min_frames=3, max_frames=3) == [0, 4, 7]
    assert sample_frame_indices(6, 1.0, min_frames=3, max_frames=3) == [0, 2, 5]


def test_clamp_to_min_and_max():
    short = sample_frame_indices(20, 10.0)  # 2 s -> 4 -> clamped up to 8
    assert len(short) == 8 and short[0] == 0 and short[-1] == 19
    long = sample_frame_indices(54000, 30.0)  # 1800 s -> 3600 -> clamped to 1024
    assert len(long) == 1024
    assert long[0] == 0 and long[1] == 53 and long[2] == 106 and long[-1] == 53999  # 53999 / 1023 = 52.78
    assert len(sample_frame_indices(54000, 30.0, max_frames=2048)) == 2048


def test_round_is_python_round_half_to_even():
    assert len(sample_frame_indices(41, 4.0)) == 20  # 10.25 s * 2 = 20.5 -> 20
    assert len(sample_frame_indices(43, 4.0)) == 22  # 10.75 s * 2 = 21.5 -> 22


@pytest.mark.parametrize("fps", [None, 0, -5.0, float("nan"), float("inf")])
def test_unknown_fps_uses_the_target_rate(fps):
    # The reference stands in target_fps for an unknown rate: 30 frames / 2 fps = 15 s -> 30.
    assert sample_frame_indices(30, fps) == list(range(30))
    assert len(sample_frame_indices(300, fps, target_fps=1.0, max_frames=64)) == 64  # 300 s -> 300 -> 64


@pytest.mark.parametrize("total", [0, -1])
def test_no_frames_is_too_short(total):
    with pytest.raises(VideoTooShort, match="total_frames"):
        sample_frame_indices(total, 30.0)


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(1, 200_000),
    fps=st.floats(0.5, 240.0),
    target=st.floats(0.05, 8.0),
    min_frames=st.integers(1, 64),
    extra=st.integers(0, 2048),
)
def test_indices_properties(total, fps, target, min_frames, extra):
    max_frames = min_frames + extra
    idx = sample_frame_indices(total, fps, target, min_frames, max_frames)
    assert idx == sorted(idx)
    assert all(0 <= i < total for i in idx)
    if total == 1:
        assert idx == [0]
        return
    n = min(max(round(total / fps * target), min_frames), max_frames)
    assert len(idx) == n
    assert idx[0] == 0
    if n >= 2:
        assert idx[-1] == total - 1
    if total >= n:
        assert len(set(idx)) == n  # no repeats when there are enough source frames
    if n >= 2:
        step = (total - 1) / (n - 1)
        assert all(abs(i - k * step) <= 0.5 + 1e-9 for k, i in enumerate(idx))  # nearest, not floor


# --------------------------------------------------------------------------- resize
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((640, 360), (512, 288)),
        ((1280, 720), (512, 288)),
        ((1920, 1080), (512, 288)),
        ((720, 480), (512, 336)),  # 480 * 512/720 / 16 = 21.33 -> 21 * 16
        ((360, 640), (288, 512)),  # portrait
        ((1080, 1920), (288, 512)),
        ((530, 110), (512, 112)),  # 110 * 512/530 / 16 = 6.64 -> 7: the short side grows past 110
        ((110, 530), (112, 512)),
        ((513, 100), (512, 96)),  # 99.8 / 16 = 6.24 -> 6
        ((600, 264), (512, 224)),  # 264 * 512/600 / 16 = 14.08 -> 14
        ((1000, 1000), (512, 512)),
        ((4000, 16), (512, 16)),  # 2.05 px -> 0 multiples -> the 16-px minimum
        ((16, 4000), (16, 512)),
        # longer side <= 512: not resized at all, any size, not rounded to 16
        ((512, 512), (512, 512)),
        ((511, 511), (511, 511)),
        ((512, 288), (512, 288)),
        ((320, 240), (320, 240)),
        ((75, 41), (75, 41)),
        ((360, 202), (360, 202)),
        ((202, 360), (202, 360)),
        ((100, 56), (100, 56)),
        ((1, 1), (1, 1)),
        ((16, 9), (16, 9)),
        ((512, 1), (512, 1)),
    ],
)
def test_resize_shape_hand_computed(size, expected):
    assert resize_shape(*size) == expected


def test_resize_shape_other_limits():
    assert resize_shape(640, 360, max_edge=256, multiple=32) == (256, 128)  # 144 / 32 = 4.5 -> 4 (half to even)
    assert resize_shape(250, 100, max_edge=256, multiple=32) == (250, 100)  # not above max_edge: kept
    assert resize_shape(1000, 1000, max_edge=496, multiple=16) == (496, 496)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-1, 5)])
def test_resize_shape_rejects_non_positive(size):
    with pytest.raises(AbsurdDimensions):
        resize_shape(*size)


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 16384), h=st.integers(1, 16384))
def test_resize_shape_properties(w, h):
    rw, rh = resize_shape(w, h)
    if max(w, h) <= 512:  # not resized at all
        assert (rw, rh) == (w, h)
        return
    ratio = 512 / max(w, h)
    for out, src in ((rw, w), (rh, h)):
        assert out % 16 == 0 and 16 <= out <= 512
        assert out == 16 or abs(out - src * ratio) <= 8 + 1e-9  # nearest multiple of 16
    assert max(rw, rh) == 512


def test_check_dimensions_limits():
    check_dimensions("v", 4000, 16)  # aspect 250: fine
    check_dimensions("v", 16384, 4096)  # 64 Mpx exactly: fine
    check_dimensions("v", 1, 1)
    for w, h in [(0, 10), (16385, 16), (16384, 4097), (8193, 16), (20000, 20000)]:
        with pytest.raises(AbsurdDimensions, match="^v: "):
            check_dimensions("v", w, h)


# --------------------------------------------------------------------------- segments
@pytest.mark.parametrize(
    ("n", "bounds"),
    [
        (0, []),
        (1, [(0, 1)]),
        (8, [(0, 8)]),
        (9, [(0, 8), (8, 9)]),
        (10, [(0, 8), (8, 10)]),
        (17, [(0, 8), (8, 16), (16, 17)]),
        (23, [(0, 8), (8, 16), (16, 23)]),
    ],
)
def test_segment_bounds_hand_computed(n, bounds):
    assert segment_bounds(n) == bounds


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 5000), window=st.integers(1, 64))
def test_segment_bounds_properties(n, window):
    bounds = segment_bounds(n, window)
    assert len(bounds) == math.ceil(n / window)
    pos = 0
    for i, (s, e) in enumerate(bounds):
        assert s == pos == i * window  # contiguous, stride = window
        assert 1 <= e - s <= window
        if i < len(bounds) - 1:
            assert e - s == window  # only the tail may be short
        pos = e
    assert pos == n  # covers everything


def test_segment_bounds_rejects_bad_input():
    with pytest.raises(ConfigError):
        segment_bounds(-1)
    with pytest.raises(ConfigError):
        segment_bounds(8, 0)


def test_timestamps():
    assert segment_timestamp(0, 2.0) == 2.0
    assert segment_timestamp(3, 2.0) == 14.0
    assert segment_timestamp(1, 1.6) == pytest.approx(7.5)
    assert format_timestamp(14.0) == "<14.0 seconds>"
    assert format_timestamp(12.96) == "<13.0 seconds>"
    assert format_timestamp(0.04) == "<0.0 seconds>"


# --------------------------------------------------------------------------- config and plan
def test_sampling_config_validation_and_dict():
    cfg = SamplingConfig()
    assert cfg.to_dict() == {
        "target_fps": 2.0,
        "min_frames": 8,
        "max_frames": 1024,
        "max_edge": 512,
        "multiple": 16,
        "window": 8,
        "frame_accuracy": "exact",
        "sampling_rule": SAMPLING_RULE,
    }
    assert SAMPLING_RULE == 2
    bad_configs = [
        dict(target_fps=0),
        dict(target_fps=float("nan")),
        dict(min_frames=0),
        dict(min_frames=9, max_frames=8),
        dict(window=0),
        dict(max_edge=8),
        dict(max_edge=500),  # not a multiple of 16
        dict(max_frames=1.5),
    ]
    for bad in bad_configs:
        with pytest.raises(ConfigError):
            SamplingConfig(**bad)


def _info(frames, fps, w=640, h=360, rotation=0):
    dw, dh = (h, w) if rotation in (90, 270) else (w, h)
    return VideoInfo("mem.mp4", frames / fps, fps, frames, w, h, rotation, "h264", dw, dh)


def test_plan_from_info():
    plan = plan_video(_info(750, 25.0))  # 30 s -> 60 frames -> 8 segments (last has 4)
    assert len(plan.frame_indices) == 60
    assert plan.real_fps == pytest.approx(2.0)
    assert plan.n_segments == 8 and plan.bounds[-1] == (56, 60)
    assert plan.timestamps[:3] == pytest.approx([2.0, 6.0, 10.0])
    assert plan.timestamp_texts[-1] == "<30.0 seconds>"
    assert (plan.frame_width, plan.frame_height) == (512, 288)
    d = plan.to_dict()
    assert d["n_segments"] == 8 and d["info"]["frame_count"] == 750 and d["config"]["window"] == 8


def test_plan_clamped_real_fps_and_rotation():
    plan = plan_video(_info(30 * 3600, 30.0, rotation=90))  # one hour -> 1024 frames
    assert len(plan.frame_indices) == 1024
    assert plan.real_fps == pytest.approx(1024 / 3600)
    assert plan.timestamps[1] == pytest.approx(12 / (1024 / 3600))
    assert (plan.frame_width, plan.frame_height) == (288, 512)


def test_plan_with_unknown_fps_uses_the_target_rate():
    info = VideoInfo("mem.mp4", 30 / 30.0, None, 30, 640, 360, 0, "h264", 640, 360)
    plan = plan_video(info)  # 30 frames / 2 fps = 15 s -> 30 samples, every frame
    assert plan.frame_indices == list(range(30))
    assert plan.real_fps == pytest.approx(2.0) and plan.timestamps[0] == pytest.approx(2.0)


def test_plan_keeps_small_frames_at_their_size():
    plan = plan_video(_info(100, 10.0, w=75, h=41))
    assert (plan.frame_width, plan.frame_height) == (75, 41)
    plan = plan_video(_info(100, 10.0, w=530, h=110))
    assert (plan.frame_width, plan.frame_height) == (512, 112)
    plan = plan_video(_info(100, 10.0, w=202, h=360, rotation=90))  # shown as 360x202: kept
    assert (plan.frame_width, plan.frame_height) == (360, 202)


def test_old_rule_cache_refuses_to_mix(tmp_path):
    """A cache written with the pre-SAMPLING_RULE config (floor indices, never-enlarge resize)
    refuses a writer with today's config, naming the sampling_rule field."""
    from tempo_ops.errors import FingerprintMismatch
    from tempo_ops.store import CacheWriter
    from tests.test_store_support import make_config

    old = make_config()
    old["sampling"] = {"target_fps": 2.0, "min_frames": 8, "max_frames": 1024, "max_edge": 512, "multiple": 16, "window": 8, "frame_accuracy": "exact"}
    cache = str(tmp_path / "cache")
    CacheWriter.open(cache, old)
    new = make_config()
    new["sampling"] = SamplingConfig().to_dict()
    with pytest.raises(FingerprintMismatch, match=r"sampling\.sampling_rule") as info:
        CacheWriter.open(cache, new)
    assert info.value.details["fields"] == ["sampling.sampling_rule"]


def test_plan_one_frame_and_tail_of_one():
    plan = plan_video(_info(1, 10.0))
    assert plan.frame_indices == [0] and plan.bounds == [(0, 1)]
    assert plan.real_fps == pytest.approx(10.0)
    plan = plan_video(_info(90, 2.0))  # 45 s at 2 fps: 90 samples -> 11 full windows + (88, 90)
    assert plan.bounds[-1] == (88, 90)
    plan = plan_video(_info(34, 2.0))  # 17 s -> 34 samples -> tail (32, 34)
    assert plan.bounds[-1] == (32, 34)
    plan = plan_video(_info(33, 2.0))  # 16.5 s -> 33 samples -> tail of exactly one
    assert plan.bounds[-1] == (32, 33)


def test_plan_pickles_for_beam():
    import pickle

    plan = plan_video(_info(300, 30.0), SamplingConfig(target_fps=1.0))
    again = pickle.loads(pickle.dumps(plan))  # noqa: S301 - round-trip of our own object
    assert again == plan and again.n_segments == plan.n_segments == 2


# --------------------------------------------------------------------------- frame accuracy
def test_frame_accuracy_is_validated_and_part_of_the_fingerprint():
    exact, keyframe = SamplingConfig(), SamplingConfig(frame_accuracy="keyframe")
    assert exact.frame_accuracy == "exact"
    assert keyframe.to_dict()["frame_accuracy"] == "keyframe"
    assert exact.to_dict() != keyframe.to_dict()
    assert set(exact.to_dict()) == set(keyframe.to_dict())  # same keys, one differing value
    assert {k for k in exact.to_dict() if exact.to_dict()[k] != keyframe.to_dict()[k]} == {"frame_accuracy"}
    for bad in ("Keyframe", "fast", "", None, 1, True):
        with pytest.raises(ConfigError, match="frame_accuracy"):
            SamplingConfig(frame_accuracy=bad)


def test_plan_keeps_nominal_indices_and_timestamps_in_keyframe_mode():
    exact = plan_video(_info(750, 25.0))
    keyframe = plan_video(_info(750, 25.0), SamplingConfig(frame_accuracy="keyframe"))
    assert keyframe.frame_indices == exact.frame_indices
    assert keyframe.timestamps == exact.timestamps and keyframe.bounds == exact.bounds
    assert keyframe.to_dict()["config"]["frame_accuracy"] == "keyframe"


def test_cli_frame_accuracy_flag():
    import argparse

    from pipelines.probe_cmd import add_sampling_arguments, sampling_config_from_args

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert sampling_config_from_args(parser.parse_args([])).frame_accuracy == "exact"
    cfg = sampling_config_from_args(parser.parse_args(["--frame-accuracy", "keyframe", "--max-frames", "64"]))
    assert (cfg.frame_accuracy, cfg.max_frames) == ("keyframe", 64)
    assert sampling_config_from_args(parser.parse_args(["--frame-accuracy", "exact"])) == SamplingConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--frame-accuracy", "fast"])
