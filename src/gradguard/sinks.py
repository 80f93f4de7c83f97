"""Sinks: where flushed record rows go (JSONL, CSV, TensorBoard, a rich console line).

A sink is any object with ``write(rows)`` and ``close()`` (:class:`gradguard.records.Sink`);
:class:`~gradguard.records.Recorder` hands every flush to each of its sinks as host rows (plain
numbers, strings, bools, ``None`` and one level of dicts), so a sink never touches the device.
The row schema is in :mod:`gradguard.records` and docs/records.md.

Example:
    >>> rec = Recorder([JsonlSink("run.jsonl"), TensorBoardSink("tb/"), ConsoleSink()])
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import IO, Any

from gradguard.records import Row

__all__ = ["ConsoleSink", "CsvSink", "JsonlSink", "TensorBoardSink", "read_csv"]

_FIXED = ("v", "kind", "step")


def _encode(value: Any) -> Any:
    """JSON has no NaN/inf: write them as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _check_path(name: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


class JsonlSink:
    """One JSON object per row and line: the default, lossless format.

    Non-finite floats become ``"nan"``/``"inf"``/``"-inf"`` (strict JSON);
    :func:`gradguard.records.read_jsonl` turns them back. The file is flushed after every
    write, so another process (a report, ``tail -f``) sees complete lines.

    Args:
        path: the file; parent folders are created.
        append: add to an existing file (resuming a run) instead of starting it afresh.

    Example:
        >>> rec = Recorder([JsonlSink("run.jsonl")]); ...; rec.close()
        >>> rows = read_jsonl("run.jsonl")
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = False) -> None:
        self.path = _check_path("path", path)
        if not isinstance(append, bool):
            raise TypeError(f"append must be True or False, got {type(append).__name__}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, rows: list[Row]) -> None:
        if self._file is None:
            raise ValueError(f"JsonlSink({str(self.path)!r}) is closed")
        for row in rows:
            self._file.write(json.dumps(_encode(row), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _flatten(row: Row) -> dict[str, Any]:
    """``{"layers": {"fc1": 1.0}}`` -> ``{"layers/fc1": 1.0}`` (one level, as the schema)."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}/{sub}"] = v
        else:
            flat[key] = value
    return flat


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest exact form; nan/inf print as "nan"/"inf"/"-inf"
    return str(value)


_INT = re.compile(r"[+-]?\d+")
_FLOAT_WORDS = {"nan", "inf", "-inf", "+inf"}


def _parse(cell: str) -> Any:
    if cell == "True" or cell == "False":
        return cell == "True"
    if _INT.fullmatch(cell):
        return int(cell)
    if cell in _FLOAT_WORDS:
        return float(cell)
    try:
        return float(cell)
    except ValueError:
        return cell


class CsvSink:
    """A spreadsheet-friendly table: one row per record, dicts flattened to ``key/<name>``.

    Columns are ``v, kind, step`` and then every other key in order of first appearance; a
    ``layers`` dict becomes ``layers/<layer name>`` columns. When a flush brings a column the
    file does not have yet, the file is rewritten with the wider header (into a temporary file,
    then renamed over the old one, so a crash never leaves half a table): earlier rows get
    empty cells there. That happens only when new keys appear (usually in the first flushes).

    Cells: floats in their shortest exact form (``nan``, ``inf``, ``-inf`` as such), bools as
    ``True``/``False``, ``None`` and absent keys as empty. :func:`read_csv` reads it back; it
    cannot tell ``None`` from absent (both are dropped) nor the string ``"3"`` from the
    number 3, so JSONL stays the lossless format.

    Args:
        path: the file; parent folders are created.
        append: continue an existing file (resuming a run), keeping its columns.
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = False) -> None:
        self.path = _check_path("path", path)
        if not isinstance(append, bool):
            raise TypeError(f"append must be True or False, got {type(append).__name__}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = list(_FIXED)
        self._closed = False
        if append and self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
            if header[:3] != list(_FIXED):
                raise ValueError(
                    f"{self.path} is not a records CSV (its header must start v,kind,step)"
                )
            self.columns = header
            return
        with self.path.open("w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerow(self.columns)

    def write(self, rows: list[Row]) -> None:
        if self._closed:
            raise ValueError(f"CsvSink({str(self.path)!r}) is closed")
        flat = [_flatten(r) for r in rows]
        new = [k for r in flat for k in r if k not in self.columns]
        if new:
            self._widen(list(dict.fromkeys(new)))
        with self.path.open("a", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            for r in flat:
                writer.writerow([_cell(r.get(c)) for c in self.columns])

    def _widen(self, new: list[str]) -> None:
        with self.path.open(encoding="utf-8", newline="") as f:
            old = list(csv.reader(f))[1:]
        pad = [""] * len(new)
        self.columns += new
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows(r + pad for r in old)
        os.replace(tmp, self.path)

    def close(self) -> None:
        self._closed = True


def read_csv(path: str | os.PathLike[str]) -> list[Row]:
    """Rows written by :class:`CsvSink`, with ``key/<name>`` columns folded back into dicts.

    Example:
        >>> read_csv("run.csv")[0]["layers"]["fc1"]
    """
    p = _check_path("path", path)
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(_FIXED) <= set(reader.fieldnames):
            raise ValueError(f"{p}: a records CSV needs the columns v, kind and step")
        out: list[Row] = []
        for raw in reader:
            row: Row = {}
            for col, cell in raw.items():
                if cell == "" or cell is None:
                    continue
                value = _parse(cell)
                key, sep, sub = col.partition("/")
                if sep:
                    row.setdefault(key, {})[sub] = value
                else:
                    row[col] = value
            out.append(row)
    return out


# Tags for the step row's numbers; other numbers go under "step/<key>".
_STEP_TAGS = {
    "grad_norm": "grad/total_norm",
    "clipped_norm": "grad/clipped_norm",
    "threshold": "grad/threshold",
    "clipped": "grad/clipped",
    "loss": "train/loss",
    "lr": "train/lr",
}
_TEXT_KEYS = ("action", "reason", "event", "module", "where", "message")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float))  # bool is an int: True/False -> 1/0


def _layer_tag(key: str, name: str) -> str:
    # the step row's and the probe's ``layers`` dict is the per-layer gradient norm
    return f"layers/{name}/{'grad_norm' if key == 'layers' else key}"


class TensorBoardSink:
    """Real TensorBoard event files, via ``torch.utils.tensorboard.SummaryWriter``.

    Scalars (step rows): ``grad_norm`` -> ``grad/total_norm``, ``clipped_norm`` ->
    ``grad/clipped_norm``, ``threshold`` -> ``grad/threshold``, ``clipped`` -> ``grad/clipped``
    (0/1), ``loss`` -> ``train/loss``, ``lr`` -> ``train/lr``, any other number ->
    ``step/<key>``. Per-layer dicts of step rows and of the probe's ``event="layers"`` rows:
    ``layers`` -> ``layers/<name>/grad_norm``, any other dict ``<stat>`` ->
    ``layers/<name>/<stat>`` (``act_rms``, ``dead_frac``, ...). Text: a step row's ``action``
    when it is not a plain ``"step"`` (tag ``guard/action``), and every other row (actions,
    probe findings, diagnosis, meta) under ``<kind>/<event or action or kind>``, as its
    readable fields or, lacking them, its JSON. Needs the ``tensorboard`` package.

    Args:
        logdir: the run's folder (``tensorboard --logdir`` it or its parent).
        flush_secs: how often the writer flushes to disk on its own (>= 1); every ``write``
            flushes too.

    Example:
        >>> rec = Recorder([TensorBoardSink("runs/exp1")])
    """

    def __init__(self, logdir: str | os.PathLike[str], flush_secs: int = 10) -> None:
        self.logdir = _check_path("logdir", logdir)
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, int) or flush_secs < 1:
            raise ValueError(f"flush_secs must be an int >= 1, got {flush_secs!r}")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises this when tensorboard is missing
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: pip install tensorboard"
            ) from e
        self._writer: Any = SummaryWriter(log_dir=str(self.logdir), flush_secs=flush_secs)

    def write(self, rows: list[Row]) -> None:
        if self._writer is None:
            raise ValueError(f"TensorBoardSink({str(self.logdir)!r}) is closed")
        w = self._writer
        for row in rows:
            step, kind = int(row["step"]), str(row["kind"])
            if kind == "step" or (kind == "probe" and row.get("event") == "layers"):
                for key, value in row.items():
                    if key in _FIXED:
                        continue
                    if isinstance(value, dict):
                        for name, v in value.items():
                            if _is_number(v):
                                w.add_scalar(_layer_tag(key, str(name)), float(v), step)
                    elif kind == "step" and _is_number(value):
                        w.add_scalar(_STEP_TAGS.get(key, f"step/{key}"), float(value), step)
                action = row.get("action")
                if kind == "step" and isinstance(action, str) and action != "step":
                    reason = row.get("reason")
                    w.add_text("guard/action", f"{action}: {reason}" if reason else action, step)
                continue
            fields = [f"**{k}**: {row[k]}" for k in _TEXT_KEYS if row.get(k) not in (None, "")]
            body = "  \n".join(fields) if fields else json.dumps(_encode(row))
            w.add_text(f"{kind}/{row.get('event') or row.get('action') or kind}", body, step)
        w.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, (int, float)):
        return f"{x:.4g}"
    return str(x)


class ConsoleSink:
    """A rich status line per flush: last step, loss, gradient norm, clip rate, skips.

    One line per flush (never per step), plus one line per guard action other than a plain
    step and per probe finding, so a long run's terminal stays readable.

    Args:
        console: a ``rich.console.Console`` (e.g. ``Console(file=...)``, ``Console(stderr=True)``);
            a new one writing to stdout when None.

    Example:
        ``step 1200  loss 2.314  norm 0.871  clip 12% (6/50)  skips 1 (total 3)``
    """

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

        if console is not None and not isinstance(console, Console):
            raise TypeError(f"console must be a rich.console.Console, got {type(console).__name__}")
        self.console = console if console is not None else Console()
        self.total_steps = 0
        self.total_skips = 0

    def write(self, rows: list[Row]) -> None:
        from rich.markup import escape

        steps = [r for r in rows if r.get("kind") == "step"]
        for r in rows:
            kind = r.get("kind")
            if kind == "action" or (kind == "step" and r.get("action") not in (None, "step")):
                if kind == "step" and r.get("action") == "clip":
                    continue
                reason = f" ({r['reason']})" if r.get("reason") else ""
                text = escape(f"step {r['step']}: {r.get('action')}{reason}")
                self.console.print(f"[yellow]{text}[/yellow]", highlight=False)
            elif kind == "probe" and r.get("event") != "layers":
                msg = r.get("message") or f"{r.get('event')} in {r.get('module')}"
                self.console.print(f"[red]{escape(str(msg))}[/red]", highlight=False)
        if not steps:
            return
        last = steps[-1]
        n = len(steps)
        clipped = sum(1 for r in steps if r.get("clipped") is True)
        skips = sum(1 for r in steps if r.get("action") == "skip")
        self.total_steps += n
        self.total_skips += skips
        parts = [f"step {last['step']}"]
        for key, label in (("loss", "loss"), ("grad_norm", "norm")):
            if key in last:
                parts.append(f"{label} {_fmt(last[key])}")
        parts.append(f"clip {100 * clipped / n:.0f}% ({clipped}/{n})")
        parts.append(f"skips {skips} (total {self.total_skips})")
        self.console.print(escape("  ".join(parts)), highlight=False)

    def close(self) -> None:
        return None
