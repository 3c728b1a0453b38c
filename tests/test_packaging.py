"""What ``pip install .`` gets: ``python -m build`` makes an sdist and, from it, a wheel;
the wheel carries the page (static/ as app/static/), and installed into a fresh venv,
its ``runcast serve`` serves the page from the installed package.

The build runs without isolation (pyproject's dev extras bring ``build`` and the
setuptools that [build-system] asks for) and the fresh venv borrows this environment's
site-packages for the dependencies, so nothing is downloaded.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import app.transport.app as app_module

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"
STARTUP_TIMEOUT_S = 30.0
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


@dataclass
class Dist:
    sdist: Path
    wheel: Path


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """``python -m build``: the sdist, then the wheel built from the unpacked sdist."""
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=out)
    return Dist(
        sdist=out / f"runcast-{VERSION}.tar.gz",
        wheel=out / f"runcast-{VERSION}-py3-none-any.whl",
    )


def _page_files() -> set[str]:
    static = ROOT / "static"
    return {
        path.relative_to(static).as_posix()
        for path in static.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    }


@pytest.mark.timeout(300)
def test_the_wheel_carries_the_page_and_the_license(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
    page = {name.removeprefix("app/static/") for name in names if name.startswith("app/static/")}
    assert page == _page_files()
    assert {"app/static/index.html", "app/static/runcast.js"} <= names
    assert f"runcast-{VERSION}.dist-info/licenses/LICENSE" in names
    assert "app/transport/app.py" in names
    assert not any(name.startswith(("tests/", "docs/", "static/")) for name in names)


@pytest.mark.timeout(300)
def test_the_sdist_carries_the_sources_docs_and_tests(dist: Dist) -> None:
    prefix = f"runcast-{VERSION}/"
    with tarfile.open(dist.sdist) as sdist:
        names = {name.removeprefix(prefix) for name in sdist.getnames()}
    assert {
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "MANIFEST.in",
        "app/transport/app.py",
        "docs/protocol.md",
        "docs/operations.md",
        "tests/conftest.py",
        "tests/test_packaging.py",
    } <= names
    assert {f"static/{name}" for name in _page_files()} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def _fresh_venv(where: Path) -> Path:
    """A venv whose only runcast is the one installed into it; the dependencies come
    from this environment's site-packages (a path line, so its .pth files, an editable
    runcast's among them, are not run)."""
    _run(sys.executable, "-m", "venv", "--without-pip", where, cwd=where.parent)
    python = where / "bin" / "python"
    purelib = Path(
        _run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=where
        ).strip()
    )
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (purelib / "runcast-test-deps.pth").write_text("\n".join(sorted(ours)) + "\n", encoding="utf-8")
    return python


@dataclass
class Served:
    process: subprocess.Popen[str]
    url: str
    output: list[str]


@pytest.fixture
def installed_server(dist: Dist, tmp_path: Path) -> Iterator[Served]:
    python = _fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        dist.wheel,
        cwd=tmp_path,
        env=env,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed package finds its page inside itself, not in this source tree.
    static_dir = _run(
        python,
        "-c",
        "from app.transport.app import STATIC_DIR; print(STATIC_DIR)",
        cwd=elsewhere,
        env=env,
    ).strip()
    assert Path(static_dir).is_relative_to(tmp_path / "venv"), static_dir

    process = subprocess.Popen(
        [
            tmp_path / "venv" / "bin" / "runcast",
            "serve",
            "--port",
            "0",
            "--db",
            tmp_path / "runcast.db",
        ],
        cwd=elsewhere,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def drain() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=drain, name="installed server output", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        port = None
        while port is None and (remaining_s := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=remaining_s)
            except queue.Empty:
                break
            if line is None:
                break
            if match := _LISTENING.search(line):
                port = int(match.group(1))
        assert port is not None, "the installed server did not start:\n" + "".join(output)
        yield Served(process, f"http://127.0.0.1:{port}", output)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.timeout(300)
def test_the_installed_wheel_serves_the_page(dist: Dist, installed_server: Served) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        index = wheel.read("app/static/index.html")
        client_js = wheel.read("app/static/runcast.js")
    with httpx.Client(base_url=installed_server.url, timeout=10) as client:
        page = client.get("/")
        script = client.get("/runcast.js")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.content == index
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert script.content == client_js


def test_the_page_is_found_in_the_package_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "static").mkdir()
    monkeypatch.setattr(app_module.importlib.resources, "files", lambda package: tmp_path)
    assert app_module._find_static_dir() == tmp_path / "static"


def test_the_page_is_found_in_the_source_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A package without app/static/ (an editable install, a checkout) serves static/.
    monkeypatch.setattr(app_module.importlib.resources, "files", lambda package: tmp_path)
    assert app_module._find_static_dir() == ROOT / "static"
    assert (app_module.STATIC_DIR / "index.html").is_file()


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_ci_runs_the_readme_test_command_and_checks() -> None:
    section = _readme_section("Run the tests")
    [command, checks] = re.findall(r"```sh\n(.*?)\n```", section, flags=re.DOTALL)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    [line] = [line for line in ci.splitlines() if line.startswith("python3 -m venv")]
    assert line == f"{command} || status=$?"
    [listed] = re.findall(r"^for check in (.*); do$", ci, flags=re.MULTILINE)
    assert re.findall(r'"([^"]*)"', listed) == checks.split(" && ")
