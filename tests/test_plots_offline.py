"""`dvc plots show` draws every curve with no network: the project's plots.html_template inlines vega, vega-lite
and vega-embed (.dvc/plots/offline.html, built by stages/lib/tracking/plots_template.py). Rendered in headless Chromium
whose every network request fails."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.browser import OFFLINE_FLAGS, chromium
from tests.conftest import PROJECT_ROOT

DVC = Path(__import__("sys").executable).with_name("dvc")
DVC_YAML = """stages:
  train:
    cmd: python -c 'print()'
    plots:
      - reports/train/loss.csv:
          cache: false
          x: step
          y: loss
      - reports/lora/r4/loss.csv:
          cache: false
          x: step
          y: loss
"""


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run([str(DVC), *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def plots_repo(tmp_path: Path) -> Path:
    """A git+DVC repo with two loss curves, using the project's plots template the way .dvc/config names it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    for path in ("reports/train/loss.csv", "reports/lora/r4/loss.csv"):
        (repo / path).parent.mkdir(parents=True)
        (repo / path).write_text("step,loss\n" + "".join(f"{s},{1 / (s + 1):.4f}\n" for s in range(20)))
    return repo


def plot_divs(repo: Path, profile: Path) -> tuple[int, int, str]:
    """(plots on the page, plots drawn: an <svg> or <canvas> of vega marks, the rendered DOM) of `dvc plots show`."""
    dvc(repo, "plots", "show")
    page = repo / "dvc_plots" / "index.html"
    plots = len(re.findall(r"vegaEmbed\('#", page.read_text()))
    dom = chromium(profile, *OFFLINE_FLAGS, "--dump-dom", page.as_uri())
    return plots, len(re.findall(r'<(?:svg|canvas)\b[^>]*class="marks"', dom)), dom


@pytest.mark.slow
def test_dvc_plots_show_draws_every_curve_offline(plots_repo: Path, tmp_path: Path) -> None:
    # without the template: DVC's CDN scripts cannot load, no curve is drawn (the network is really off)
    divs, drawn, dom = plot_divs(plots_repo, tmp_path / "p1")
    assert (divs, drawn) == (2, 0), dom[-3000:]
    template = dvc(PROJECT_ROOT, "config", "plots.html_template").strip()
    assert template == "plots/offline.html"
    dvc(plots_repo, "config", "plots.html_template", str(PROJECT_ROOT / ".dvc" / template))
    divs, drawn, dom = plot_divs(plots_repo, tmp_path / "p2")
    assert (divs, drawn) == (2, 2), dom[-3000:]
    html = (plots_repo / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in html and "http://" not in re.sub(
        r"<script>.*?</script>", "", html, flags=re.S
    )


def test_dvc_plots_is_git_ignored() -> None:
    done = subprocess.run(
        ["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=PROJECT_ROOT, capture_output=True
    )
    assert done.returncode == 0, "dvc_plots/ (written by dvc plots show) must be git-ignored"


def test_the_template_inlines_the_vega_versions_dvc_asks_for() -> None:
    from dvc_render.vega import VegaRenderer

    wanted = re.findall(r"npm/(vega(?:-lite|-embed)?)@([\d.]+)", VegaRenderer.SCRIPTS)
    html = (PROJECT_ROOT / ".dvc" / "plots" / "offline.html").read_text()
    assert re.findall(r"<!-- (vega(?:-lite|-embed)?)@([\d.]+) \(npm\)", html) == wanted
    assert "{plot_divs}" in html and "{scripts}" not in html  # no CDN tags added by DVC


def fake_package(folder: Path, name: str, build: str) -> Path:
    import io
    import json
    import tarfile

    path = folder / f"{name}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        files = {"package.json": json.dumps({"name": name, "version": "1.0.0"}), "LICENSE": "BSD -- x"}
        for member, text in {**files, f"build/{name}.min.js": build}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_template_builder_orders_and_escapes_the_scripts(tmp_path: Path) -> None:
    from stages.lib.tracking.plots_template import build_template

    names = ["vega-embed", "vega-lite", "vega"]  # given in any order
    tarballs = [fake_package(tmp_path, n, f"var {n.replace('-', '_')} = '</script>';") for n in names]
    html = build_template(tarballs)
    positions = [html.index(f"var {n} =") for n in ("vega", "vega_lite", "vega_embed")]
    assert positions == sorted(positions)  # vega-embed needs the other two loaded first
    assert "'<\\/script>'" in html and "BSD - - x" in html and "{plot_divs}" in html
    with pytest.raises(SystemExit, match="no npm tarball for vega-embed"):
        build_template(tarballs[1:])
    (tmp_path / "bad").mkdir()
    bad = fake_package(tmp_path / "bad", "vega", "x = '{plot_divs}'")
    with pytest.raises(ValueError, match="the build contains DVC's placeholder"):
        build_template([bad, *tarballs[:2]])
