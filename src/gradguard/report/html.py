"""A self-contained HTML report from records: summary, diagnosis, incidents and figures.

The page needs nothing but itself: figures are embedded as base64 PNG data URIs, the style is
inline, there is no script, and a Content-Security-Policy forbids loading anything else. Every
string that comes from the records (layer names, reasons, messages) is passed through
``html.escape``: a parameter named ``<script>`` shows as text, it does not run.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from gradguard.records.recorder import Row
from gradguard.records.sinks import read_jsonl
from gradguard.report.figures import render_figures

__all__ = ["build_report", "render_html"]

_MAX_INCIDENTS = 500

# Shown wherever the records carry both numbers, which readers otherwise take for one.
STEP_VS_POSITION = (
    "step: the guard's count of optimizer steps, applied or attempted (a skipped step keeps "
    "its number; a rollback sets it back to the snapshot's). position: the index of the data "
    "batch in the stream. The two differ after a rollback (the replay reuses step numbers on "
    "later batches) and after skipped batches (a batch skipped on replay takes no step)."
)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _table(headers: list[str], rows: Iterable[list[Any]], text_cols: Iterable[int] = ()) -> str:
    left = set(text_cols)
    head = "".join(f'<th class="t">{_e(h)}</th>' if i in left else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))  # fmt: skip
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="t">{_e(_fmt(v))}</td>' if i in left else f"<td>{_e(_fmt(v))}</td>"
            for i, v in enumerate(r)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary(rows: list[Row]) -> str:
    steps = sorted((r for r in rows if r.get("kind") == "step"), key=lambda r: r["step"])
    actions = [r for r in rows if r.get("kind") == "action"]
    if not steps and not actions:
        return ""
    counts: dict[str, int] = {}
    for r in actions:
        counts[str(r.get("action"))] = counts.get(str(r.get("action")), 0) + 1
    clipped = sum(1 for r in steps if r.get("clipped") is True)
    norms = [r.get("grad_norm") for r in steps]
    nonfinite = sum(1 for v in norms if isinstance(v, float) and not math.isfinite(v))
    finite = [float(v) for v in norms if isinstance(v, (int, float)) and math.isfinite(v)]
    losses = [r.get("loss") for r in steps if isinstance(r.get("loss"), (int, float))]
    items: list[list[Any]] = []
    if steps:
        items.append(
            ["steps logged", f"{len(steps)} (step {steps[0]['step']} to {steps[-1]['step']})"]
        )
    if losses:
        items.append(["first / last loss", f"{_fmt(losses[0])} / {_fmt(losses[-1])}"])
    if finite:
        items.append(["largest finite gradient norm", _fmt(max(finite))])
    items.append(["non-finite gradient norms", nonfinite])
    first_bad = next(
        (r["step"] for r in steps if isinstance(r.get("grad_norm"), float)
         and not math.isfinite(r["grad_norm"])),
        None,
    )  # fmt: skip
    if first_bad is not None:
        items.append(["first non-finite gradient at step", first_bad])
    items.append(["steps clipped", clipped])
    for name in sorted(counts):
        items.append([f"{name} events", counts[name]])
    return "<h2>Run</h2>" + _table(["", "value"], items, text_cols=(0, 1)).replace(
        "<table>", '<table class="stats">', 1
    )


def _diagnosis(rows: list[Row]) -> str:
    diag = [r for r in rows if r.get("kind") == "diagnosis"]
    if not diag:
        return ""
    out = ["<h2>Preflight diagnosis</h2>"]
    for v in (r for r in diag if r.get("part") == "verdict"):
        verdict = str(v.get("verdict", "unknown"))
        css = verdict if verdict in ("exploding", "vanishing", "healthy") else "unknown"
        badge = f'<span class="verdict {css}">{_e(verdict.upper())}</span>'
        out.append(f"<p>{badge} {_e(v.get('message', ''))}</p>")
        if v.get("worst_layer") is not None:
            out.append(
                f"<p>Farthest from 1: layer <code>{_e(v['worst_layer'])}</code>, gain "
                f"{_e(_fmt(v.get('worst_gain')))}x.</p>"
            )
    layers = sorted((r for r in diag if r.get("part") == "layer"), key=lambda r: r.get("index", 0))
    if layers:
        out.append("<h3>Per layer (backward gain of the segment from its input)</h3>")
        out.append(
            _table(
                ["#", "layer", "module", "activation RMS", "gradient RMS", "gain", "|J| estimate"],
                (
                    [r.get("index"), r.get("name"), r.get("module"), r.get("act_rms"),
                     r.get("grad_rms"), r.get("gain"), r.get("jacobian_norm")]
                    for r in layers
                ),
                text_cols=(1, 2),
            )
        )  # fmt: skip
    rem = [r for r in diag if r.get("part") == "remedy"]
    trained = [v.get("steps") for v in diag if v.get("part") == "verdict" and v.get("steps")]
    loss_after = f"loss after {trained[0]} SGD steps" if trained else "loss after"
    if rem:
        rem.sort(key=lambda r: r.get("rank") or 10**9)
        out.append("<h3>Remedies, best first (each measured on a copy of the model)</h3>")
        out.append(
            _table(
                ["rank", "remedy", "per-layer gain", "whole depth", "verdict", loss_after,
                 "how", "note"],
                (
                    [r.get("rank") or "n/a", r.get("remedy"), r.get("per_layer_gain"),
                     r.get("overall_gain"), r.get("verdict"), r.get("loss_after"),
                     r.get("how"), r.get("error") or r.get("note")]
                    for r in rem
                ),
                text_cols=(1, 4, 6, 7),
            )
        )  # fmt: skip
    others = [r for r in diag if r.get("part") not in ("verdict", "layer", "remedy")]
    if others:
        out.append(_generic(others))
    return "\n".join(out)


_SKIP_KEYS = ("v", "kind", "step")


def _generic(rows: list[Row]) -> str:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(k for k in r if k not in _SKIP_KEYS))
    cols = list(keys)
    return _table(
        ["step", "kind", *cols],
        ([r.get("step"), r.get("kind"), *[r.get(k) for k in cols]] for r in rows),
        text_cols=range(1, len(cols) + 2),
    )


def _incidents(rows: list[Row]) -> str:
    found = sorted(
        (r for r in rows if r.get("kind") in ("action", "probe")), key=lambda r: r["step"]
    )
    if not found:
        return "<h2>Incidents</h2><p>No guard actions or probe findings were recorded.</p>"
    shown = found[:_MAX_INCIDENTS]
    note = (
        f"<p class='muted'>First {_MAX_INCIDENTS} of {len(found)} incidents.</p>"
        if len(found) > _MAX_INCIDENTS
        else ""
    )
    if any("position" in r for r in shown):
        note += f"<p class='muted' id='step-vs-position'>{_e(STEP_VS_POSITION)}</p>"
    return f"<h2>Incidents</h2>{note}{_generic(shown)}"


def _figures(rows: list[Row]) -> str:
    figs = render_figures(rows)
    if not figs:
        return ""
    out = ["<h2>Figures</h2>"]
    for name, title, png in figs:
        data = base64.b64encode(png).decode("ascii")
        out.append(
            f'<figure id="{_e(name)}"><img src="data:image/png;base64,{data}" alt="{_e(title)}">'
            f"<figcaption>{_e(title)}</figcaption></figure>"
        )
    return "\n".join(out)


def render_html(rows: list[Row], title: str = "gradguard report") -> str:
    """The report as one HTML string (see :func:`build_report`, which writes it to a file).

    Args:
        rows: host rows, already checked to be records.
        title: the page title.

    Returns:
        The whole page: inline style, embedded figures, no script.

    Example:
        >>> html = render_html(guard.records, title="run 7")
    """
    template = Template(
        resources.files("gradguard.report").joinpath("template.html").read_text("utf-8")
    )
    meta = [r for r in rows if r.get("kind") == "meta"]
    subtitle = f"{len(rows)} records"
    if meta:
        extras = ", ".join(f"{k}={_fmt(v)}" for k, v in meta[0].items() if k not in _SKIP_KEYS)
        subtitle += f"; {extras}" if extras else ""
    body = "\n".join(
        part
        for part in (_summary(rows), _diagnosis(rows), _incidents(rows), _figures(rows))
        if part
    )
    return template.substitute(title=_e(title), subtitle=_e(subtitle), body=body)


def build_report(
    rows_or_jsonl_path: list[Row] | str | Path,
    out_path: str | Path,
    *,
    title: str = "gradguard report",
) -> Path:
    """Write a self-contained HTML report of a run.

    Args:
        rows_or_jsonl_path: host rows (``guard.records``, ``Diagnosis.to_rows()``, or both
            concatenated) or the path of a JSONL file written by the JSONL sink.
        out_path: the HTML file to write (parent folders are created).
        title: the page title.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        TypeError: ``rows_or_jsonl_path`` is neither a list nor a path.
        ValueError: a row is not a record (a dict with ``kind`` and an integer ``step``), or
            the JSONL file holds a line that is not one (see :func:`gradguard.read_jsonl`).

    Example:
        >>> build_report("runs/exp1.jsonl", "runs/exp1.html")
    """
    if isinstance(rows_or_jsonl_path, (str, Path)):
        rows = read_jsonl(rows_or_jsonl_path)
    elif isinstance(rows_or_jsonl_path, list):
        rows = rows_or_jsonl_path
    else:
        raise TypeError(
            "rows_or_jsonl_path must be a list of record dicts or a JSONL path, got "
            f"{type(rows_or_jsonl_path).__name__}"
        )
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "kind" not in r or "step" not in r:
            raise ValueError(f"rows[{i}] is not a record (a dict with 'kind' and 'step')")
        if isinstance(r["step"], bool) or not isinstance(r["step"], int):
            raise ValueError(f"rows[{i}]['step'] must be an integer, got {r['step']!r}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(rows, title), encoding="utf-8")
    return out
