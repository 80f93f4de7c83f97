"""The ``gradguard`` command line: ``demo``, ``lab``, ``diagnose``, ``replay`` and ``report``.

Exit codes, the same for every command, so that scripts can rely on them:

* ``0``: done (for ``lab``: every experiment's success criterion held);
* ``1``: failure (an experiment's criterion did not hold, the demo's guarded run diverged, an
  unexpected error);
* ``2``: usage or bad input (unknown option, missing file, bad factory, unreadable records).

Tables and results go to stdout; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

EPILOG = """\
exit codes: 0 ok; 1 failure (an experiment's criterion did not hold, a run diverged, an
unexpected error); 2 usage or bad input (unknown option, missing file, bad factory, bad records).
"""


class UsageError(Exception):
    """Bad input from the command line: printed without a traceback, exit code 2."""


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # pipes and logs: wide enough that tables do not wrap numbers
        console = Console(stderr=stderr, highlight=False, width=140)
    return console


class RichTicker:
    """A :class:`gradguard.app.lab.Ticker` drawn as one rich progress bar on a shared
    ``Progress``."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None

    def start(self, description: str, total: int) -> None:
        if self.task is not None:  # a new phase: show the previous one as finished
            total = next(t.total for t in self.progress.tasks if t.id == self.task)
            self.progress.update(self.task, completed=total)
        self.task = self.progress.add_task(description, total=max(int(total), 1))

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def describe(self, description: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=description)


def _progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console(stderr=True),
        transient=False,
    )


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(str(c), overflow="fold")
    for r in rows:
        table.add_row(*(escape(str(x)) for x in r))
    return table


def escape(text: str) -> str:
    """Text printed through rich, with ``[...]`` shown literally rather than read as markup."""
    from rich.markup import escape as _escape

    return _escape(text)


def _out_dir(value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out must be a folder, but {value} is a file")
    return path


# -- lab ---------------------------------------------------------------------------------------


def _cmd_lab(args: argparse.Namespace) -> int:
    from gradguard.app.lab import EXPERIMENTS, run_experiment

    chosen = list(args.experiments or ["all"])
    for name in LONG_LABS:
        if name in chosen:
            if len(chosen) > 1:
                raise UsageError(f"run `gradguard lab {name}` on its own (it takes minutes)")
            return _cmd_long_lab(name, args)
    names = list(EXPERIMENTS) if "all" in chosen else list(dict.fromkeys(chosen))
    out = _out_dir(args.out)
    console = _console()
    verdicts: list[list[Any]] = []
    markdown: list[str] = []
    for name in names:
        t0 = time.perf_counter()
        with _progress() as progress:
            result = run_experiment(
                name, seeds=args.seeds, quick=args.quick, out=out, ticker=RichTicker(progress)
            )
        seconds = time.perf_counter() - t0
        console.rule(escape(f"lab {name}: {result.title}"))
        console.print(f"[bold]setup[/bold]: {escape(result.setup)}")
        console.print(f"[bold]success criterion[/bold]: {escape(result.criterion)}")
        console.print(_table(f"{name} ({seconds:.1f} s)", result.columns, result.rows))
        status = "[green]criterion held[/green]" if result.passed else "[red]criterion FAILED[/red]"
        console.print(f"{status}: {escape(result.summary)}")
        for fig in result.figures:
            console.print(f"figure: {fig}")
        verdicts.append(
            [name, "held" if result.passed else "FAILED", f"{seconds:.1f}", result.summary]
        )
        markdown.append(result.to_markdown(seconds))
    if len(names) > 1:
        console.print(
            _table("lab summary", ["experiment", "criterion", "seconds", "result"], verdicts)
        )
    mode = " --quick" if args.quick else ""
    seeds = f" --seeds {args.seeds}" if args.seeds is not None else ""
    label = "all" if "all" in chosen else "-".join(names)
    command = f"gradguard lab {' '.join(chosen)}{mode}{seeds} --out {args.out}"
    (out / f"{label}.md").write_text(
        f"<!-- generated by: {command} -->\n\n" + "\n\n".join(markdown) + "\n", encoding="utf-8"
    )
    console.print(f"results: {out}/ (JSON, markdown and figures)")
    return EXIT_OK if all(v[1] == "held" for v in verdicts) else EXIT_FAILURE


# The labs that take minutes and run on their own: (default seeds, what they write, whether
# their result is a pass/fail criterion or a benchmark whose table says where the defaults lose).
LONG_LABS = {
    "stability": (3, "stability.md (tables), stability-*.png, stability-runs.json", False),
    "transformer": (1, "transformer.md (tables), transformer-*.png, transformer-runs.json", True),
}


def _cmd_long_lab(name: str, args: argparse.Namespace) -> int:
    """A long lab (``gradguard lab stability`` or ``transformer``): run it, print its table,
    write its results to --out."""
    import importlib

    default_seeds, written, pass_fail = LONG_LABS[name]
    module = importlib.import_module(f"gradguard.app.lab.{name}")
    out = _out_dir(args.out)
    seeds = args.seeds if args.seeds is not None else default_seeds
    mode = " --quick" if args.quick else ""
    command = f"gradguard lab {name}{mode} --seeds {seeds} --out {args.out}"
    t0 = time.perf_counter()
    with _progress() as progress:
        result = module.run(
            seeds=seeds, quick=args.quick, out=out, ticker=RichTicker(progress), command=command
        )
    seconds = time.perf_counter() - t0
    console = _console()
    console.rule(escape(f"lab {name}: {result.title}"))
    console.print(f"[bold]setup[/bold]: {escape(result.setup)}")
    console.print(_table(f"{name} ({seconds:.1f} s)", result.columns, result.rows))
    console.print(escape(result.summary))
    console.print(f"results: {out}/{written}")
    return EXIT_OK if result.passed or not pass_fail else EXIT_FAILURE


# -- demo --------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from gradguard.app import demo

    if args.steps < 20:
        raise UsageError(
            f"--steps must be >= 20 (the poisoned batches need room), got {args.steps}"
        )
    out = _out_dir(args.out)
    console = _console()
    console.rule("gradguard demo")
    console.print(escape(demo.DESCRIPTION))
    with _progress() as progress:
        tickers = (RichTicker(progress), RichTicker(progress))
        result = demo.run(out=out, steps=args.steps, seed=args.seed, tickers=tickers)
    console.print(_table("unguarded vs guarded", demo.COLUMNS, result.table()))
    for line in result.notes():
        console.print(escape(line))
    console.print(f"records: {result.records_path}")
    console.print(f"report:  {result.report_path}")
    for bundle in result.bundles:
        console.print(f"incident bundle: {bundle}")
        console.print(
            escape(f"  why it happened: gradguard replay {bundle} --factory {result.factory}:make")
        )
    return EXIT_OK if result.guarded_ok else EXIT_FAILURE


# -- diagnose ----------------------------------------------------------------------------------


def load_factory(spec: str) -> Callable[[], Any]:
    """Import ``path/to/file.py:factory`` or ``package.module:factory`` and return the factory.

    Raises:
        UsageError: no ``:``, a missing file, an import that fails, a missing or non-callable
            attribute.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(
            f"expected FILE.py:FACTORY or package.module:FACTORY, got {spec!r} (no ':factory' part)"
        )
    if not attr.isidentifier():
        raise UsageError(f"factory name {attr!r} is not a Python identifier")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"file not found: {target}")
        mod_name = f"_gradguard_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"cannot import {target} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        # the user's file may import its neighbours, as `python file.py` would allow
        sys.path.insert(0, str(path.resolve().parent))
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise UsageError(f"importing {target} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise UsageError(f"cannot import module {target!r}: {e}") from e
        except Exception as e:
            raise UsageError(f"importing {target} raised {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        public = sorted(
            n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])
        )
        hint = f" (callables there: {', '.join(public[:10])})" if public else ""
        raise UsageError(f"{target} has no attribute {attr!r}{hint}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise UsageError(f"{target}:{attr} is a {type(factory).__name__}, not a callable factory")
    return factory  # type: ignore[no-any-return]


def call_factory(factory: Callable[[], Any], spec: str) -> tuple[Any, Any, Any]:
    """Call the user's factory; check it returned ``(model, batch)`` or ``(model, batch, loss_fn)``.

    Raises:
        UsageError: the factory raised or returned something else.
    """
    from torch import nn

    try:
        made = factory()
    except Exception as e:
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        raise UsageError(
            f"the factory {spec} raised {type(e).__name__}: {e}\n{''.join(tb[-3:])}"
        ) from e
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        raise UsageError(
            f"the factory {spec} must return (model, batch) or (model, batch, loss_fn), got "
            f"{type(made).__name__}"
            + (f" of length {len(made)}" if isinstance(made, (tuple, list)) else "")
        )
    model, batch = made[0], made[1]
    loss_fn = made[2] if len(made) == 3 else None
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"the factory {spec} returned a {type(model).__name__} as model, not a torch.nn.Module"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise UsageError(
            f"the factory {spec} returned a {type(loss_fn).__name__} as loss_fn, not a callable"
        )
    return model, batch, loss_fn


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from gradguard.insight.diagnose import diagnose
    from gradguard.report import build_report

    factory = load_factory(args.factory)
    model, batch, loss_fn = call_factory(factory, args.factory)
    console = _console()
    with console.status("diagnosing (measuring gains and trying each remedy on a copy)..."):
        try:
            diag = diagnose(model, batch, loss_fn, remedies=not args.no_remedies, seed=args.seed)
        except (TypeError, ValueError, RuntimeError, IndexError) as e:
            # the model does not run on the batch it came with: the factory's fault, not ours
            raise UsageError(
                f"cannot diagnose what {args.factory} returned: {type(e).__name__}: {e}"
            ) from e
    console.print(diag.summary(), markup=False)
    out = Path(args.out)
    rows = diag.to_rows()
    records = _write_jsonl(rows, out / "diagnosis.jsonl")
    report = build_report(
        rows, out / "diagnosis.html", title=f"gradguard diagnosis of {args.factory}"
    )
    console.print(f"records: {records}")
    console.print(f"report:  {report}")
    return EXIT_OK


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    from gradguard.records.sinks import JsonlSink

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    sink = JsonlSink(path)
    sink.write(rows)
    sink.close()
    return path


# -- replay ------------------------------------------------------------------------------------


def _cmd_replay(args: argparse.Namespace) -> int:
    from gradguard.insight.replay import NotReproducible, ReplayError, replay
    from gradguard.records.bundle import BundleError, load_bundle
    from gradguard.report.incident import build_incident_page

    if not Path(args.bundle).is_file():
        raise UsageError(f"bundle not found: {args.bundle}")
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        raise UsageError(str(e)) from e
    factory = load_factory(args.factory)
    try:
        made = factory()
    except Exception as e:
        raise UsageError(f"the factory {args.factory} raised {type(e).__name__}: {e}") from e
    console = _console()
    try:
        with console.status("replaying the step (per-sample, op trace, optimizer on a copy)..."):
            result = replay(bundle, lambda: made)
    except ReplayError as e:
        raise UsageError(str(e)) from e
    except NotReproducible as e:
        _console(stderr=True).print(f"[red]not reproducible:[/red] {escape(str(e))}")
        return EXIT_FAILURE
    console.print(f"[bold]{escape(result.kind)}[/bold]: {escape(result.summary)}")
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    if args.json:
        result.to_json(args.json)
        console.print(f"json: {args.json}")
    if args.html:
        console.print(f"page: {build_incident_page(result, args.html)}")
    return EXIT_OK


# -- report ------------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    from gradguard.records.sinks import read_jsonl
    from gradguard.report import build_report

    path = Path(args.records)
    if not path.is_file():
        raise UsageError(f"records file not found: {args.records}")
    try:
        rows = read_jsonl(path)  # checks each row's v, kind and step: the report trusts them
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"cannot read records: {e}") from e  # e names the file and line
    if not rows:
        raise UsageError(f"{args.records} holds no records")
    out = build_report(rows, args.output, title=args.title or f"gradguard report: {path.name}")
    _console().print(f"report: {out} ({len(rows)} records)")
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradguard`` (one subcommand per action)."""
    from gradguard.app.lab import EXPERIMENTS
    from gradguard.core.version import version

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Keep PyTorch training safe from exploding and vanishing gradients.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"gradguard {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a model that explodes, unguarded and guarded, side by side",
        description=(
            "Train the same deep MLP twice on the same data, once with plain SGD and once\n"
            "under gradguard.Guard, with a few poisoned batches injected; print a summary table\n"
            "and write the guarded run's records (JSONL) and an HTML report."
        ),
        epilog=EPILOG,
        formatter_class=fmt,
    )
    demo.add_argument(
        "--out", default="gradguard-report", help="output folder (default: %(default)s)"
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=300, help="training steps (default: %(default)s)"
    )
    demo.add_argument("--seed", type=_int, default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(func=_cmd_demo)

    lab = sub.add_parser(
        "lab",
        help="run the reproducible experiments (chain, vectors, remedies, rnn, spike, stability, "
        "transformer)",
        description=(
            "Small, seeded experiments, each printing its setup, its success criterion and a\n"
            "table, and writing figures, JSON and markdown to --out:\n"
            "  chain     20-layer one-neuron ReLU chain vs its closed form w^depth\n"
            "  vectors   element-wise products above/below 1 and rescaling by the norm\n"
            "  remedies  a diverging deep MLP trained once per remedy\n"
            "  rnn       tanh RNN on the adding problem, with and without clipping\n"
            "  spike     tiny transformer LM with poisoned batches, unguarded vs guarded\n"
            "  all       all of the above (--quick: a few minutes on 2 CPU cores)\n"
            "  stability the stability benchmark: every peer and gradguard on scenarios S1-S7\n"
            "            (run on its own; --quick about 5 minutes, full about 30, 2 cores)\n"
            "  transformer  tiny char-GPT LR sweep per transformer remedy, attention-logit\n"
            "            growth and early-warning lead times (run on its own; --quick minutes)"
        ),
        epilog=EPILOG,
        formatter_class=fmt,
    )
    lab.add_argument(
        "experiments",
        nargs="*",
        metavar="EXPERIMENT",
        choices=[*EXPERIMENTS, "all", "stability", "transformer"],
        help=f"one or more of {', '.join(EXPERIMENTS)}, all (default: all); or stability, "
        "or transformer",
    )
    lab.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="seeds per setting (default: each experiment's own)",
    )
    lab.add_argument("--quick", action="store_true", help="reduced sizes (minutes instead of tens)")
    lab.add_argument("--out", default="gradguard-lab", help="output folder (default: %(default)s)")
    lab.set_defaults(func=_cmd_lab)

    diagnose = sub.add_parser(
        "diagnose",
        help="diagnose a model's gradient flow at initialization and rank remedies",
        description=(
            "Diagnose exploding/vanishing gradients of YOUR model before training.\n\n"
            "FACTORY is path/to/file.py:factory or package.module:factory. WARNING: this imports\n"
            "that file or module and calls the factory, i.e. it RUNS THE USER'S CODE; only use it\n"
            "on code you trust. The factory takes no arguments and returns (model, batch) or\n"
            "(model, batch, loss_fn) with loss_fn(output, batch) -> scalar tensor.\n"
            "Prints the verdict, per-layer gains and remedies (each measured on a copy of the\n"
            "model) and writes diagnosis.jsonl and diagnosis.html to --out."
        ),
        epilog=EPILOG,
        formatter_class=fmt,
    )
    diagnose.add_argument(
        "factory", metavar="FACTORY", help="file.py:factory or package.module:factory"
    )
    diagnose.add_argument(
        "--out", default="gradguard-report", help="output folder (default: %(default)s)"
    )
    diagnose.add_argument(
        "--no-remedies", action="store_true", help="measure gains only, try no remedy"
    )
    diagnose.add_argument(
        "--seed", type=_int, default=0, help="seed of the remedies' re-initializations"
    )
    diagnose.set_defaults(func=_cmd_diagnose)

    rep = sub.add_parser(
        "replay",
        help="re-run the step of an incident bundle and say why it went wrong",
        description=(
            "Replay an incident bundle written by the guard and classify the incident:\n"
            "data (culprit rows named), transient (not reproducible), optimizer-state,\n"
            "model-state (weights already bad) or numerics (the op where NaN/inf was born).\n\n"
            "FACTORY is path/to/file.py:factory or package.module:factory, as for diagnose\n"
            "(it RUNS THE USER'S CODE): it returns the model, (model, batch) or\n"
            "(model, batch, loss_fn); the bundle's weights are loaded into that model.\n"
            "Exit codes: 0 classified; 1 the step cannot be reproduced at all (a different\n"
            "model); 2 bad input (missing, truncated or altered bundle, bad factory)."
        ),
        epilog=EPILOG,
        formatter_class=fmt,
    )
    rep.add_argument("bundle", metavar="BUNDLE", help="an incident-<step>.pt file")
    rep.add_argument("--factory", required=True, help="file.py:factory or package.module:factory")
    rep.add_argument("--json", default=None, metavar="OUT.json", help="write the result as JSON")
    rep.add_argument("--html", default=None, metavar="OUT.html", help="write the incident page")
    rep.set_defaults(func=_cmd_replay)

    report = sub.add_parser(
        "report",
        help="build the HTML report from the records (JSONL) of an earlier run",
        description="Build a self-contained HTML report from a JSONL records file (no model).",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    report.add_argument(
        "records", metavar="RECORDS.jsonl", help="records written by the JSONL sink"
    )
    report.add_argument(
        "-o", "--output", default="report.html", help="HTML file (default: %(default)s)"
    )
    report.add_argument("--title", default=None, help="page title")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage or bad input).

    Example:
        >>> main(["lab", "chain", "--out", "/tmp/lab"])
        0
    """
    try:
        import rich  # noqa: F401  (tables and progress bars)
    except ImportError:
        print(
            "gradguard's CLI needs rich and matplotlib: pip install 'gradguard[report]'",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except UsageError as e:
        # soft_wrap: one line however long (paths), so scripts can grep it
        _console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted")
        return EXIT_FAILURE
    return code
