"""The documentation: every code block runs, and every public name has an API reference entry.

How blocks are found and marked is in tests/_docs.py. The site itself is built by
``make docs`` (``mkdocs build --strict``), which ``make test`` runs.
"""

from __future__ import annotations

import gc
import re
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from tests._docs import DOCS, ROOT, Block, blocks, pages
from tests._wandb import offline_env

# Named examples that a dedicated test runs and checks; tests/test_docs.py leaves them to it.
TESTED_ELSEWHERE = {
    ("amp.md", "fp16"): "test_amp.py",
    ("amp.md", "bf16"): "test_amp.py",
    ("integrations.md", "lightning"): "test_integration_lightning.py",
    ("integrations.md", "transformers"): "test_integration_hf.py",
}


class Batch(NamedTuple):
    """A batch that unpacks (``for x, y in loader``) and has fields (``batch.x``)."""

    x: torch.Tensor
    y: torch.Tensor


def _mlp(width: int = 16, depth: int = 10) -> torch.nn.Sequential:
    """Deep enough for every remedy the docs show (``truncate(model, 8)`` keeps 8 blocks)."""
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, width), torch.nn.ReLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def fixture_namespace(folder: Path) -> dict[str, Any]:
    """The names the docs' snippets take as given: a small model, its optimizer, data."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

    import gradguard
    from gradguard.records.recorder import Recorder
    from gradguard.records.sinks import JsonlSink

    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    batches = [Batch(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(12)]
    loss_fn = torch.nn.functional.mse_loss
    x, y = batches[0]
    ds = TensorDataset(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]))
    # a run.jsonl in the working folder, for the snippets that read one
    rec = Recorder([JsonlSink(folder / "run.jsonl")])
    other = _mlp()
    other_opt = torch.optim.SGD(other.parameters(), lr=0.01)
    guard = gradguard.Guard(other, other_opt, recorder=rec)
    for b in batches[:6]:
        loss = loss_fn(other(b.x), b.y)
        loss.backward()
        guard.step(loss)
        other_opt.zero_grad(set_to_none=True)
    rec.close()
    loss = loss_fn(model(x), y)
    return {
        "__name__": "__docs__",
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": None,
        "loader": batches,
        "dataset_batches": batches,
        "loss_fn": loss_fn,
        "compute_loss": lambda model, batch: loss_fn(model(batch.x), batch.y),
        "x": x,
        "y": y,
        "x_batch": x,
        "batch": (x, y),
        "loss": loss,
        "norms": [float(v) for v in torch.rand(50) * 3],
        "ds": ds,
        "sampler": SequentialSampler(ds),
        "DataLoader": DataLoader,
        "BatchSampler": BatchSampler,
    }


def _runnable(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.skip is None and (page, b.example) not in TESTED_ELSEWHERE]


# Pages whose blocks fail today, on pages this test's author does not own; strict: the test
# fails as soon as a page works, so the entry goes when its page is fixed.
KNOWN_BROKEN: dict[str, str] = {}

PAGES_WITH_CODE = [
    pytest.param(p, marks=pytest.mark.xfail(reason=KNOWN_BROKEN[p], strict=True))
    if p in KNOWN_BROKEN
    else p
    for p in pages()
    if blocks(p)
]


# MLflow 3.17's sqlite store queries with SQLAlchemy's ``noload``, which SQLAlchemy 2.1
# deprecates (records.md shows MlflowSink on sqlite); MLflow's to fix, not gradguard's.
@pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:sqlalchemy.exc.SADeprecationWarning"
)
@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_every_code_block_runs(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page's blocks, in order, in one namespace, in a fresh working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # W&B offline, its config and caches in the test's folder: nothing leaves the machine
    offline_env(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage otherwise
    todo = _runnable(page)
    shell = [b.where for b in todo if b.lang != "python" and b.lang != "py"]
    assert not shell, f"shell blocks need a dedicated test or a skip marker: {shell}"
    if not todo:
        # Every block is marked with its reason or run by the test TESTED_ELSEWHERE names
        # (test_markers_are_complete checks those): nothing left to run.
        assert blocks(page), page
        return
    scope = fixture_namespace(tmp_path)
    failure = None
    for block in todo:
        try:
            exec(compile(block.code, block.where, "exec"), scope)
        except Exception as e:
            # kept as text: the traceback would keep the page's objects (open files) alive
            failure = f"{block.where} failed:\n" + "".join(traceback.format_exception(e))
            break
    capsys.readouterr()
    scope.clear()
    # A file a snippet left open warns (an error here) in this page's test, not a later one.
    gc.collect()
    if failure:
        pytest.fail(failure)


def test_markers_are_complete() -> None:
    """A skip says why; a named example a test claims exists, and that test names it."""
    for page in pages():
        for b in blocks(page):
            assert b.skip is None or len(b.skip) >= 10, f"{b.where}: say why it cannot run"
    for (page, name), test in TESTED_ELSEWHERE.items():
        assert [b for b in blocks(page) if b.example == name], f"docs/{page}: no example {name}"
        text = (ROOT / "tests" / test).read_text(encoding="utf-8")
        assert page in text and f'"{name}"' in text, f"tests/{test} does not run {page}:{name}"


def test_marker_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests._docs as d

    monkeypatch.setattr(d, "DOCS", tmp_path)
    (tmp_path / "p.md").write_text(
        "# t\n\n```python\na = 1\n```\n\n```text\noutput\n```\n\n"
        "<!-- docs-test: skip needs four processes -->\n\n```bash\ntorchrun x\n```\n\n"
        "<!-- example: one -->\n```python\nb = 2\n```\n"
    )
    got = [(b.lang, b.line, b.example, b.skip, b.code) for b in d.blocks("p.md")]
    assert got == [
        ("python", 3, None, None, "a = 1\n"),
        ("bash", 13, None, "needs four processes", "torchrun x\n"),
        ("python", 18, "one", None, "b = 2\n"),
    ]
    assert d.code_block("p.md", "one") == "b = 2\n"
    (tmp_path / "q.md").write_text("<!-- docs-test: run -->\n```python\n1\n```\n")
    with pytest.raises(ValueError, match="unknown marker"):
        d.blocks("q.md")


def _public_names() -> list[str]:
    import gradguard

    return sorted(
        n
        for n, v in vars(gradguard).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith("gradguard")
    )


def test_every_public_name_has_an_api_reference_entry() -> None:
    """``::: gradguard.NAME`` (or the module it lives in) on one of the docs/api pages."""
    import gradguard

    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)\s*$", text, re.M))
    missing = []
    for name in _public_names():
        obj = getattr(gradguard, name)
        paths = {f"gradguard.{name}", f"{obj.__module__}.{name}"}
        if not paths & documented:
            missing.append(name)
    assert not missing, f"public names without an API reference entry: {missing}"
    for module in ("insight.remedies", "report"):  # public submodules, documented as such
        assert any(d == f"gradguard.{module}" or d.startswith(f"gradguard.{module}.")
                   for d in documented)  # fmt: skip
    for integration in ("lightning", "transformers"):
        assert f"gradguard.integrations.{integration}" in documented


def _griffe_extension() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_griffe_gradguard", DOCS / "_griffe_gradguard.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_reads_our_docstring_dialect() -> None:
    """The griffe extension mkdocs.yml loads: what it rewrites, and what it leaves alone."""
    ext = _griffe_extension()
    doc = (
        "Do it.\n\nArgs:\n    a, b: the pair,\n        continued.\n    *args, **kwargs: the rest.\n"
        "    c (int): one.\n\nReturns:\n    x, y: not parameters.\n\nExample:\n"
        "    >>> f(:class:`~gradguard.guard.guard.Guard`)\n"
    )
    out = ext.rewrite(doc)
    assert "    a: the pair,\n        continued.\n    b: the pair,\n        continued.\n" in out
    assert "    *args: the rest.\n    **kwargs: the rest.\n    c (int): one.\n" in out
    assert "    x, y: not parameters." in out  # only Args sections are split
    assert "\nExamples:\n" in out and "\nExample:\n" not in out
    assert (
        '<autoref identifier="gradguard.guard.guard.Guard" optional><code>Guard</code></autoref>'
        in out
    )


# Modules whose public docstrings do not yet say everything the API reference should (args,
# returns, raises, an example). Remove a module from here when it is complete; the test below
# fails until then, and again if a listed one is done.
NOT_YET_COMPLETE = {
    "src/gradguard/core/agc.py",
    "src/gradguard/core/buffer.py",
    "src/gradguard/core/clip.py",
    "src/gradguard/core/norms.py",
    "src/gradguard/core/snapshot.py",
    "src/gradguard/decide/detect.py",
    "src/gradguard/decide/policies.py",
    "src/gradguard/guard/guard.py",
    "src/gradguard/guard/incident.py",
    "src/gradguard/guard/response.py",
    "src/gradguard/guard/rollback.py",
    "src/gradguard/insight/probe.py",
    "src/gradguard/insight/replay.py",
    "src/gradguard/insight/trace.py",
    "src/gradguard/records/bundle.py",
}


def test_public_docstrings_say_what_the_api_reference_needs() -> None:
    pytest.importorskip("griffe")
    from tests._docstrings import problems

    found = problems()
    news = {f: p for f, p in found.items() if f not in NOT_YET_COMPLETE}
    assert not news, "incomplete public docstrings:\n" + "\n".join(
        f"{f}:\n  " + "\n  ".join(p) for f, p in news.items()
    )
    done = sorted(NOT_YET_COMPLETE - found.keys())
    assert not done, f"complete now, remove from NOT_YET_COMPLETE: {done}"
