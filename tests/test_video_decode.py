"""Decoding with tempo_ops.video on generated videos whose frames carry their own number."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from tempo_ops.errors import (
    ConfigError,
    CorruptVideo,
    EmptyVideoFile,
    NoVideoStream,
    UnsupportedCodec,
    VideoNotFound,
    VideoTooShort,
)
from tempo_ops.synthetic import make_frame, read_frame_number, vfr_times, write_audio_only, write_test_video
from tempo_ops.video import (
    SamplingConfig,
    VideoPlan,
    count_decoded_frames,
    default_convert_threads,
    iter_segments,
    plan_video,
    probe_video,
)
from tests.gcs_emulator import gcs_server  # noqa: F401 - module-scoped fixture


def _numbers(segments, rotation=0):
    """Frame numbers of all frames of ``segments`` (undoing a clockwise display rotation)."""
    out = []
    for seg in segments:
        for frame in seg.frames:
            out.append(read_frame_number(np.rot90(frame, k=rotation // 90) if rotation else frame))
    return out


def _decoded_rgb(path, k):
    """Frame ``k`` of a plain sequential decode of ``path``, as RGB (PyAV directly)."""
    import av

    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == k:
                return frame.to_ndarray(format="rgb24")
    raise AssertionError(f"{path} has no frame {k}")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "h264": write_test_video(d / "h264.mp4", n_frames=120, fps=10, width=64, height=48, codec="h264", gop=10),
        "mpeg4": write_test_video(d / "mpeg4.mp4", n_frames=120, fps=10, width=64, height=48, codec="mpeg4", gop=10),
        "h264_bframes": write_test_video(d / "h264_b.mp4", n_frames=90, fps=15, width=64, height=48, codec="h264"),
        "vfr": write_test_video(d / "vfr.mp4", n_frames=100, fps=10, width=64, height=48, vfr=True, gop=8),
        "sparse": write_test_video(d / "sparse.mp4", n_frames=400, fps=10, width=64, height=48, gop=10, pattern="blocks"),
    }


def test_synthetic_frame_roundtrip():
    for n in (0, 1, 37, 65535):
        assert read_frame_number(make_frame(n, 80, 64)) == n
    frame = make_frame(5, 80, 64)
    assert read_frame_number(frame[:, ::-1]) is None  # mirrored: markers do not match
    assert read_frame_number(frame[::-1]) is None
    with pytest.raises(ValueError):
        make_frame(65536, 8, 8)


@pytest.mark.parametrize("name", ["h264", "mpeg4", "h264_bframes"])
def test_cfr_decoding_picks_exact_frames(videos, name):
    info = probe_video(videos[name])
    assert info.codec == ("mpeg4" if name == "mpeg4" else "h264")
    assert (info.width, info.height, info.rotation) == (64, 48, 0)
    assert not info.variable_frame_rate
    plan = plan_video(info)
    segs = list(iter_segments(videos[name], plan=plan))
    assert [s.index for s in segs] == list(range(plan.n_segments))
    assert _numbers(segs) == plan.frame_indices
    for seg in segs:
        start, end = plan.bounds[seg.index]
        assert seg.frames.dtype == np.uint8 and seg.frames.shape == (end - start, 48, 64, 3)
        assert seg.frame_indices == plan.frame_indices[start:end]
        assert seg.start_position == start
        assert seg.timestamp == plan.timestamps[seg.index] and seg.timestamp_text == plan.timestamp_texts[seg.index]
        assert seg.real_fps == plan.real_fps


def test_h264_probe_and_plan_values(videos):
    info = probe_video(videos["h264"])
    assert info.frame_count == 120 and info.fps == 10.0 and info.duration_s == pytest.approx(12.0)
    plan = plan_video(info)
    assert len(plan.frame_indices) == 24 and plan.real_fps == pytest.approx(2.0)
    assert plan.frame_indices[:4] == [0, 5, 10, 16]  # round(linspace(0, 119, 24)) = 0, 5.17, 10.35, 15.52
    assert plan.timestamp_texts == ["<2.0 seconds>", "<6.0 seconds>", "<10.0 seconds>"]


def test_variable_frame_rate_samples_by_presentation_time(videos):
    info = probe_video(videos["vfr"])
    assert info.variable_frame_rate
    plan = plan_video(info, SamplingConfig(target_fps=3.0))
    times = vfr_times(100, 10)
    tol = 0.125 / info.fps
    expected = []
    for i in plan.frame_indices:
        target = info.start_s + i / info.fps
        expected.append(max(k for k, t in enumerate(times) if t <= target + tol))
    assert _numbers(iter_segments(videos["vfr"], plan=plan)) == expected
    assert expected != plan.frame_indices  # the time rule really differs from plain indices here


@pytest.mark.parametrize("mode", ["never", "always"])
@pytest.mark.parametrize("name", ["sparse", "h264_bframes", "vfr", "mpeg4"])
def test_seek_and_sequential_paths_give_identical_frames(videos, name, mode):
    cfg = SamplingConfig(target_fps=0.5, min_frames=4)
    plan = plan_video(videos[name], cfg)
    auto = list(iter_segments(videos[name], plan=plan))
    forced = list(iter_segments(videos[name], plan=plan, seek_mode=mode))
    assert len(auto) == len(forced)
    for a, b in zip(auto, forced):
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.frame_indices == b.frame_indices


def test_sparse_sampling_seeks_instead_of_decoding_everything(videos):
    plan = plan_video(videos["sparse"], SamplingConfig(target_fps=0.2, min_frames=4))  # every 5 s, GOP 1 s
    assert _numbers(iter_segments(videos["sparse"], plan=plan)) == plan.frame_indices
    never = count_decoded_frames(videos["sparse"], plan, "never")
    auto = count_decoded_frames(videos["sparse"], plan, "auto")
    assert never == {"decoded": 400, "seeks": 0, "redone": 0}
    assert auto["seeks"] >= len(plan.frame_indices) - 2
    assert auto["decoded"] <= len(plan.frame_indices) * 10  # at most one GOP per sample


def test_sub_range_equals_full_iteration(videos):
    plan = plan_video(videos["h264"], SamplingConfig(target_fps=4))  # 48 frames, 6 segments
    full = list(iter_segments(videos["h264"], plan=plan))
    part = list(iter_segments(videos["h264"], plan=plan, segments=range(2, 5)))
    assert [s.index for s in part] == [2, 3, 4]
    for a, b in zip(full[2:5], part):
        np.testing.assert_array_equal(a.frames, b.frames)
        assert (a.frame_indices, a.start_position, a.timestamp) == (b.frame_indices, b.start_position, b.timestamp)
    assert list(iter_segments(videos["h264"], plan=plan, segments=range(3, 3))) == []
    with pytest.raises(ConfigError):
        list(iter_segments(videos["h264"], plan=plan, segments=range(4, 7)))
    with pytest.raises(ConfigError):
        list(iter_segments(videos["h264"], plan=plan, segments=range(4, 1, -1)))
    with pytest.raises(ConfigError):
        list(iter_segments(videos["h264"], plan=plan, seek_mode="sometimes"))


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_reported_and_frames_are_upright(tmp_path, rotation):
    path = write_test_video(tmp_path / "rot.mp4", n_frames=20, fps=10, width=80, height=48, rotation=rotation)
    info = probe_video(path)
    assert info.rotation == rotation
    assert (info.width, info.height) == (80, 48)
    upright = (48, 80) if rotation in (90, 270) else (80, 48)
    assert (info.display_width, info.display_height) == upright
    plan = plan_video(info)
    assert (plan.frame_width, plan.frame_height) == upright
    segs = list(iter_segments(path, plan=plan))
    assert segs[0].frames.shape[1:] == (upright[1], upright[0], 3)
    assert _numbers(segs, rotation) == plan.frame_indices


def test_odd_and_tiny_sizes(tmp_path):
    one = write_test_video(tmp_path / "1x1.mp4", n_frames=4, fps=2, width=1, height=1)
    info = probe_video(one)
    assert (info.width, info.height) == (1, 1)
    seg = next(iter_segments(one))
    assert seg.frames.shape == (8, 1, 1, 3)  # 4 frames / 2 fps = 2 s -> clamped to 8; <= 512 px: kept
    two = write_test_video(tmp_path / "2x2.mp4", n_frames=4, fps=2, width=2, height=2, codec="mpeg4")
    assert next(iter_segments(two)).frames.shape == (8, 2, 2, 3)
    odd = write_test_video(tmp_path / "odd.mp4", n_frames=10, fps=5, width=75, height=41)
    seg = next(iter_segments(odd))
    assert seg.frames.shape == (8, 41, 75, 3)  # not resized, not rounded to 16
    assert _numbers([seg]) == plan_video(odd).frame_indices == [0, 1, 3, 4, 5, 6, 8, 9]
    # Unresized frames are the decoded pictures themselves.
    np.testing.assert_array_equal(seg.frames[0], _decoded_rgb(odd, 0))


def test_very_elongated_frames(tmp_path):
    tall = write_test_video(tmp_path / "tall.mp4", n_frames=3, fps=1, width=16, height=4000, pattern="blocks")
    plan = plan_video(tall)
    assert (plan.frame_width, plan.frame_height) == (16, 512)
    segs = list(iter_segments(tall, plan=plan))
    assert segs[0].frames.shape == (8, 512, 16, 3)
    assert _numbers(segs) == [0, 0, 1, 1, 1, 1, 2, 2]  # N=3 < n=8: indices repeat
    wide = write_test_video(tmp_path / "wide.mp4", n_frames=2, fps=1, width=4000, height=16, pattern="blocks")
    assert next(iter_segments(wide)).frames.shape == (8, 16, 512, 3)


def test_one_frame_video_is_padded_to_two(tmp_path):
    path = write_test_video(tmp_path / "one.mp4", n_frames=1, fps=25, width=32, height=32)
    plan = plan_video(path)
    assert plan.frame_indices == [0] and plan.bounds == [(0, 1)]
    (seg,) = list(iter_segments(path, plan=plan))
    assert seg.frames.shape == (2, 32, 32, 3) and seg.frame_indices == [0, 0]
    np.testing.assert_array_equal(seg.frames[0], seg.frames[1])
    assert read_frame_number(seg.frames[0]) == 0


def test_trailing_single_frame_window_is_padded(tmp_path):
    path = write_test_video(tmp_path / "tail.mp4", n_frames=33, fps=2, width=32, height=32, gop=4)  # 33 samples
    segs = list(iter_segments(path))
    assert [len(s.frames) for s in segs] == [8, 8, 8, 8, 2]
    assert segs[-1].frame_indices == [32, 32] and segs[-1].start_position == 32
    assert _numbers(segs[-1:]) == [32, 32]


def test_resized_frames_are_pil_bicubic(tmp_path):
    from PIL import Image

    path = write_test_video(tmp_path / "big.mp4", n_frames=8, fps=4, width=640, height=360, gop=4)
    seg = next(iter_segments(path, SamplingConfig(target_fps=4.0)))
    assert seg.frames.shape[1:] == (288, 512, 3)
    assert _numbers([seg]) == [0, 1, 2, 3, 4, 5, 6, 7]
    import av

    with av.open(path) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    expected = np.asarray(Image.fromarray(first).resize((512, 288), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(seg.frames[0], expected)


def test_memory_url(tmp_path):
    url = write_test_video("memory://tempo-test-video/clip.mp4", n_frames=30, fps=10, width=48, height=32, gop=5)
    info = probe_video(url)
    assert info.uri == url and info.frame_count == 30
    segs = list(iter_segments(url, SamplingConfig(target_fps=5)))
    assert _numbers(segs) == plan_video(url, SamplingConfig(target_fps=5)).frame_indices


# --------------------------------------------------------------------------- frame accuracy "keyframe"
KEY = SamplingConfig(frame_accuracy="keyframe")


@pytest.mark.parametrize("gop", [7, 10])
def test_keyframe_mode_returns_last_key_frame_at_or_before_each_sample(tmp_path, gop):
    path = write_test_video(tmp_path / f"gop{gop}.mp4", n_frames=200, fps=10, width=64, height=48, gop=gop)
    cfg = SamplingConfig(target_fps=1.3, frame_accuracy="keyframe")  # 26 samples, rarely on a key frame
    plan = plan_video(path, cfg)
    exact_plan = plan_video(path, SamplingConfig(target_fps=1.3))
    assert plan.frame_indices == exact_plan.frame_indices  # the plan stays nominal
    segs = list(iter_segments(path, plan=plan))
    got = _numbers(segs)
    expected = [(i // gop) * gop for i in plan.frame_indices]
    assert got == expected
    assert all(n % gop == 0 and n <= i for n, i in zip(got, plan.frame_indices))
    assert got != plan.frame_indices  # the approximation really differs here
    assert [i for s in segs for i in s.frame_indices] == got  # reported indices are the returned frames'
    assert [(s.timestamp, s.timestamp_text, s.start_position) for s in segs] == [
        (exact_plan.timestamps[k], exact_plan.timestamp_texts[k], exact_plan.bounds[k][0]) for k in range(len(segs))
    ]
    # Only key frames are decoded: sequentially that is each key frame once.
    assert count_decoded_frames(path, plan, "never") == {"decoded": -(-200 // gop), "seeks": 0, "redone": 0}
    assert count_decoded_frames(path, exact_plan, "never") == {"decoded": 200, "seeks": 0, "redone": 0}


def test_keyframe_mode_on_all_intra_video_equals_exact_mode(tmp_path):
    path = write_test_video(tmp_path / "intra.mp4", n_frames=60, fps=10, width=64, height=48, gop=1)
    cfg = SamplingConfig(target_fps=3.0)
    exact = list(iter_segments(path, cfg))
    keyframe = list(iter_segments(path, SamplingConfig(target_fps=3.0, frame_accuracy="keyframe")))
    assert len(exact) == len(keyframe) == 3
    for a, b in zip(exact, keyframe):
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.frame_indices == b.frame_indices
    assert _numbers(keyframe) == plan_video(path, cfg).frame_indices


def test_keyframe_mode_equals_exact_mode_on_key_frame_aligned_samples(videos):
    info = probe_video(videos["sparse"])  # 400 frames, GOP 10
    plan = plan_video(info, SamplingConfig(target_fps=0.1, min_frames=4))  # one segment of 4 samples
    aligned = [k * 130 for k in range(4)]  # replace the samples by key frames 0, 130, 260, 390
    exact = VideoPlan(**{**_plan_fields(plan), "frame_indices": aligned})
    keyframe = VideoPlan(**{**_plan_fields(plan), "frame_indices": aligned, "config": KEY})
    a, b = list(iter_segments(videos["sparse"], plan=exact)), list(iter_segments(videos["sparse"], plan=keyframe))
    np.testing.assert_array_equal(a[0].frames, b[0].frames)
    assert a[0].frame_indices == b[0].frame_indices == aligned


def _plan_fields(plan):
    return {k: getattr(plan, k) for k in ("info", "config", "frame_indices", "real_fps", "bounds", "timestamps", "timestamp_texts", "frame_width", "frame_height")}


@pytest.mark.parametrize("mode", ["never", "always"])
@pytest.mark.parametrize("name", ["sparse", "h264", "h264_bframes", "mpeg4", "vfr"])
def test_keyframe_mode_seek_and_sequential_paths_agree(videos, name, mode):
    for target_fps in (0.5, 3.0):  # sparse (seeks) and dense (several samples per GOP)
        plan = plan_video(videos[name], SamplingConfig(target_fps=target_fps, min_frames=4, frame_accuracy="keyframe"))
        auto = list(iter_segments(videos[name], plan=plan))
        forced = list(iter_segments(videos[name], plan=plan, seek_mode=mode))
        assert len(auto) == len(forced) == plan.n_segments
        for a, b in zip(auto, forced):
            np.testing.assert_array_equal(a.frames, b.frames)
            assert a.frame_indices == b.frame_indices


def test_keyframe_mode_sparse_sampling_decodes_one_key_frame_per_sample(videos):
    plan = plan_video(videos["sparse"], SamplingConfig(target_fps=0.2, min_frames=4, frame_accuracy="keyframe"))
    got = _numbers(iter_segments(videos["sparse"], plan=plan))
    assert got == [(i // 10) * 10 for i in plan.frame_indices]
    auto = count_decoded_frames(videos["sparse"], plan, "auto")
    assert auto["seeks"] >= len(plan.frame_indices) - 2
    assert auto["decoded"] <= 2 * len(plan.frame_indices)  # the wanted key frame and the next one
    assert count_decoded_frames(videos["sparse"], plan, "never")["decoded"] == 40  # every key frame


def test_keyframe_mode_variable_frame_rate_picks_by_time(videos):
    info = probe_video(videos["vfr"])  # GOP 8 frames, irregular times
    plan = plan_video(info, SamplingConfig(target_fps=3.0, frame_accuracy="keyframe"))
    times = vfr_times(100, 10)
    tol = 0.125 / info.fps
    expected = []
    for i in plan.frame_indices:
        target = info.start_s + i / info.fps
        expected.append(max(k for k, t in enumerate(times) if t <= target + tol and k % 8 == 0))
    segs = list(iter_segments(videos["vfr"], plan=plan))
    assert _numbers(segs) == expected
    # Reported index: round((t_key - start) * fps), so frame k at time times[k].
    assert [i for s in segs for i in s.frame_indices] == [round(times[k] * info.fps) for k in expected]


def test_keyframe_mode_sub_range_and_padding(tmp_path):
    path = write_test_video(tmp_path / "tail.mp4", n_frames=33, fps=2, width=32, height=32, gop=4)  # 33 samples
    plan = plan_video(path, KEY)
    full = list(iter_segments(path, plan=plan))
    assert [len(s.frames) for s in full] == [8, 8, 8, 8, 2]
    assert full[-1].frame_indices == [32, 32] and _numbers(full[-1:]) == [32, 32]
    assert full[1].frame_indices == [8, 8, 8, 8, 12, 12, 12, 12]
    part = list(iter_segments(path, plan=plan, segments=range(1, 3)))
    for a, b in zip(full[1:3], part):
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.frame_indices == b.frame_indices


def test_keyframe_mode_stream_cut_short_is_corrupt(tmp_path):
    path = write_test_video(tmp_path / "fs.mp4", n_frames=200, fps=10, width=64, height=48, gop=10, faststart=True)
    data = open(path, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    cut = str(tmp_path / "cut.mp4")
    with pytest.raises(CorruptVideo, match="cut.mp4"):
        list(iter_segments(cut, plan=plan_video(cut, KEY)))
    # The intact file ends ~1 GOP after its last key frame: that is not a shortfall.
    assert len(list(iter_segments(path, plan=plan_video(path, KEY)))) == 5


# --------------------------------------------------------------------------- decode threading
@pytest.mark.parametrize("accuracy", ["exact", "keyframe"])
def test_threaded_decoding_returns_identical_frames(tmp_path, videos, accuracy):
    big = write_test_video(tmp_path / "big.mp4", n_frames=150, fps=15, width=320, height=176, pattern="texture")
    for path in (big, videos["h264_bframes"], videos["sparse"]):
        plan = plan_video(path, SamplingConfig(target_fps=4.0, frame_accuracy=accuracy))
        for mode in ("auto", "never"):
            threaded = list(iter_segments(path, plan=plan, seek_mode=mode, threaded=True))
            single = list(iter_segments(path, plan=plan, seek_mode=mode))  # default: no frame threads
            assert len(threaded) == len(single) == plan.n_segments
            for a, b in zip(threaded, single):
                np.testing.assert_array_equal(a.frames, b.frames)
                assert a.frame_indices == b.frame_indices


# --------------------------------------------------------------------------- non-reference skipping
@pytest.fixture(scope="module")
def bframe_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("bframes")
    return {  # x264's default preset: B-frames, most of them non-reference pictures
        "cfr": write_test_video(d / "cfr.mp4", n_frames=600, fps=15, width=64, height=48, gop=60),
        "hevc": write_test_video(d / "hevc.mp4", n_frames=300, fps=15, width=64, height=48, codec="hevc", gop=30),
        "vfr": write_test_video(d / "vfr.mp4", n_frames=300, fps=10, width=64, height=48, vfr=True, gop=30),
    }


@pytest.mark.parametrize("target_fps", [0.3, 1.0, 2.0, 5.0, 15.0])
@pytest.mark.parametrize("name", ["cfr", "hevc"])
def test_non_reference_skipping_keeps_exact_frames_and_decodes_less(bframe_videos, name, target_fps):
    path = bframe_videos[name]  # 40 s / 20 s, a key frame every 4 s / 2 s
    plan = plan_video(path, SamplingConfig(target_fps=target_fps, min_frames=4))
    full = count_decoded_frames(path, plan, "never")
    auto = count_decoded_frames(path, plan, "auto")
    assert full == {"decoded": plan.info.frame_count, "seeks": 0, "redone": 0}
    assert _numbers(iter_segments(path, plan=plan)) == plan.frame_indices
    if target_fps <= 2.0:  # samples far enough apart that whole runs of B-pictures go unshown
        assert auto["decoded"] < 0.75 * full["decoded"]
    assert auto["redone"] == 0  # constant frame rate: no pick ever needs redoing
    part = range(1, min(3, plan.n_segments))  # a work unit: skipping plans for its targets only
    expected = [i for s in part for i in plan.frame_indices[slice(*plan.bounds[s])]]
    assert _numbers(iter_segments(path, plan=plan, segments=part)) == expected


@pytest.mark.parametrize("target_fps", [0.5, 2.0, 5.0])
def test_skipped_picture_in_a_timestamp_gap_is_redone_exactly(bframe_videos, target_fps):
    # Skipping assumes a frame every period; force it onto irregular timestamps: picks that
    # land more than two periods early are redone with nothing skipped, so frames still match.
    path = bframe_videos["vfr"]
    plan = plan_video(path, SamplingConfig(target_fps=target_fps, min_frames=4))
    assert plan.info.variable_frame_rate
    forced = dataclasses.replace(plan, info=dataclasses.replace(plan.info, variable_frame_rate=False))
    reference = list(iter_segments(path, plan=plan, seek_mode="never"))
    skipped = list(iter_segments(path, plan=forced))
    assert _numbers(skipped) == _numbers(reference)
    for a, b in zip(skipped, reference):
        np.testing.assert_array_equal(a.frames, b.frames)
    counts = count_decoded_frames(path, forced, "auto")
    assert counts["redone"] >= 1
    # The real (variable-rate) plan never skips: a full decode unless it seeks.
    assert count_decoded_frames(path, plan, "auto")["redone"] == 0


# --------------------------------------------------------------------------- conversion threads
@pytest.mark.parametrize("accuracy", ["exact", "keyframe"])
def test_conversion_threads_return_identical_segments(tmp_path, videos, accuracy):
    rotated = write_test_video(tmp_path / "rot.mp4", n_frames=90, fps=15, width=96, height=64, rotation=90)
    for path in (rotated, videos["h264_bframes"], videos["sparse"]):
        plan = plan_video(path, SamplingConfig(target_fps=4.0, frame_accuracy=accuracy))
        inline = list(iter_segments(path, plan=plan, convert_threads=0))
        for threads in (1, 3, None):
            pooled = list(iter_segments(path, plan=plan, convert_threads=threads))
            assert [s.index for s in pooled] == [s.index for s in inline] == list(range(plan.n_segments))
            for a, b in zip(pooled, inline):
                np.testing.assert_array_equal(a.frames, b.frames)
                assert a.frame_indices == b.frame_indices and a.timestamp_text == b.timestamp_text


def test_conversion_threads_stop_cleanly_when_the_consumer_stops(videos):
    plan = plan_video(videos["sparse"], SamplingConfig(target_fps=4.0))
    gen = iter_segments(videos["sparse"], plan=plan, convert_threads=3)
    first = next(gen)
    gen.close()  # pending conversions are cancelled, the container closed
    assert first.index == 0 and _numbers([first]) == plan.frame_indices[:8]
    with pytest.raises(ConfigError, match="convert_threads"):
        next(iter_segments(videos["sparse"], plan=plan, convert_threads=-1))
    cpus = len(os.sched_getaffinity(0))
    assert default_convert_threads() == (min(4, cpus) if cpus > 1 else 0)


# --------------------------------------------------------------------------- bad inputs
def _expect(exc_type, uri, match=None):
    with pytest.raises(exc_type) as err:
        probe_video(uri)
    assert str(uri) in str(err.value)  # every error names the uri
    if match:
        assert match in str(err.value)
    return err.value


def test_missing_and_empty_files(tmp_path):
    _expect(VideoNotFound, tmp_path / "missing.mp4")
    _expect(VideoNotFound, "memory://tempo-test-video/nope.mp4")
    _expect(VideoNotFound, tmp_path, "directory")
    (tmp_path / "empty.mp4").write_bytes(b"")
    _expect(EmptyVideoFile, tmp_path / "empty.mp4")


def test_text_file_renamed_mp4_is_corrupt(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    err = _expect(CorruptVideo, path)
    assert err.code == "corrupt_container"


def test_truncated_and_garbage_files_are_corrupt(tmp_path, videos):
    data = open(videos["h264"], "rb").read()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])
    _expect(CorruptVideo, tmp_path / "trunc.mp4")
    body = bytearray(data)
    start = data.find(b"mdat") + 40
    body[start : start + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (tmp_path / "garbage.mp4").write_bytes(bytes(body))
    with pytest.raises(CorruptVideo, match="garbage.mp4"):
        probe_video(tmp_path / "garbage.mp4")
        list(iter_segments(tmp_path / "garbage.mp4"))


def test_audio_only_has_no_video_stream(tmp_path):
    path = write_audio_only(tmp_path / "audio.mp4", duration_s=0.5)
    err = _expect(NoVideoStream, path, "audio")
    assert err.code == "no_video_stream"
    with pytest.raises(NoVideoStream):
        list(iter_segments(path))


def test_unknown_codec_is_unsupported(tmp_path, videos):
    data = open(videos["h264"], "rb").read()
    assert data.count(b"avc1") >= 1
    (tmp_path / "alien.mp4").write_bytes(data.replace(b"avc1", b"zq91"))
    err = _expect(UnsupportedCodec, tmp_path / "alien.mp4")
    assert err.code == "unsupported_codec"


def test_no_decodable_frame_is_too_short(tmp_path):
    import av

    path = tmp_path / "nokey.mp4"
    with av.open(str(path), "w") as container:  # only P-frames: nothing can be decoded
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = {"x264-params": "keyint=100:bframes=0"}
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(make_frame(i, 32, 32), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame) + ([] if i < 5 else stream.encode()):
                if not packet.is_keyframe:
                    container.mux(packet)
    _expect(VideoTooShort, path, "no decodable")


def test_stream_cut_short_is_corrupt(tmp_path):
    # Index first (faststart), data cut: the container opens, but frames run out early.
    path = write_test_video(tmp_path / "fs.mp4", n_frames=200, fps=10, width=64, height=48, gop=10, faststart=True)
    data = open(path, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    cut = str(tmp_path / "cut.mp4")
    info = probe_video(cut)
    assert info.frame_count == 200  # the index still promises every frame
    with pytest.raises(CorruptVideo, match="cut.mp4") as err:
        list(iter_segments(cut, plan=plan_video(info)))
    assert err.value.code == "corrupt_container"


def test_gs_url_through_gcs_emulator(gcs_server, videos):  # noqa: F811 - fixture
    import fsspec

    gcs_server.create_bucket("tempo-videos")
    opts = gcs_server.storage_options
    url = "gs://tempo-videos/clips/h264.mp4"
    with fsspec.open(url, "wb", **opts) as fh, open(videos["h264"], "rb") as src:
        fh.write(src.read())
    info = probe_video(url, storage_options=opts)
    assert info.uri == url and info.frame_count == 120
    plan = plan_video(info, SamplingConfig(target_fps=0.5, min_frames=4))
    segs = list(iter_segments(url, plan=plan, storage_options=opts))
    assert _numbers(segs) == plan.frame_indices
    with pytest.raises(VideoNotFound, match="gs://tempo-videos/clips/missing.mp4"):
        probe_video("gs://tempo-videos/clips/missing.mp4", storage_options=opts)


def test_large_frames_scale_to_512_and_the_short_side_may_round_up(tmp_path):
    from pipelines.probe_cmd import probe_record

    path = write_test_video(tmp_path / "wide.mp4", n_frames=4, fps=2, width=530, height=110, pattern="blocks")
    rec = probe_record("wide", path, SamplingConfig())
    assert rec["size"] == [530, 110] and rec["resized"] == [512, 112]  # 110 * 512/530 = 106.3 -> 112
    seg = next(iter_segments(path))
    assert seg.frames.shape == (8, 112, 512, 3)
    assert _numbers([seg]) == [0, 0, 1, 1, 2, 2, 3, 3]  # round(linspace(0, 3, 8))


# --------------------------------------------------------------------------- out-of-order timestamps
@pytest.fixture(scope="module")
def avi_videos(tmp_path_factory):
    """AVI files whose decoded frames carry out-of-order timestamps (AVI stores no pts)."""
    d = tmp_path_factory.mktemp("avi")
    kw = dict(n_frames=120, fps=10, width=64, height=48, container="avi", gop=12)
    return {
        # DivX 5 / Xvid style: MPEG-4 Part 2, packed B-frames, closed GOPs of 12
        "packed2": write_test_video(d / "packed2.avi", codec="mpeg4", bframes=2, packed_bframes=True, **kw),
        "packed1": write_test_video(d / "packed1.avi", codec="mpeg4", bframes=1, packed_bframes=True, **kw),
        # H.264 with x264's default B-frames in AVI
        "h264": write_test_video(d / "h264.avi", codec="h264", **kw),
        # MPEG-4 Part 2 with (unpacked) B-frames: timestamps happen to be in order
        "mpeg4": write_test_video(d / "mpeg4.avi", codec="mpeg4", bframes=2, **kw),
    }


def _sequential(path):
    """(frame numbers, decoder timestamps in s, key frame numbers) of a plain sequential PyAV decode."""
    import av

    with av.open(str(path)) as container:
        frames = [(read_frame_number(f.to_ndarray(format="rgb24")), f.time, f.key_frame) for f in container.decode(video=0)]
    return [n for n, _, _ in frames], [t for _, t, _ in frames], [n for n, _, k in frames if k]


@pytest.mark.parametrize(("name", "wrong_share"), [("packed2", 0.3), ("packed1", 0.45), ("h264", 0.45)])
def test_avi_fixtures_really_have_out_of_order_timestamps(avi_videos, name, wrong_share):
    numbers, times, _ = _sequential(avi_videos[name])
    assert numbers == list(range(120))  # display order is right ...
    assert any(b <= a for a, b in zip(times, times[1:]))  # ... but the timestamps are not
    # The old rule (the last frame whose timestamp is at or before start + i / fps) would give
    # a wrong frame for many indices: frame i - 1, or earlier.
    start = times[0]
    wrong = 0
    for i in range(120):  # decoding forward stops at the first frame past the target
        stop = next(k for k, t in enumerate(times + [float("inf")]) if t > start + i / 10 + 0.0125)
        picked = numbers[stop - 1] if stop else numbers[0]
        wrong += picked != i
    assert wrong >= wrong_share * 120


@pytest.mark.parametrize("mode", ["auto", "never", "always"])
@pytest.mark.parametrize("name", ["packed2", "packed1", "h264", "mpeg4"])
@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(target_fps=3.0), SamplingConfig(target_fps=0.5, min_frames=4)])
def test_frame_i_is_the_ith_frame_of_a_sequential_decode(avi_videos, name, mode, cfg):
    plan = plan_video(avi_videos[name], cfg)
    assert plan.info.frame_count == 120 and not plan.info.variable_frame_rate
    segs = list(iter_segments(avi_videos[name], plan=plan, seek_mode=mode))
    assert _numbers(segs) == plan.frame_indices
    assert [i for s in segs for i in s.frame_indices] == plan.frame_indices


@pytest.mark.parametrize("mode", ["auto", "never", "always"])
@pytest.mark.parametrize("name", ["packed2", "h264"])
def test_keyframe_mode_on_out_of_order_timestamps(avi_videos, name, mode):
    plan = plan_video(avi_videos[name], SamplingConfig(target_fps=3.0, frame_accuracy="keyframe"))
    segs = list(iter_segments(avi_videos[name], plan=plan, seek_mode=mode))
    keys = _sequential(avi_videos[name])[2]
    assert len(keys) >= 10
    expected = [max(k for k in keys if k <= i) for i in plan.frame_indices]  # the last key frame at or before i
    assert _numbers(segs) == expected
    assert [i for s in segs for i in s.frame_indices] == expected


def test_out_of_order_timestamps_sub_range_and_threads(avi_videos):
    path = avi_videos["packed2"]
    plan = plan_video(path, SamplingConfig(target_fps=4.0))  # 48 samples, 6 segments
    full = list(iter_segments(path, plan=plan))
    part = list(iter_segments(path, plan=plan, segments=range(3, 5)))
    threaded = list(iter_segments(path, plan=plan, threaded=True, convert_threads=2))
    for a, b in zip(full[3:5], part):
        np.testing.assert_array_equal(a.frames, b.frames)
    for a, b in zip(full, threaded):
        np.testing.assert_array_equal(a.frames, b.frames)
    assert _numbers(full) == plan.frame_indices


def test_skipping_stops_when_timestamps_run_backwards(avi_videos, monkeypatch):
    # H.264 in AVI: skipping is off (no stored pts). Forced on, the out-of-order timestamps
    # are noticed, skipping stops and the frames are still those of a sequential decode.
    import tempo_ops.video as video

    monkeypatch.setattr(video, "NO_PTS_FORMATS", frozenset())
    path = avi_videos["h264"]
    plan = plan_video(path, SamplingConfig(target_fps=1.0))
    assert _numbers(iter_segments(path, plan=plan)) == plan.frame_indices
    assert count_decoded_frames(path, plan)["redone"] >= 1
