"""Headless Chromium from the system packages (.ci/run installs it), as the browser tests drive it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
