"""``tempo ask``: one new question about one indexed video, answered end to end on this machine.

Compresses the question from the segment index (no video read, no vision encoder) into the
token cache — or reuses the entry when the same question was asked before — then allocates,
packs and answers with the LLM stage (``tempo_ops/ask.py``). Prints the answer, the parsed
option and the top segments by allocated tokens with their timestamps; ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tempo_ops.allocation import POLICIES
from tempo_ops.numerics import NUMERICS_MODES
from tempo_ops.query_text import TEMPLATES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="segment index built by `tempo index`")
    parser.add_argument("--cache", required=True, help="token cache the question's entry is written to (and reused from)")
    parser.add_argument("--video", required=True, help="video id (as in the index)")
    parser.add_argument("--question", required=True, help="the question text")
    parser.add_argument("--options", nargs="+", default=None, metavar="OPTION", help='answer options, e.g. "A. red" "B. blue"')
    parser.add_argument("--prompt-template", choices=sorted(TEMPLATES), default=None, help="benchmark prompt template (default plain)")
    parser.add_argument("--llm", required=True, help="Tempo checkpoint with the LLM stage (directory or URL)")
    parser.add_argument("--svlm", required=True, help="base Qwen3-VL directory the index was built with")
    parser.add_argument("--compressor", default=None, help="memory tokens (default: the --llm checkpoint's)")
    parser.add_argument("--budget", type=int, default=8192, help="visual token budget (default %(default)s)")
    parser.add_argument("--policy", choices=POLICIES, default="ata", help="allocation policy (default %(default)s)")
    parser.add_argument("--top", type=int, default=5, help="top segments to list (default %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument(
        "--numerics", choices=NUMERICS_MODES, default=None, help="compressor numerics (default: reference with bfloat16, exact otherwise)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    from pipelines.compress import cache_config, choose_storage_form, index_sampling, open_existing_cache
    from tempo_ops.ask import answer_entry, ask_query_id, ensure_entry
    from tempo_ops.index_store import IndexReader
    from tempo_ops.llm import TempoLLM
    from tempo_ops.query_text import render_query
    from tempo_ops.store import CacheReader, CacheWriter
    from tempo_ops.svlm.compressor import Compressor

    t0 = time.perf_counter()
    context = render_query(args.question, args.options, args.prompt_template)
    query_id = ask_query_id(context)
    indexed = IndexReader(args.index).video(args.video)  # VideoNotIndexed before any model loads
    compressor = Compressor.from_pretrained(
        args.svlm, memory_tokens=args.compressor or args.llm, device=args.device, dtype=args.dtype, numerics=args.numerics
    )
    sampling = index_sampling(args.index, compressor.fingerprint())
    form = choose_storage_form(open_existing_cache(args.cache), "auto", compressor.dtype)
    writer = CacheWriter.open(args.cache, cache_config(compressor.fingerprint(), sampling, form))
    t1 = time.perf_counter()
    compressed = ensure_entry(compressor, indexed, writer, args.video, query_id, context, args.prompt_template)
    t2 = time.perf_counter()
    del compressor
    llm = TempoLLM.from_pretrained(args.llm, device=args.device, dtype=args.dtype)
    entry = CacheReader(args.cache).entry(args.video, query_id)
    t3 = time.perf_counter()
    result = answer_entry(
        llm, entry, context=context, options=args.options, template=args.prompt_template,
        budget=args.budget, policy=args.policy, top=args.top,
    )
    t4 = time.perf_counter()
    doc = {
        "video_id": args.video,
        "query_id": query_id,
        "context": context,
        "n_segments": entry.n_segments,
        "budget": args.budget,
        "policy": args.policy,
        "compressed_from_index": compressed,
        **result,
        "timing_s": {
            "load_compressor": round(t1 - t0, 3),
            "compress": round(t2 - t1, 3),
            "load_llm": round(t3 - t2, 3),
            "answer": round(t4 - t3, 3),
        },
    }
    if args.json:
        print(json.dumps(doc, sort_keys=True))
        return 0
    print(f"answer: {result['answer']}")
    label = "parsed option" if result["rule"] != "open" else "parsed answer"
    print(f"{label}: {result['parsed'] if result['parsed'] is not None else '(none found)'}")
    how = "compressed now from the index" if compressed else "reused the cached entry"
    print(
        f"video {args.video}: {entry.n_segments} segments, {result['tokens_allocated']} of {args.budget} tokens "
        f"allocated ({args.policy}), {result['segments_kept']} segments kept; {how} ({t2 - t1:.2f}s), answered in {t4 - t3:.2f}s"
    )
    print("top segments by allocated tokens:")
    for s in result["top_segments"]:
        print(f"  {entry.timestamp_texts[s['segment']]:>18}  segment {s['segment']:>4}  tokens {s['tokens']:>4}  relevance {s['relevance']:.3f}")
    if result["allocation_notes"]:
        print("allocation notes: " + "; ".join(result["allocation_notes"]), file=sys.stderr)
    return 0
