"""Headless Chromium from the system packages (.ci/run installs it), as the browser tests drive it, and the
MLflow UI server they open."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

from .conftest import PROJECT_ROOT

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000",
]  # fmt: skip
OFFLINE_FLAGS = [  # every request goes to a proxy that does not exist and no host name resolves; file:// loads
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def chromium(profile: Path, *args: str) -> str:
    """Run headless Chromium with a fresh profile folder; its stdout (e.g. the DOM with ``--dump-dom URL``)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is not installed (apt-get install chromium; .ci/run does this)"
    cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


class _Grid(HTMLParser):
    """The rows of the ag-grid tables of a page: row id -> column id -> the cell's text."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self._open: list[tuple[str | None, str | None]] = []  # per open element: the row, the cell it opens
        self._row: str | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            return
        a = dict(attrs)
        row = a.get("row-id") if a.get("role") == "row" else None
        cell = a.get("col-id") if a.get("role") == "gridcell" and self._row else None
        self._open.append((row, cell))
        self._row = row or self._row
        if cell:
            self._cell = cell
            self.rows.setdefault(self._row, {})[cell] = ""  # type: ignore[index]

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID or not self._open:
            return
        row, cell = self._open.pop()
        self._row = None if row else self._row
        self._cell = None if cell else self._cell

    def handle_data(self, data: str) -> None:
        if self._row and self._cell:
            self.rows[self._row][self._cell] += data


def grid_rows(dom: str) -> dict[str, dict[str, str]]:
    """The rows of the tables (ag-grid) of a dumped page: row id (an MLflow run id) -> column id -> text;
    a row's pinned and scrolling parts merged."""
    grid = _Grid()
    grid.feed(dom)
    return {row: {col: text.strip() for col, text in cells.items()} for row, cells in grid.rows.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_ui(backend_store_uri: str, cwd: Path) -> Iterator[str]:
    """`make ui`'s server (MLflow with the project's app, stages/lib/tracking/mlflow_ui.py) on a free port, as
    long as the block runs; yields its address."""
    from stages.lib.tracking.mlflow_ui import APP_NAME

    port = _free_port()
    # one server worker (the default is 4) and no job runner (MLflow 3 starts 8 more processes for its GenAI
    # jobs, each importing MLflow): the suite's two cores are busy
    cmd = [str(Path(sys.executable).with_name("mlflow")), "ui", "--app-name", APP_NAME,
           "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONPATH": path}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert proc.poll() is None, f"{' '.join(cmd)} exited with {proc.returncode}"
                time.sleep(1)
        else:
            raise AssertionError("mlflow ui did not answer /health within 120 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a read-only server: nothing to shut down cleanly
        proc.wait(timeout=30)
