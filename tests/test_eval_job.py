"""``tempo eval`` follows the job conventions of ``pipelines/job_support.py``: outputs never inside an
input, ``--storage-option``, run history with a status, and SIGTERM → one line, exit 143, a partial
summary marked interrupted, written predictions kept and resumed."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from test_eval import corpus, tempo  # noqa: F401 - corpus is a fixture
from test_job_behaviour import _one_error_line, _tree
from test_job_signals import _run_until, slow_after_first_call

REPO = Path(__file__).resolve().parents[1]


def _eval(cache: str, manifest: str, llm: str, out: Path, *extra: str) -> list[str]:
    return ["eval", "--cache", cache, "--manifest", manifest, "--llm", llm, "--out", str(out), *extra]


@pytest.mark.parametrize("where", ["inside_cache", "is_cache", "encloses_manifest", "inside_llm"])
def test_eval_out_overlapping_an_input_is_refused(corpus, tiny_models, tmp_path, capsys, where):  # noqa: F811
    cache, manifest = corpus
    llm = tiny_models["tempo"]
    out = {
        "inside_cache": Path(cache) / "eval",
        "is_cache": Path(cache),
        "encloses_manifest": Path(manifest).parent,
        "inside_llm": Path(llm) / "eval",
    }[where]
    before = _tree(Path(cache)), _tree(Path(llm))
    assert tempo(*_eval(cache, manifest, llm, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "output_overlaps_input")
    assert str(out) in line and "--out" in line
    assert (_tree(Path(cache)), _tree(Path(llm))) == before  # nothing of the inputs was touched
    if where in ("inside_cache", "inside_llm"):
        assert not out.exists()


def test_eval_malformed_storage_option_is_one_error_line(corpus, tiny_models, tmp_path, capsys):  # noqa: F811
    cache, manifest = corpus
    out = tmp_path / "eval"
    assert tempo(*_eval(cache, manifest, tiny_models["tempo"], out, "--storage-option", "no-equals-sign")) == 2
    _one_error_line(capsys.readouterr().err, "config_error")
    assert not out.exists()


# The job as a user runs it, with each LLM batch after the first one slowed down, so SIGTERM
# lands while the run is in flight (after one batch's predictions were written).


def test_eval_sigterm_exits_143_with_an_interrupted_summary_and_resumes(corpus, tiny_models, tmp_path):  # noqa: F811
    cache, manifest = corpus
    out = tmp_path / "eval"
    args = _eval(cache, manifest, tiny_models["tempo"], out, "--budgets", "8,16", "--batch-size", "1")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TEMPO_PROGRESS_INTERVAL_S="0", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-c", slow_after_first_call("pipelines.evaluate", "evaluate_batch"), *args]
    rc, err = _run_until(cmd, "[eval] 1/6 predictions", signal.SIGTERM, env)
    assert rc == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "tempo eval: interrupted by SIGTERM; completed work is kept, re-run to resume"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"] == "eval" and summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert summary["counts_so_far"]["predictions_done"] == 1 and summary["counts_so_far"]["predictions_total"] == 6
    first_run = summary["run_id"]
    assert json.loads((out / "runs" / f"{first_run}.summary.json").read_text()) == summary

    # Re-run: the one prediction written before the signal is kept, the other 5 are made now.
    assert tempo(*args) == 0
    done = json.loads((out / "summary.json").read_text())
    assert done["status"] == "complete" and done["run_id"] != first_run
    assert done["counts"]["skipped_done"] == 1 and done["counts"]["written"] == 5
    assert done["results"]["predictions"] == 6
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        [f"{first_run}.summary.json", f"{done['run_id']}.summary.json", f"{done['run_id']}.deadletter.jsonl"]
    )
    assert (out / "deadletter.jsonl").read_text() == ""

