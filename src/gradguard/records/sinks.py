"""Sinks: where flushed record rows go (JSONL, CSV, TensorBoard, W&B, MLflow, a console line).

A sink is any object with ``write(rows)`` and ``close()``
(:class:`gradguard.records.recorder.Sink`); :class:`~gradguard.records.recorder.Recorder` hands
every flush to each of its sinks as host rows (plain numbers, strings, bools, ``None`` and one level
of dicts), so a sink never touches the device. The row schema is in
:mod:`gradguard.records.recorder` and docs/records.md. The metric sinks (TensorBoard, Weights &
Biases, MLflow) share one mapping from rows to metric names, so a run looks the same in each.

Example:
    >>> rec = Recorder([JsonlSink("run.jsonl"), TensorBoardSink("tb/"), ConsoleSink()])
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from pathlib import Path
from typing import IO, Any

from gradguard.records.recorder import SCHEMA_VERSION, Row

__all__ = [
    "ConsoleSink",
    "CsvSink",
    "JsonlSink",
    "MlflowSink",
    "TensorBoardSink",
    "WandbSink",
    "metrics",
    "read_csv",
    "read_jsonl",
]

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

    Non-finite floats become ``"nan"``/``"inf"``/``"-inf"`` (strict JSON); :func:`read_jsonl`
    turns them back. The file is flushed after every
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
        """Append the rows, one JSON line each, and flush the file.

        Args:
            rows: host rows.

        Raises:
            ValueError: the sink is closed.
        """
        if self._file is None:
            raise ValueError(f"JsonlSink({str(self.path)!r}) is closed")
        for row in rows:
            self._file.write(json.dumps(_encode(row), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file; later writes raise."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_jsonl(path: str | os.PathLike[str]) -> list[Row]:
    """Read the rows a :class:`JsonlSink` wrote, with ``"nan"``/``"inf"`` strings back as floats.

    Every row is checked the way a report relies on it: a JSON object with an integer ``v``
    (schema version, not newer than this gradguard's), a string ``kind`` and an integer
    ``step``. Blank lines are ignored.

    Args:
        path: the JSONL file.

    Returns:
        The rows, in file order.

    Raises:
        ValueError: the file is not UTF-8, a line is not JSON or not a valid record (the
            message names the file and line), or its schema version is newer than this
            gradguard understands.
        OSError: the file cannot be read.

    Example:
        >>> rows = read_jsonl("runs/exp1.jsonl")
        >>> [r["step"] for r in rows if r["kind"] == "action"]
    """
    p = _check_path("path", path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows: list[Row] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict) or not {"v", "kind", "step"} <= row.keys():
            raise ValueError(f"{path}:{n}: a record needs the keys v, kind and step")
        for key in ("v", "step"):
            if not _is_int(row[key]):
                raise ValueError(f"{path}:{n}: {key!r} must be an integer, got {row[key]!r}")
        if not isinstance(row["kind"], str):
            raise ValueError(f"{path}:{n}: 'kind' must be a string, got {row['kind']!r}")
        if row["v"] > SCHEMA_VERSION:
            raise ValueError(
                f"{path}:{n}: record schema v{row['v']} is newer than this gradguard "
                f"understands (v{SCHEMA_VERSION}); upgrade gradguard"
            )
        rows.append({k: _decode(v) for k, v in row.items()})
    return rows


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

    Raises:
        TypeError: ``path`` is not a path or ``append`` not a bool.
        ValueError: ``append=True`` on a file whose header is not a records header.

    Example:
        >>> rec = Recorder([CsvSink("run.csv")]); ...; rec.close()
        >>> read_csv("run.csv")[0]["layers"]["fc1"]
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
        """Append one CSV row per record, widening the header first if new keys came.

        Args:
            rows: host rows.

        Raises:
            ValueError: the sink is closed.
        """
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
        """Mark the sink closed (every write closes its file); later writes raise."""
        self._closed = True


def read_csv(path: str | os.PathLike[str]) -> list[Row]:
    """Rows written by :class:`CsvSink`, with ``key/<name>`` columns folded back into dicts.

    Cells are parsed back as bools, ints, floats (``nan``/``inf`` included) or strings; empty
    cells are left out of the row.

    Args:
        path: the CSV file.

    Returns:
        The rows, in file order.

    Raises:
        ValueError: the file lacks the ``v``, ``kind`` and ``step`` columns.

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


# Metric names for the step row's numbers; other numbers go under "step/<key>".
_STEP_TAGS = {
    "grad_norm": "grad/total_norm",
    "clipped_norm": "grad/clipped_norm",
    "threshold": "grad/threshold",
    "clipped": "grad/clipped",
    "loss": "train/loss",
    "lr": "train/lr",
}
_TEXT_KEYS = ("action", "reason", "event", "module", "where", "message")
_METRIC_PREFIXES = ("grad", "train", "step", "layers")  # every name metrics() makes
_QUIET_ACTIONS = (None, "step")  # a plain step is no event


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float))  # bool is an int: True/False -> 1/0


def _layer_tag(key: str, name: str) -> str:
    # the step row's and the probe's ``layers`` dict is the per-layer gradient norm
    return f"layers/{name}/{'grad_norm' if key == 'layers' else key}"


def _is_scalar_row(row: Row) -> bool:
    kind = row.get("kind")
    return kind == "step" or (kind == "probe" and row.get("event") == "layers")


def metrics(row: Row) -> dict[str, float]:
    """The metrics of one row, under the names every metric sink uses.

    Step rows: ``grad_norm`` -> ``grad/total_norm``, ``clipped_norm`` -> ``grad/clipped_norm``,
    ``threshold`` -> ``grad/threshold``, ``clipped`` -> ``grad/clipped`` (0/1), ``loss`` ->
    ``train/loss``, ``lr`` -> ``train/lr``, any other number -> ``step/<key>``. Per-layer dicts
    of step rows and of the probe's ``event="layers"`` rows: ``layers`` ->
    ``layers/<name>/grad_norm``, any other dict ``<stat>`` -> ``layers/<name>/<stat>``. Other
    rows (actions, probe findings, diagnosis, meta) have no metrics: they are events.

    Args:
        row: a host row.

    Returns:
        ``{name: value}``, empty for an event row.

    Example:
        >>> metrics({"v": 1, "kind": "step", "step": 3, "grad_norm": 2.0, "clipped": True})
        {'grad/total_norm': 2.0, 'grad/clipped': 1.0}
    """
    if not _is_scalar_row(row):
        return {}
    step_row = row.get("kind") == "step"
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _FIXED:
            continue
        if isinstance(value, dict):
            for name, v in value.items():
                if _is_number(v):
                    out[_layer_tag(key, str(name))] = float(v)
        elif step_row and _is_number(value):
            out[_STEP_TAGS.get(key, f"step/{key}")] = float(value)
    return out


def _event(row: Row) -> tuple[str, str] | None:
    """``(name, text)`` for a row that is (or carries) an event, else ``None``.

    A step row's ``action`` other than a plain step is an event named ``guard/action``; every
    non-metric row is one named ``<kind>/<event or action or kind>``, its text the readable
    fields or, lacking them, the row's JSON.
    """
    if _is_scalar_row(row):
        action = row.get("action")
        if row.get("kind") != "step" or action in _QUIET_ACTIONS or not isinstance(action, str):
            return None
        reason = row.get("reason")
        return "guard/action", f"{action}: {reason}" if reason else action
    kind = str(row.get("kind"))
    fields = [f"**{k}**: {row[k]}" for k in _TEXT_KEYS if row.get(k) not in (None, "")]
    body = "  \n".join(fields) if fields else json.dumps(_encode(row))
    return f"{kind}/{row.get('event') or row.get('action') or kind}", body


class TensorBoardSink:
    """Real TensorBoard event files, via ``torch.utils.tensorboard.SummaryWriter``.

    Scalars are the rows' :func:`metrics` (``grad/total_norm``, ``train/loss``,
    ``layers/<name>/grad_norm``, ...). Text: a step row's ``action`` when it is not a plain
    ``"step"`` (tag ``guard/action``), and every other row (actions, probe findings, diagnosis,
    meta) under ``<kind>/<event or action or kind>``, as its readable fields or, lacking them,
    its JSON. Needs the ``tensorboard`` package.

    Args:
        logdir: the run's folder (``tensorboard --logdir`` it or its parent).
        flush_secs: how often the writer flushes to disk on its own (>= 1); every ``write``
            flushes too.

    Raises:
        ValueError: ``flush_secs`` is not an int >= 1.
        ImportError: tensorboard is not installed.

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
        """Add every row's scalars and text at the row's step, then flush.

        Args:
            rows: host rows.

        Raises:
            ValueError: the sink is closed.
        """
        if self._writer is None:
            raise ValueError(f"TensorBoardSink({str(self.logdir)!r}) is closed")
        w = self._writer
        for row in rows:
            step = int(row["step"])
            for tag, value in metrics(row).items():
                w.add_scalar(tag, value, step)
            event = _event(row)
            if event is not None:
                w.add_text(event[0], event[1], step)
        w.flush()

    def close(self) -> None:
        """Flush and close the event file; later writes raise."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _event_rows(rows: list[Row]) -> list[Row]:
    """The rows a metric sink keeps as events: every row that is not a metric row."""
    return [r for r in rows if not _is_scalar_row(r)]


class WandbSink:
    """Weights & Biases: the rows' :func:`metrics` as a run's history, events as a JSONL file.

    Metrics are logged against the custom x-axis ``guard/step`` (the row's step) rather than
    W&B's own step, which must only grow: after a rollback the guard's step goes back, and W&B
    would drop those points. The x-axis is set for gradguard's metric names only (``grad/*``,
    ``train/*``, ``step/*``, ``layers/*``), so a run you pass in keeps its own for the rest.
    The other rows (guard actions, probe findings, incidents, diagnosis, meta) are appended,
    in the :class:`JsonlSink` format, to ``gradguard-events.jsonl`` in the run's files, so
    :func:`read_jsonl` reads them back from the run (or its download) and a report can be
    rebuilt from it. Needs the ``wandb`` package (``pip install 'gradguard[wandb]'``);
    ``WANDB_MODE=offline`` keeps everything on disk.

    Args:
        run: a run from ``wandb.init(...)``; the sink logs to it and leaves finishing it to
            you. When None, the sink starts one with ``wandb.init(**init_kwargs)`` and finishes
            it on :meth:`close`.
        **init_kwargs: passed to ``wandb.init`` when ``run`` is None (``project``, ``dir``,
            ``mode``, ``config``, ...).

    Raises:
        ImportError: wandb is not installed.
        TypeError: ``run`` is not a W&B run, or both ``run`` and ``init_kwargs`` were given.

    Example:
        >>> rec = Recorder([JsonlSink("run.jsonl"), WandbSink(project="my-run", mode="offline")])
    """

    STEP_METRIC = "guard/step"
    EVENTS_FILE = "gradguard-events.jsonl"

    def __init__(self, run: Any = None, **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbSink needs the wandb package: pip install wandb") from e
        if run is not None and init_kwargs:
            raise TypeError("give either a run or wandb.init keyword arguments, not both")
        if run is not None and not all(hasattr(run, a) for a in ("log", "define_metric", "dir")):
            raise TypeError(f"run must be a wandb run (wandb.init()), got {type(run).__name__}")
        self._owns_run = run is None
        self.run: Any = wandb.init(**init_kwargs) if run is None else run
        self.run.define_metric(self.STEP_METRIC)
        # Only gradguard's names: a run the user passes in keeps its own metrics' x-axis.
        for prefix in _METRIC_PREFIXES:
            self.run.define_metric(f"{prefix}/*", step_metric=self.STEP_METRIC)
        self.events_path = Path(self.run.dir) / self.EVENTS_FILE
        self._closed = False

    def write(self, rows: list[Row]) -> None:
        """Log each row's metrics (one history entry per row) and append its events.

        Args:
            rows: host rows.

        Raises:
            ValueError: the sink is closed.
        """
        if self._closed:
            raise ValueError("WandbSink is closed")
        for row in rows:
            values = metrics(row)
            if values:
                self.run.log({self.STEP_METRIC: int(row["step"]), **values})
        events = _event_rows(rows)
        if events:
            with self.events_path.open("a", encoding="utf-8") as f:
                for r in events:
                    f.write(json.dumps(_encode(r), allow_nan=False) + "\n")
            # "live": W&B uploads the file again whenever it changes (online runs).
            self.run.save(str(self.events_path), base_path=self.run.dir, policy="live")

    def close(self) -> None:
        """Finish the run if the sink started it; later writes raise."""
        if not self._closed:
            self._closed = True
            if self._owns_run:
                self.run.finish()


class MlflowSink:
    """MLflow: the rows' :func:`metrics` as run metrics, events as a JSONL artifact.

    Each flush is one ``log_batch`` call (in chunks of MLflow's 1,000-metric limit) with the
    row's step as the metric step; MLflow keeps every value, also a repeated step after a
    rollback. MLflow's SQL stores (sqlite, ...) keep an infinite value as the largest finite
    float (``1.797e308``); the JSONL sink keeps it exact. The other rows (guard actions, probe
    findings, incidents, diagnosis, meta) go, in the :class:`JsonlSink` format, to the
    artifact ``gradguard/events.jsonl``, rewritten when new events come (they are rare), so
    :func:`read_jsonl` reads them back from a download of the artifact. Needs the ``mlflow``
    package (``pip install 'gradguard[mlflow]'``).

    Args:
        run_id: the run to log to; when None, a run is started (in ``experiment``, or MLflow's
            default one) and ended with the status ``FINISHED`` on :meth:`close`.
        tracking_uri: where MLflow stores runs (``"sqlite:///mlflow.db"``, a folder, a
            server); MLflow's default (``MLFLOW_TRACKING_URI``, else ``./mlruns``) when None.
        experiment: the experiment name for a run the sink starts (created if missing).
        run_name: the name of a run the sink starts.

    Raises:
        ImportError: mlflow is not installed.
        TypeError: an argument is not a str (or None), or ``experiment`` or ``run_name`` was
            given with an existing ``run_id``.

    Example:
        >>> sink = MlflowSink(tracking_uri="sqlite:///mlflow.db", experiment="exp1")
        >>> rec = Recorder([JsonlSink("run.jsonl"), sink])
    """

    EVENTS_ARTIFACT = "gradguard/events.jsonl"
    _BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("MlflowSink needs the mlflow package: pip install mlflow") from e
        for name, value in (
            ("run_id", run_id),
            ("tracking_uri", tracking_uri),
            ("experiment", experiment),
            ("run_name", run_name),
        ):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        if run_id is not None and (experiment is not None or run_name is not None):
            raise TypeError("experiment and run_name are for a run the sink starts, not run_id")
        self.client: Any = MlflowClient(tracking_uri=tracking_uri)
        self._owns_run = run_id is None
        if run_id is None:
            exp_id = "0"
            if experiment is not None:
                found = self.client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.run_id: str = run_id
        self._events: list[str] = []
        self._closed = False

    def write(self, rows: list[Row]) -> None:
        """Log every row's metrics in batches and rewrite the events artifact if events came.

        Args:
            rows: host rows.

        Raises:
            ValueError: the sink is closed.
        """
        from mlflow.entities import Metric

        if self._closed:
            raise ValueError(f"MlflowSink({self.run_id!r}) is closed")
        # One timestamp per flush: the rows were measured on the device before this moment.
        now = int(time.time() * 1000)
        batch = [
            Metric(key, value, now, int(row["step"]))
            for row in rows
            for key, value in metrics(row).items()
        ]
        for i in range(0, len(batch), self._BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + self._BATCH])
        events = _event_rows(rows)
        if events:
            self._events += [json.dumps(_encode(r), allow_nan=False) for r in events]
            self.client.log_text(self.run_id, "\n".join(self._events) + "\n", self.EVENTS_ARTIFACT)

    def close(self) -> None:
        """End the run if the sink started it; later writes raise."""
        if not self._closed:
            self._closed = True
            if self._owns_run:
                self.client.set_terminated(self.run_id, "FINISHED")


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, (int, float)):
        return f"{x:.4g}"
    return str(x)


class ConsoleSink:
    """A rich status line per flush: last step, loss, gradient norm, clip rate, skips.

    One line per flush (never per step), plus one line per incident (a guard action other
    than a plain step or a clip) and per probe finding, so a long run's terminal stays
    readable. The guard records an incident twice, as the step row's ``action`` and as the
    ``kind="action"`` row that follows it with the reason; the sink prints the second (it says
    why), and the step row alone only when no action row follows (a loss-scale overflow).

    Args:
        console: a ``rich.console.Console`` (e.g. ``Console(file=...)``, ``Console(stderr=True)``);
            a new one writing to stdout when None.

    Raises:
        TypeError: ``console`` is not a rich Console.

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
        # A step row's incident that ended a flush: its action row may open the next one.
        self._held: Row | None = None

    @staticmethod
    def _incident(row: Row) -> bool:
        kind, action = row.get("kind"), row.get("action")
        if kind == "action":
            return True
        return kind == "step" and action not in (None, "step", "clip")

    def _say(self, row: Row) -> None:
        from rich.markup import escape

        if row.get("kind") == "probe":
            msg = row.get("message") or f"{row.get('event')} in {row.get('module')}"
            self.console.print(f"[red]{escape(str(msg))}[/red]", highlight=False)
            return
        reason = f" ({row['reason']})" if row.get("reason") else ""
        text = escape(f"step {row['step']}: {row.get('action')}{reason}")
        self.console.print(f"[yellow]{text}[/yellow]", highlight=False)

    def write(self, rows: list[Row]) -> None:
        """Print the flush's incidents and findings, then its status line.

        Args:
            rows: host rows.
        """
        from rich.markup import escape

        said = [r for r in rows if self._incident(r) or
                (r.get("kind") == "probe" and r.get("event") != "layers")]  # fmt: skip
        held, self._held = self._held, None
        if held is not None:
            said.insert(0, held)
        for i, r in enumerate(said):
            if r.get("kind") == "step":  # an incident the step row carries
                nxt = said[i + 1] if i + 1 < len(said) else None
                if nxt is None and r is not held:
                    self._held = r  # its action row may open the next flush
                    continue
                if nxt is not None and self._same_incident(r, nxt):
                    continue  # the action row after it says the same, with the reason
            self._say(r)
        steps = [r for r in rows if r.get("kind") == "step"]
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

    @staticmethod
    def _same_incident(step_row: Row, other: Row) -> bool:
        return (
            other.get("kind") == "action"
            and other.get("step") == step_row.get("step")
            and other.get("action") == step_row.get("action")
        )

    def close(self) -> None:
        """Print an incident still held back (its action row never came)."""
        if self._held is not None:
            self._say(self._held)
            self._held = None
