"""The installable product: a wheel built from the checkout serves the app from any folder, no checkout needed.

The wheel is built from a clean copy of the tracked files (a stale build/ folder cannot leak old modules in),
installed with --no-deps into a fresh venv outside the checkout, and started as a user starts it: `attnviz` in an
empty folder. The venv reaches the test environment's dependencies (torch, streamlit ...) through a path entry,
so nothing is downloaded; attnviz itself comes only from the wheel (checked). Then Chromium opens the default
page: a chart is drawn, no exception, no error box, and the packaged server settings are in force.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

import attnviz

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def _tracked_copy(destination: Path) -> Path:
    """The checkout's tracked files (what a fresh clone has), copied to ``destination``."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [name for name in listed.decode().split("\0") if name]
    else:  # an sdist or a copy without git: everything but build outputs
        skip = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)
        ]
    for name in files:
        source = ROOT / name
        if source.is_symlink() or not source.is_file():
            continue  # the checkout's .streamlit/config.toml is a link to the packaged file
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = _tracked_copy(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", "-w", str(dist), "."],
        cwd=source,
        check=True,
    )
    (built,) = dist.glob("attnviz-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies, as plain path entries after the venv's own site-packages: the .pth files of the outer
    # environment (an editable attnviz among them) are not processed, so only the wheel's attnviz is importable.
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "_outer_dependencies.pth").write_text("\n".join(outer) + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", wheel],
        check=True,
    )
    return venv


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(venv: Path, folder: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [str(venv / "bin" / "attnviz"), "--server.headless=true", f"--server.port={port}"]
    proc = subprocess.Popen(
        [*command, "--server.address=127.0.0.1"],
        cwd=folder,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("attnviz exited:\n" + proc.stdout.read().decode(errors="replace"))
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("attnviz did not become healthy within 120 s:\n" + proc.stdout.read().decode(errors="replace"))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _upload_without_xsrf_token(url: str) -> int:
    request = urllib.request.Request(url + "/_stcore/upload_file/some-session/some-file", data=b"x", method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_wheel_holds_the_app(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "attnviz/app/main.py",
        "attnviz/app/cli.py",
        "attnviz/app/config.toml",
        "attnviz/__main__.py",
        *(f"attnviz/app/page_scripts/{script}" for script in os.listdir(ROOT / "attnviz" / "app" / "page_scripts")),
    ):
        assert needed in names, needed
    assert not any(name.startswith(("tests/", "app.py", "scripts/")) for name in names)
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "attnviz = attnviz.app.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_package_is_the_wheel_not_the_checkout(venv, tmp_path):
    code = "import attnviz, attnviz.app.main as m; print(attnviz.__file__); print(m.PAGE_SCRIPTS)"
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        assert Path(line).resolve().is_relative_to(venv.resolve()), line
    for command in (["attnviz", "--version"], ["python", "-m", "attnviz", "--version"]):
        out = subprocess.run(
            [str(venv / "bin" / command[0]), *command[1:]], cwd=tmp_path, env=_clean_env(), capture_output=True
        )
        assert out.stdout.decode().strip() == f"attnviz {attnviz.__version__}", out


def test_attnviz_in_an_empty_folder_serves_the_default_page(venv, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    folder = tmp_path / "empty"
    folder.mkdir()
    proc, url = _start(venv, folder)
    try:
        assert _upload_without_xsrf_token(url) == 403  # the packaged settings are in force (XSRF protection)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                expect = sync_api.expect
                expect(page.get_by_role("heading", name="Playground")).to_be_visible(timeout=120_000)
                expect(page.locator(".js-plotly-plot .heatmaplayer image").first).to_be_visible(timeout=120_000)
                page.wait_for_function(
                    "() => !document.querySelector(\"[data-testid='stStatusWidget']\")", timeout=120_000
                )
                expect(page.locator("[data-testid='stException']")).to_have_count(0)
                expect(page.locator("[data-testid='stAlertContentError']")).to_have_count(0)
                # toolbarMode = "viewer": a reader gets no Deploy button
                expect(page.get_by_role("button", name="Deploy")).to_have_count(0)
            finally:
                browser.close()
    finally:
        _stop(proc)
    assert folder.exists() and not any(folder.iterdir()), "attnviz wrote into the folder it was started from"


def test_a_config_file_in_the_folder_cannot_turn_the_protections_off(venv, tmp_path):
    folder = tmp_path / "project"
    (folder / ".streamlit").mkdir(parents=True)
    (folder / ".streamlit" / "config.toml").write_text("[server]\nenableXsrfProtection = false\n")
    proc, url = _start(venv, folder)
    try:
        assert _upload_without_xsrf_token(url) == 403
    finally:
        _stop(proc)
