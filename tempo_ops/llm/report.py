"""Evaluation reports: accuracy per budget × policy (overall and per metadata field), table, PNG plots.

Input: prediction rows (``tempo_ops.llm.evaluate.PREDICTION_FIELDS``). "No answer" rows
count as wrong and are counted separately.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

NONE_GROUP = "(none)"
"""Group value of a row whose metadata lacks the ``--group-by`` field."""


def _cell(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    correct = sum(1 for r in rows if r["correct"])
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "no_answer": sum(1 for r in rows if r["no_answer"]),
        "mean_tokens_used": sum(r["tokens_used"] for r in rows) / n if n else None,
        "mean_tokens_per_frame": sum(r["tokens_per_frame"] for r in rows) / n if n else None,
        "mean_segments_kept": sum(r["segments_kept"] for r in rows) / n if n else None,
        "truncated": sum(1 for r in rows if r["truncated"]),
    }


def _grid(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    cells: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(int(r["budget"]), str(r["policy"]))].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (b, p) in sorted(cells):
        out.setdefault(str(b), {})[p] = _cell(cells[(b, p)])
    return out


def group_value(row: dict[str, Any], field: str) -> str:
    """The row's value of metadata ``field`` as a string (``NONE_GROUP`` when absent)."""
    value = (row.get("metadata") or {}).get(field)
    return NONE_GROUP if value is None else str(value)


def summarize(rows: Sequence[dict[str, Any]], group_by: Sequence[str] = ()) -> dict[str, Any]:
    """Accuracy tables of prediction rows.

    Returns ``{"predictions", "no_answer", "budgets" [int], "policies" [str],
    "accuracy": {budget: {policy: cell}}, "by_group": {field: {"groups": {value: {budget:
    {policy: cell}}}, "macro_accuracy": {budget: {policy: mean of the groups' accuracies}}}}}``;
    a cell is ``{"n", "correct", "accuracy", "no_answer", "mean_tokens_used",
    "mean_tokens_per_frame", "mean_segments_kept", "truncated"}`` (budgets as string keys).
    """
    by_group: dict[str, Any] = {}
    for field in group_by:
        parts: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            parts[group_value(r, field)].append(r)
        groups = {value: _grid(parts[value]) for value in sorted(parts)}
        macro: dict[str, dict[str, float]] = {}
        for grid in groups.values():
            for b, per_policy in grid.items():
                for p, cell in per_policy.items():
                    macro.setdefault(b, {}).setdefault(p, []).append(cell["accuracy"])  # type: ignore[arg-type]
        by_group[field] = {
            "groups": groups,
            "macro_accuracy": {b: {p: sum(v) / len(v) for p, v in pp.items()} for b, pp in macro.items()},
        }
    return {
        "predictions": len(rows),
        "no_answer": sum(1 for r in rows if r["no_answer"]),
        "budgets": sorted({int(r["budget"]) for r in rows}),
        "policies": sorted({str(r["policy"]) for r in rows}),
        "accuracy": _grid(rows),
        "by_group": by_group,
    }


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text accuracy table: one row per policy, one column per budget (``acc% (n, no-answer)``)."""
    budgets = [str(b) for b in summary["budgets"]]
    head = f"{'policy':<10}" + "".join(f"{'B=' + b:>26}" for b in budgets)
    lines = [head]
    for p in summary["policies"]:
        cells = []
        for b in budgets:
            c = summary["accuracy"].get(b, {}).get(p)
            if c is None:
                cells.append(f"{'-':>26}")
            else:
                text = f"{100 * c['accuracy']:.1f}% (n={c['n']}, none={c['no_answer']}) {c['mean_tokens_per_frame']:.2f}t/f"
                cells.append(f"{text:>26}" if len(text) < 26 else " " + text)
        lines.append(f"{p:<10}" + "".join(cells))
    return "\n".join(lines)


def _line_plot(summary: dict[str, Any], value: str, ylabel: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display; PNG only
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    budgets = summary["budgets"]
    for p in summary["policies"]:
        xs, ys = [], []
        for b in budgets:
            c = summary["accuracy"].get(str(b), {}).get(p)
            if c is not None and c[value] is not None:
                xs.append(b)
                ys.append(100 * c[value] if value == "accuracy" else c[value])
        ax.plot(xs, ys, marker="o", label=p)
    if len(budgets) > 1 and min(budgets) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    if value == "accuracy":
        ax.set_ylim(-2, 102)
    ax.set_xlabel("token budget")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="policy")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


PLOTS: dict[str, tuple[str, str, str]] = {
    "accuracy_vs_budget.png": ("accuracy", "accuracy (%)", "Accuracy vs budget"),
    "tokens_per_frame_vs_budget.png": ("mean_tokens_per_frame", "tokens / frame used", "Tokens per frame used vs budget"),
}
"""File name → (cell value, y label, title) of the plots ``render_plots`` draws."""


def render_plots(summary: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of each plot in ``PLOTS`` (one line per policy over the budgets)."""
    return {name: _line_plot(summary, *spec) for name, spec in PLOTS.items()}
