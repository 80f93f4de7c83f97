"""Figures and the HTML report, built from records alone; the HTML checked in real Chromium."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import html
import json
import math
import os
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from gradguard.records.sinks import read_jsonl
from gradguard.report import build_report, write_figures
from gradguard.report.figures import clip_rate, gradient_flow, layer_heatmap, norm_timeline

EVIL = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# A run written by an earlier process: step rows with per-layer norms (one layer with a hostile
# name), a NaN step that was skipped, a spike, a rollback, and a preflight diagnosis.
WRITER = textwrap.dedent(
    """
    import json, math, random, sys
    import torch
    from torch import nn
    import gradguard

    torch.set_num_threads(1)

    def enc(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if v != v else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        return v

    random.seed(0)
    names = ["0.weight", EVIL, "4.weight"]
    rows = [{"v": 1, "kind": "meta", "step": 0, "run": "test " + EVIL}]
    for s in range(120):
        g = math.exp(random.gauss(0, 0.2)) * (40.0 if s == 60 else 1.0)
        if s == 90:
            g = math.nan
        clipped = g > 2.0
        action = "skip" if s == 90 else ("clip" if clipped else "step")
        layers = {n: g * (i + 1) for i, n in enumerate(names)}
        rows.append({"v": 1, "kind": "step", "step": s, "loss": 1.0 / (1 + s), "grad_norm": g,
                     "clipped_norm": min(g, 2.0) if g == g else g, "threshold": 2.0,
                     "clipped": clipped, "action": action, "lr": 0.1, "layers": layers})
    rows.append({"v": 1, "kind": "action", "step": 90, "action": "skip",
                 "reason": "non-finite gradient <img src=x onerror=alert(2)>"})
    rows.append({"v": 1, "kind": "action", "step": 100, "action": "rollback",
                 "reason": "loss spike"})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    rows += gradguard.diagnose(model, torch.randn(8, 4), steps=1).to_rows()
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(enc(r)) + "\\n")

    # A real guarded run through the JSONL sink, a NaN batch at step 25, then its diagnosis.
    from gradguard.guard.guard import Guard, GuardConfig
    from gradguard.decide.policies import FixedThreshold
    from gradguard.records.recorder import Recorder
    from gradguard.records.sinks import JsonlSink

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder([JsonlSink(sys.argv[2])], flush_every=10)
    guard = Guard(model, opt, config=GuardConfig(policy=FixedThreshold(1.0)), recorder=rec)
    for s in range(40):
        x = torch.randn(16, 4)
        y = x.sum(1, keepdim=True)
        if s == 25:
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    rec.close()
    diag = gradguard.diagnose(model, (torch.randn(16, 4), torch.randn(16, 1)), steps=1)
    sink = JsonlSink(sys.argv[2], append=True)
    sink.write(diag.to_rows(step=40))
    sink.close()
    """
).replace("EVIL", repr(EVIL))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("run")
    synthetic, guarded = folder / "run.jsonl", folder / "guarded.jsonl"
    cmd = [sys.executable, "-c", WRITER, str(synthetic), str(guarded)]
    subprocess.run(cmd, check=True, timeout=1200)  # hang guard only
    return synthetic, guarded


@pytest.fixture(scope="module")
def run_jsonl(runs: tuple[Path, Path]) -> Path:
    return runs[0]


def test_report_of_a_real_guarded_run_written_by_another_process(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    rows = read_jsonl(runs[1])
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 40 and all(isinstance(r.get("layers"), dict) for r in steps)
    skips = [r for r in rows if r["kind"] == "action" and r["action"] == "skip"]
    assert [r["step"] for r in skips] == [25]
    out = build_report(runs[1], tmp_path / "guarded.html")
    text = out.read_text(encoding="utf-8")
    assert text.count("<img ") == 4
    assert "Preflight diagnosis" in text and "Incidents" in text and "Farthest from 1" in text
    assert "<td>25</td>" in text  # the skipped step is listed among the incidents


@pytest.fixture(scope="module")
def report(run_jsonl: Path) -> Path:
    return build_report(run_jsonl, run_jsonl.parent / "out" / "report.html", title="test run")


def test_report_is_self_contained_and_escapes_every_name(report: Path, run_jsonl: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert text.count('<img src="data:image/png;base64,') == 4
    assert "<script" not in text.lower().replace("&lt;script", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(2)&gt;" in text
    for external in ("http://", "https://", 'src="/', "href="):
        assert external not in text
    rows = read_jsonl(run_jsonl)
    assert "EXPLODING" in text or "VANISHING" in text or "HEALTHY" in text
    assert "rollback" in text and "loss spike" in text
    assert 'first non-finite gradient at step</td><td class="t">90</td>' in text
    assert len(rows) > 120


def test_write_figures_from_records(tmp_path: Path, run_jsonl: Path) -> None:
    rows = read_jsonl(run_jsonl)
    paths = write_figures(rows, tmp_path / "figs")
    assert [p.name for p in paths] == [
        "norm_timeline.png",
        "clip_rate.png",
        "gradient_flow.png",
        "layer_heatmap.png",
    ]
    import matplotlib.image as mpimg

    for p in paths:
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 300
        assert img[..., :3].std() > 0.01  # not a blank canvas


def test_figures_need_only_the_rows_they_plot() -> None:
    steps = [
        {"v": 1, "kind": "step", "step": s, "grad_norm": 1.0 + s, "clipped": s % 2 == 0}
        for s in range(10)
    ]
    assert norm_timeline(steps) is not None and clip_rate(steps) is not None
    assert gradient_flow(steps) is None and layer_heatmap(steps) is None
    assert norm_timeline([]) is None
    diag = [
        {"v": 1, "kind": "diagnosis", "step": 0, "part": "layer", "index": i, "name": str(i),
         "grad_norm": 2.0**i, "act_rms": 1.0}
        for i in range(5)
    ]  # fmt: skip
    fig = gradient_flow(diag)
    assert fig is not None
    ys = fig.axes[0].lines[0].get_ydata()
    assert list(ys) == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_timeline_marks_actions_where_they_happened() -> None:
    rows = [{"v": 1, "kind": "step", "step": s, "grad_norm": 1.0} for s in range(20)]
    rows += [
        {"v": 1, "kind": "action", "step": 5, "action": "skip", "reason": "spike"},
        {"v": 1, "kind": "action", "step": 7, "action": "clip", "reason": "z"},
        {"v": 1, "kind": "action", "step": 12, "action": "rollback", "reason": "x"},
    ]
    fig = norm_timeline(rows)
    ax = fig.axes[0]
    labels = {t.get_label(): t for t in ax.collections}
    assert labels["skipped"].get_offsets()[:, 0].tolist() == [5.0]
    assert labels["clipped"].get_offsets()[:, 0].tolist() == [7.0]
    rollback = [ln for ln in ax.lines if ln.get_label() == "rollback"]
    assert rollback and rollback[0].get_xdata()[0] == 12


def test_heatmap_marks_nonfinite_cells_and_bins_long_runs() -> None:
    rows = [
        {"v": 1, "kind": "step", "step": s, "layers": {"a": 1.0, "b": math.inf if s == 3 else 10.0}}
        for s in range(900)
    ]
    fig = layer_heatmap(rows)
    images = fig.axes[0].images
    assert len(images) == 2  # the norms and the red non-finite overlay
    assert images[0].get_array().shape == (2, 400)
    assert float(images[0].get_array()[0].max()) == pytest.approx(0.0)


def test_build_report_validates(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="rows_or_jsonl_path"):
        build_report(42, tmp_path / "r.html")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rows\[0\] is not a record"):
        build_report([{"x": 1}], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(TypeError, match="rows must be a list"):
        write_figures("run.jsonl", tmp_path)  # type: ignore[arg-type]
    empty = build_report([], tmp_path / "empty.html")
    assert "No guard actions" in empty.read_text()


# ---- a real browser, driven over the Chrome DevTools protocol on a pipe (stdlib only) ----


class _Chrome:
    """Chromium with --remote-debugging-pipe: commands on fd 3, replies on fd 4, NUL-framed."""

    def __init__(self, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def wire() -> None:  # runs in the child: put the pipe ends on fds 3 and 4
            a = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1100,900",
            "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [CHROMIUM, *flags],
            preexec_fn=wire,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._res_r], [], [], left)
            if ready:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params: Any):
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._cmd_w)
        os.close(self._res_r)


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (make browser installs it)"
    chrome = _Chrome(tmp_path / "profile")
    try:
        target = chrome.send("Target.createTarget", url="about:blank")["targetId"]
        sid = chrome.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            chrome.send(f"{domain}.enable", sid)
        chrome.send("Page.navigate", sid, url=report.as_uri())
        chrome.wait_event("Page.loadEventFired", timeout=300)
        probe = (
            "JSON.stringify({imgs: [...document.images].map(i => [i.complete, i.naturalWidth]),"
            " scripts: document.scripts.length, text: document.body.innerText,"
            " height: document.documentElement.scrollHeight})"
        )
        res = chrome.send("Runtime.evaluate", sid, expression=probe, returnByValue=True)
        page = json.loads(res["result"]["value"])
        shot = chrome.send(
            "Page.captureScreenshot",
            sid,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1100, "height": page["height"], "scale": 1},
        )
    finally:
        chrome.close()
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    keep = os.environ.get("GRADGUARD_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    errors = [
        e
        for e in chrome.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (
            e.get("method") == "Runtime.consoleAPICalled"
            and e["params"]["type"] in ("error", "assert")
        )
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert errors == []
    assert len(page["imgs"]) == 4
    assert all(done and width > 0 for done, width in page["imgs"])
    assert page["scripts"] == 0  # the hostile names stayed text
    assert EVIL in page["text"]
    assert "<img src=x onerror=alert(2)>" in page["text"]


def test_report_explains_step_and_position_where_the_records_have_both(tmp_path: Path) -> None:
    from gradguard.report.html import STEP_VS_POSITION

    steps = [{"v": 1, "kind": "step", "step": s, "loss": 1.0, "action": "step"} for s in range(5)]
    rollback = {"v": 1, "kind": "action", "step": 4, "action": "rollback", "position": 7}
    explained = build_report([*steps, rollback], tmp_path / "r.html").read_text()
    assert "step-vs-position" in explained
    assert html.escape(STEP_VS_POSITION, quote=True) in explained
    assert "rollback" in STEP_VS_POSITION and "batch" in STEP_VS_POSITION
    plain = build_report([*steps, {**rollback, "position": None}], tmp_path / "p.html")
    assert "step-vs-position" in plain.read_text()  # the column is there, so is the note
    del rollback["position"]
    assert (
        "step-vs-position" not in build_report([*steps, rollback], tmp_path / "n.html").read_text()
    )


def test_report_command_refuses_a_bad_step_with_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradguard.app.cli import main

    path = tmp_path / "run.jsonl"
    good = {"v": 1, "kind": "step", "step": 0, "loss": 1.0}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "step": "x"}) + "\n")
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "'step' must be an integer" in err[0]
    assert "Traceback" not in err[0] and not (tmp_path / "r.html").exists()
    with pytest.raises(ValueError, match=r"rows\[1\]\['step'\] must be an integer"):
        build_report([good, {**good, "step": "x"}], tmp_path / "r.html")
