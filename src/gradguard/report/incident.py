"""The HTML page of one replayed incident, built from the replay's result alone.

It uses the report's own machinery (:mod:`gradguard.report.html`): the same template with its
Content-Security-Policy (nothing loads, nothing runs), inline style, no script, and every string
from the bundle or the model (module names, reasons, tensor names) passed through
``html.escape``.

Example:
    >>> result = gradguard.replay("incidents/incident-000000812.pt", make_model)
    >>> build_incident_page(result, "incident-812.html")
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from gradguard.report.html import _e, _fmt, _table

__all__ = ["build_incident_page", "render_incident"]

# The template's badge colours: red for a fault in the run, grey for one outside it.
_BADGE = {"transient": "unknown", "unclassified": "unknown"}


def _num(v: Any) -> Any:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def _rows_table(d: dict[str, Any]) -> str:
    rows = d.get("rows") or []
    if not rows or "error" in rows[0]:
        return ""
    culprits = set(d.get("culprits") or [])
    shown = sorted(rows, key=lambda r: (r["row"] not in culprits, r["row"]))[:50]
    return "<h2>Per sample</h2>" + _table(
        ["row", "loss", "gradient norm", "culprit"],
        ([r["row"], _num(r.get("loss")), _num(r.get("grad_norm")), r["row"] in culprits]
         for r in shown),
        text_cols=(3,),
    )  # fmt: skip


def _values(d: dict[str, Any]) -> str:
    rec, rep = d.get("recorded") or {}, d.get("replayed") or {}
    differs = {x["name"] for x in d.get("differs") or []}
    keys = sorted(set(rec) | set(rep))
    return "<h2>Recorded and replayed</h2>" + _table(
        ["value", "recorded", "replayed", "reproduced"],
        ([k, _num(rec.get(k)), _num(rep.get(k)), k not in differs] for k in keys),
        text_cols=(0, 3),
    )


def _origin(d: dict[str, Any]) -> str:
    o = d.get("origin")
    if not o:
        return ""
    items = [
        ["op", o.get("op")],
        ["module", o.get("module")],
        ["pass", o.get("direction")],
        ["autograd node", o.get("autograd_node")],
        ["born from finite inputs", o.get("born")],
        ["fp32 avoids it", o.get("fp32_avoids")],
    ]
    ins = _table(
        ["input", "dtype", "shape", "min", "max", "non-finite", "parameter"],
        ([i, x.get("dtype"), str(x.get("shape")), _num(x.get("min")), _num(x.get("max")),
          x.get("nonfinite"), x.get("parameter")] for i, x in enumerate(o.get("inputs") or [])),
        text_cols=(1, 2, 6),
    )  # fmt: skip
    return (
        "<h2>Where the first non-finite value was born</h2>"
        + _table(["", "value"], items, text_cols=(0, 1)).replace("<table>", '<table class="stats">')
        + ins
    )


def _optimizer(d: dict[str, Any]) -> str:
    o = d.get("optimizer")
    if not o or not o.get("checked"):
        return ""
    return (
        f"<h2>Optimizer update, recorded state vs repaired ({_e(o.get('repair'))})</h2>"
        + _table(
            ["tensor", "update norm", "repaired", "ratio", "weight norm", "huge"],
            ([t["name"], _num(t["update"]), _num(t["repaired"]), _num(t["ratio"]),
              _num(t["weight"]), t["huge"]] for t in (o.get("tensors") or [])[:30]),
            text_cols=(0, 5),
        )
    )  # fmt: skip


def _model(d: dict[str, Any]) -> str:
    m = d.get("model")
    if not m:
        return ""
    out = []
    if m.get("nonfinite"):
        out.append("<h2>Non-finite weights</h2>")
        out.append(
            _table(
                ["tensor", "kind", "non-finite", "size"],
                ([s["name"], s["kind"], s["nonfinite"], s["numel"]] for s in m["nonfinite"]),
                text_cols=(0, 1),
            )
        )
    if m.get("known_good"):
        out.append("<h2>Known-good batches</h2>")
        out.append(
            _table(
                ["batch", "finite", "loss", "gradient norm"],
                (
                    [t["batch"], t.get("finite"), _num(t.get("loss")), _num(t.get("grad_norm"))]
                    for t in m["known_good"]
                ),
                text_cols=(0, 1),
            )
        )
    return "\n".join(out)


def render_incident(result: Any) -> str:
    """The page as one HTML string; ``result`` is a :class:`~gradguard.insight.replay.Replay` or its
    ``to_dict()``."""
    d: dict[str, Any] = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    facts: list[list[Any]]
    template = Template(
        resources.files("gradguard.report").joinpath("template.html").read_text("utf-8")
    )
    kind = str(d.get("kind", "unclassified"))
    badge = f'<span class="verdict {_BADGE.get(kind, "exploding")}">{_e(kind.upper())}</span>'
    meta = d.get("meta") or {}
    facts = [
        ["step", d.get("step")],
        ["guard action", d.get("action")],
        ["signal", d.get("signal")],
        ["reason", d.get("reason")],
        ["bundle", meta.get("bundle")],
        [
            "rank",
            f"{meta.get('rank')} of {meta.get('world_size')}"
            if meta.get("rank") is not None
            else "single process",
        ],
        ["versions", json.dumps(meta.get("versions"), sort_keys=True)],
    ]
    notes = "".join(f"<li>{_e(n)}</li>" for n in d.get("notes") or [])
    body = "\n".join(
        part
        for part in (
            f"<p>{badge} {_e(d.get('summary', ''))}</p>",
            _table(["", "value"], ([k, _fmt(v)] for k, v in facts), text_cols=(0, 1)).replace(
                "<table>", '<table class="stats">', 1
            ),
            _values(d),
            _rows_table(d),
            _origin(d),
            _optimizer(d),
            _model(d),
            f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "",
        )
        if part
    )
    title = f"gradguard incident at step {d.get('step')}: {kind}"
    return template.substitute(title=_e(title), subtitle=_e("replayed incident bundle"), body=body)


def build_incident_page(result: Any, out_path: str | os.PathLike[str]) -> Path:
    """Write the incident page of a replay (``Replay``, its dict, or a JSON file it wrote)."""
    if isinstance(result, (str, os.PathLike)) and str(result).endswith(".json"):
        result = json.loads(Path(result).read_text("utf-8"))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_incident(result), encoding="utf-8")
    return out
