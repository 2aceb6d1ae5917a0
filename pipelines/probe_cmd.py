"""``tempo probe``: probe, sample and segment videos; print one summary row per video.

    tempo probe --manifest corpus/manifest.jsonl
    tempo probe a.mp4 gs://bucket/b.mp4 --target-fps 1 --max-frames 512 --json

A video that fails prints an ``error [code]`` row (or JSON record) and the others go on;
the exit status is 1 when any video failed, 0 otherwise. The sampling options are shared
with ``tempo compress`` through :func:`add_sampling_arguments` and
:func:`sampling_config_from_args`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tempo_ops.errors import ConfigError, TempoError
from tempo_ops.video import FRAME_ACCURACIES, SamplingConfig, plan_video

_DEFAULTS = SamplingConfig()


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the frame sampling / resize / segment options (defaults: docs/METHOD.md "Sampling")."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--target-fps", type=float, default=_DEFAULTS.target_fps, help="sampled frames per second (default %(default)s)")
    group.add_argument("--min-frames", type=int, default=_DEFAULTS.min_frames, help="fewest sampled frames per video (default %(default)s)")
    group.add_argument("--max-frames", type=int, default=_DEFAULTS.max_frames, help="most sampled frames per video (default %(default)s)")
    group.add_argument("--max-edge", type=int, default=_DEFAULTS.max_edge, help="frames whose longer side exceeds this many px are scaled so it becomes this; smaller frames keep their size (default %(default)s)")
    group.add_argument("--frame-multiple", type=int, default=_DEFAULTS.multiple, help="sides of scaled frames are rounded to multiples of this, px; --max-edge must be one (default %(default)s)")
    group.add_argument("--window", type=int, default=_DEFAULTS.window, help="sampled frames per segment (default %(default)s)")
    group.add_argument(
        "--frame-accuracy",
        choices=FRAME_ACCURACIES,
        default=_DEFAULTS.frame_accuracy,
        help="exact: the reference frames; keyframe: the last key frame at or before each sampled frame, "
        "decoding key frames only (much faster on long videos, frames up to one GOP early) (default %(default)s)",
    )


def sampling_config_from_args(args: argparse.Namespace) -> SamplingConfig:
    """The SamplingConfig of parsed options (ConfigError for invalid values)."""
    return SamplingConfig(
        target_fps=args.target_fps,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        max_edge=args.max_edge,
        multiple=args.frame_multiple,
        window=args.window,
        frame_accuracy=getattr(args, "frame_accuracy", _DEFAULTS.frame_accuracy),  # namespaces built by hand may lack it
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uris", nargs="*", metavar="URI", help="video paths or URLs (local, memory://, gs://...)")
    parser.add_argument("--manifest", default=None, help="probe every video of this corpus manifest (JSON Lines)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per video instead of a table")
    add_sampling_arguments(parser)


def probe_record(video_id: str, uri: str, config: SamplingConfig) -> dict[str, Any]:
    """Summary of one video as a JSON-able dict; failures become ``{"error": {...}}``."""
    try:
        plan = plan_video(uri, config)
    except TempoError as exc:
        return {"video_id": video_id, "uri": uri, "error": exc.to_record()}
    info = plan.info
    return {
        "video_id": video_id,
        "uri": uri,
        "duration_s": round(info.duration_s, 3),
        "fps": info.fps,
        "frames": info.frame_count,
        "size": [info.width, info.height],
        "display_size": [info.display_width, info.display_height],
        "resized": [plan.frame_width, plan.frame_height],
        "rotation": info.rotation,
        "codec": info.codec,
        "variable_frame_rate": info.variable_frame_rate,
        "n_sampled": len(plan.frame_indices),
        "real_fps": plan.real_fps,
        "n_segments": plan.n_segments,
        "first_timestamp": plan.timestamp_texts[0] if plan.timestamp_texts else None,
        "last_timestamp": plan.timestamp_texts[-1] if plan.timestamp_texts else None,
    }


_HEADER = f"{'video_id':<20} {'dur_s':>8} {'fps':>7} {'frames':>7} {'size':>11} {'resized':>9} {'rot':>3} {'codec':<6} {'n':>5} {'real_fps':>8} {'segs':>5}  first..last"


def format_row(rec: dict[str, Any]) -> str:
    """One table row of a :func:`probe_record`."""
    vid = rec["video_id"]
    if "error" in rec:
        err = rec["error"]
        return f"{vid:<20} error [{err['code']}] {err['message']}"
    fps = f"{rec['fps']:.3f}" if rec["fps"] else "?"
    size = f"{rec['size'][0]}x{rec['size'][1]}"
    resized = f"{rec['resized'][0]}x{rec['resized'][1]}"
    return (
        f"{vid:<20} {rec['duration_s']:>8.2f} {fps:>7} {rec['frames']:>7} {size:>11} {resized:>9} {rec['rotation']:>3} "
        f"{rec['codec']:<6} {rec['n_sampled']:>5} {rec['real_fps']:>8.3f} {rec['n_segments']:>5}  "
        f"{rec['first_timestamp']}..{rec['last_timestamp']}"
    )


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    config = sampling_config_from_args(args)
    if args.manifest and args.uris:
        raise ConfigError("give either --manifest or URIs, not both")
    if args.manifest:
        from schemas.manifest import iter_manifest

        items = ((e.video_id, e.uri) for e in iter_manifest(args.manifest))
    elif args.uris:
        items = ((uri, uri) for uri in args.uris)
    else:
        raise ConfigError("nothing to probe: give --manifest M or one or more URIs")
    failed = 0
    if not args.json:
        print(_HEADER)
    for video_id, uri in items:
        rec = probe_record(video_id, uri, config)
        failed += "error" in rec
        print(json.dumps(rec) if args.json else format_row(rec), flush=True)
    if failed:
        print(f"{failed} video(s) failed", file=sys.stderr)
    return 1 if failed else 0
