"""The release artifacts: an sdist and a wheel that twine accepts, and a wheel that works installed.

Nothing is downloaded. The build runs without isolation (with the setuptools of this
environment), the wheel is installed with ``--no-deps --no-index`` into a fresh virtual
environment, and that environment finds gradguard's dependencies (torch, numpy, rich,
matplotlib) in this one through a ``.pth`` line: a path line in a ``.pth`` file only appends a
folder to ``sys.path``, it does not run that folder's own ``.pth`` files, so the editable
install of this checkout stays out of sight and the fresh environment's ``gradguard`` is the
installed wheel (the test checks that it is).
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import gradguard

ROOT = Path(__file__).resolve().parent.parent
# Hang guards only: a build and an install take seconds to a minute on a busy machine.
TIMEOUT = 900

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _checkout_copy(dest: Path) -> Path:
    """The files a fresh clone has (git's tracked files; the working tree's version of each).

    The build runs there, not in the checkout: setuptools writes ``*.egg-info`` next to the
    sources, and two test workers building in one tree would race.
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        files = [f for f in listed.split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: take the tree
        skip = {".git", ".venv", "build", "dist", "__pycache__", "site"}
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.parts)
        ]  # fmt: skip
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of this checkout: sdist, then the wheel built from the sdist."""
    src = _checkout_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], src)
    return out


def _one(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


def test_version_is_written_once_and_the_wheel_carries_it(dist: Path) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "gradguard.__version__"
    }
    wheel = _one(dist, "gradguard-*.whl")
    assert wheel.name.startswith(f"gradguard-{gradguard.__version__}-py3-none-any")
    sdist = _one(dist, "gradguard-*.tar.gz")
    assert sdist.name == f"gradguard-{gradguard.__version__}.tar.gz"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(
            z.read(f"gradguard-{gradguard.__version__}.dist-info/METADATA")
        )
    assert meta["Version"] == gradguard.__version__
    assert {"gradguard/py.typed", "gradguard/report/template.html"} <= names
    assert not any(n.startswith("tests/") for n in names)
    urls = dict(v.split(", ", 1) for v in meta.get_all("Project-URL") or [])
    assert {"Documentation", "Source", "Changelog"} <= urls.keys()
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"wandb", "mlflow", "all", "docs", "report"} <= extras
    assert "Typing :: Typed" in (meta.get_all("Classifier") or [])
    # the license travels with both artifacts (PEP 639: License-Expression and License-File)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert f"gradguard-{gradguard.__version__}.dist-info/licenses/LICENSE" in names
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    assert {
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "src/gradguard/report/template.html",
    } <= members


def test_twine_accepts_both(dist: Path) -> None:
    out = _run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())], ROOT
    )
    assert out.count("PASSED") == 2, out


def test_installed_wheel_runs_the_demo_and_the_lab(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    wheel = _one(dist, "gradguard-*.whl")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)
    # gradguard's dependencies from this environment, appended after the fresh site-packages
    fresh = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                      tmp_path).strip())  # fmt: skip
    (fresh / "gradguard-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    where = _run(
        [str(py), "-c", "import gradguard, importlib.metadata as m; "
         "print(gradguard.__file__); print(m.version('gradguard'))"],
        tmp_path, env,
    ).split()  # fmt: skip
    assert Path(where[0]).is_relative_to(fresh), where  # the wheel, not this checkout
    assert where[1] == gradguard.__version__
    cli = venv / "bin" / "gradguard"
    assert f"gradguard {gradguard.__version__}" in _run([str(cli), "--version"], tmp_path, env)
    _run([str(cli), "demo", "--steps", "50", "--out", str(tmp_path / "demo")], tmp_path, env)
    assert (tmp_path / "demo" / "report.html").stat().st_size > 0
    assert (tmp_path / "demo" / "records.jsonl").stat().st_size > 0
    _run([str(cli), "lab", "chain", "--out", str(tmp_path / "lab")], tmp_path, env)
    assert any((tmp_path / "lab").iterdir())
