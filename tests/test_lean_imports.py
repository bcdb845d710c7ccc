"""Stage processes defer bitsandbytes and scipy.stats (stages/lib/runtime/lean_imports.py): diffusers and peft
import bitsandbytes whenever it is installed, for quantized checkpoints no stage loads, and diffusers' schedulers
import scipy.stats for a sigma schedule the stages do not use. A stand-in bitsandbytes package that records when its code
runs is installed: importing diffusers' pipeline, models and peft through the ``stages`` package leaves its code
unrun until first use, while plain Python runs it at the libraries' import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

PROBE = """
import json, sys
if sys.argv[1] == "stages":
    import stages  # noqa: F401
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
import diffusers.quantizers.bitsandbytes.utils  # noqa: F401
import peft.helpers  # noqa: F401
from diffusers.utils import is_bitsandbytes_available
report = {"found": "bitsandbytes" in sys.modules, "ran_at_import": hasattr(sys, "fake_bitsandbytes_ran"),
          "available": is_bitsandbytes_available()}
import bitsandbytes
report["version_on_use"] = bitsandbytes.__version__
report["ran_on_use"] = hasattr(sys, "fake_bitsandbytes_ran")
report["scipy_stats_ran_at_import"] = "norm" in vars(sys.modules["scipy.stats"])
import scipy.stats
report["scipy_stats_on_use"] = float(scipy.stats.norm.cdf(0.0))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fake_bitsandbytes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding an installed-looking ``bitsandbytes`` (package plus dist-info) that marks ``sys`` when run."""
    site = tmp_path_factory.mktemp("fake_site")
    (site / "bitsandbytes").mkdir()
    (site / "bitsandbytes" / "__init__.py").write_text(
        'import sys\nsys.fake_bitsandbytes_ran = True\n__version__ = "0.50.2"\n'
    )
    (site / "bitsandbytes" / "sub.py").write_text(
        "import sys\nsaw_package_run = hasattr(sys, 'fake_bitsandbytes_ran')\n"
    )
    dist = site / "bitsandbytes-0.50.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n")
    (dist / "top_level.txt").write_text("bitsandbytes\n")
    (dist / "RECORD").write_text("bitsandbytes/__init__.py,,\n")
    return site


def probe(site: Path, mode: str, code: str = PROBE, **env: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if k != "SDPIPE_EAGER_IMPORTS"}
    environ |= {"PYTHONPATH": os.pathsep.join([str(site), str(PROJECT_ROOT)])} | env
    done = subprocess.run(
        [sys.executable, "-c", code, mode],
        cwd=PROJECT_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stage_processes_run_bitsandbytes_and_scipy_stats_only_on_first_use(fake_bitsandbytes: Path) -> None:
    used = {
        "found": True,
        "available": True,
        "version_on_use": "0.50.2",
        "ran_on_use": True,
        "scipy_stats_on_use": 0.5,
    }
    eager = used | {"ran_at_import": True, "scipy_stats_ran_at_import": True}
    assert probe(fake_bitsandbytes, "plain") == eager, "diffusers/peft must import both"
    assert probe(fake_bitsandbytes, "stages") == used | {
        "ran_at_import": False,
        "scipy_stats_ran_at_import": False,
    }
    assert probe(fake_bitsandbytes, "stages", SDPIPE_EAGER_IMPORTS="1") == eager


def test_a_submodule_import_runs_the_deferred_package_first(fake_bitsandbytes: Path) -> None:
    code = (
        "import json, sys\nimport stages, bitsandbytes\nbefore = hasattr(sys, 'fake_bitsandbytes_ran')\n"
        "from bitsandbytes import sub\nprint(json.dumps({'before': before, 'sub_saw_package': sub.saw_package_run}))"
    )
    assert probe(fake_bitsandbytes, "stages", code) == {"before": False, "sub_saw_package": True}
