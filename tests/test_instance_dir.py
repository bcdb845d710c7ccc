"""data.instance_dir checked while conf/ is composed (hydra_plugins/sdpipe/inputs.py): a folder DVC could not hash
as prep's dependency stops `dvc exp run -S` with one line naming the path, params.yaml, dvc.lock, the outputs and
the folder as they were; and what a plain `dvc repro` does instead (README.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf.errors import InterpolationResolutionError

from hydra_plugins.sdpipe.inputs import check_instance_dir, stage_outputs
from stages.compose import compose
from stages.lib.errors import ConfigError
from tests.conftest import PROJECT_ROOT

DVC = Path(sys.executable).with_name("dvc")
FOLDER = "data/me"
HOW = "point data.instance_dir at the folder holding your photos"


def _missing(repo: Path) -> None:
    pass


def _file(repo: Path) -> None:
    (repo / "data").mkdir(exist_ok=True)
    (repo / FOLDER).write_bytes(b"one photo, not a folder")


def _nested_broken_link(repo: Path) -> None:
    (repo / FOLDER / "sub").mkdir(parents=True)
    (repo / FOLDER / "ok.jpg").write_bytes(b"a photo")
    (repo / FOLDER / "sub" / "dangling.jpg").symlink_to("missing.jpg")


def _broken_folder_link(repo: Path) -> None:
    (repo / "data").mkdir(exist_ok=True)
    (repo / FOLDER).symlink_to("nowhere")


def _hidden_broken_link(repo: Path) -> None:  # prep ignores hidden files; DVC hashes them
    (repo / FOLDER / ".cache").mkdir(parents=True)
    (repo / FOLDER / "ok.jpg").write_bytes(b"a photo")
    (repo / FOLDER / ".cache" / "thumb").symlink_to("/no/such/file")


BAD = {  # case: (what makes data/me, the message after "data.instance_dir='data/me': "; {repo} filled in)
    "missing": (_missing, f"no such folder ({{repo}}/{FOLDER}): create it with your photos, or {HOW}"),
    "file": (_file, f"{FOLDER} is a file, not a folder: {HOW}"),
    "broken_link_inside": (
        _nested_broken_link,
        f"{FOLDER}/sub/dangling.jpg is a broken symlink (to missing.jpg, no such file), which DVC cannot hash: "
        f"fix or remove it (list them all: find {FOLDER} -xtype l)",
    ),
    "broken_link_as_folder": (
        _broken_folder_link,
        f"{FOLDER} is a broken symlink (to nowhere, no such file): fix the link, or {HOW}",
    ),
    "hidden_broken_link": (
        _hidden_broken_link,
        f"{FOLDER}/.cache/thumb is a broken symlink (to /no/such/file",
    ),
}
DVC_CASES = ("missing", "broken_link_inside", "file")


def expected(case: str, repo: Path) -> str:
    return f"data.instance_dir='{FOLDER}': " + BAD[case][1].format(repo=repo)


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed): a file's bytes, a link's target, a folder's mark."""
    if not os.path.lexists(folder):
        return {}
    if folder.is_symlink() or folder.is_file():
        return {".": os.readlink(folder) if folder.is_symlink() else folder.read_text(errors="replace")}
    found = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent, name)
            rel = str(path.relative_to(folder))
            found[rel] = (
                f"-> {os.readlink(path)}"
                if path.is_symlink()
                else "dir"
                if path.is_dir()
                else path.read_text()
            )
    return found


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding the project's dvc.yaml (DVC composes conf/ in the repository root)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy2(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("case", list(BAD))
def test_a_folder_dvc_cannot_hash_stops_the_composition(repo: Path, case: str) -> None:
    BAD[case][0](repo)
    before = snapshot(repo / FOLDER)
    out = repo / "params.yaml"
    out.write_text("previous: content\n")
    with pytest.raises(InterpolationResolutionError) as info:
        compose(out, [f"data.instance_dir={FOLDER}"], root=PROJECT_ROOT)
    message = str(info.value)
    assert f"conf/ with the -S overrides: {expected(case, repo)}" in message
    assert "\n" not in message, "one line"
    assert out.read_text() == "previous: content\n"
    assert snapshot(repo / FOLDER) == before, "the folder is left as it was"


def test_the_sample_subject_stages_output_need_not_exist_yet(repo: Path) -> None:
    """The default, data/sample_subject, is written by a stage: a fresh clone composes without it."""
    assert Path("data/sample_subject") in stage_outputs(PROJECT_ROOT / "dvc.yaml")
    assert not (repo / "data").exists()
    params = yaml.safe_load(compose(repo / "params.yaml", [], root=PROJECT_ROOT).read_text())
    assert params["data"]["instance_dir"] == "data/sample_subject"
    compose(repo / "params.yaml", ["data.instance_dir=./data/sample_subject/"], root=PROJECT_ROOT)


def test_folders_dvc_can_hash_pass(repo: Path, tmp_path: Path) -> None:
    """Links to photos and linked folders (DVC does not enter those, even holding a broken link) are fine; an
    absolute path too."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "linked").mkdir(parents=True)
    (elsewhere / "photo.jpg").write_bytes(b"a photo")
    (elsewhere / "linked" / "dangling.jpg").symlink_to("missing.jpg")
    (repo / FOLDER / "sub").mkdir(parents=True)
    (repo / FOLDER / "ok.jpg").write_bytes(b"a photo")
    (repo / FOLDER / "sub" / "link.jpg").symlink_to(elsewhere / "photo.jpg")
    (repo / FOLDER / "folder_link").symlink_to(elsewhere / "linked")
    for value in (FOLDER, str(repo / FOLDER)):
        params = compose(repo / "params.yaml", [f"data.instance_dir={value}"], root=PROJECT_ROOT)
        assert yaml.safe_load(params.read_text())["data"]["instance_dir"] == value


def test_an_empty_value_and_no_pipeline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.instance_dir is empty: set it to the folder holding your"):
        check_instance_dir(" ", tmp_path)
    check_instance_dir("missing", tmp_path)  # no dvc.yaml here: nothing will hash the folder


def test_a_folder_that_cannot_be_listed(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nested_broken_link(repo)
    locked = repo / FOLDER / "sub"
    scandir = os.scandir

    def refusing(path: str | os.PathLike[str] = ".") -> object:  # as for anyone but root, who reads anyway
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(ConfigError) as info:
        check_instance_dir(FOLDER, repo)
    assert (
        str(info.value)
        == f"data.instance_dir='{FOLDER}': cannot list {locked} (Permission denied): fix its permissions"
    )


# Real DVC, in a small git + DVC repository: the project's conf/ (and, through PYTHONPATH, its Hydra plugin) with
# two stages shaped like the project's: sample_subject writes the default folder, prep depends on data.instance_dir.
DVC_YAML = """\
stages:
  sample_subject:
    cmd: mkdir -p data/sample_subject && echo photo > data/sample_subject/a.jpg
    outs:
      - data/sample_subject
  prep:
    cmd: mkdir -p data/prepared && ls ${data.instance_dir} > data/prepared/list.txt
    deps:
      - ${data.instance_dir}
    params:
      - prep
    outs:
      - data/prepared
"""


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "DVC_NO_ANALYTICS": "1"}
    env.pop("DVC_ROOT", None)
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dvc_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dvc_template") / "repo"
    root.mkdir()
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf")
    shutil.copy2(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(DVC_YAML)
    dvc(root, "git", "init", "-q")
    dvc(root, str(DVC), "init", "-q")
    dvc(root, str(DVC), "config", "hydra.enabled", "true")
    dvc(root, str(DVC), "repro", "-q")
    dvc(root, "git", "add", "-A")
    dvc(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    return root


@pytest.fixture
def dvc_repo(dvc_template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(dvc_template, root, symlinks=True)
    return root


def state(repo: Path) -> dict[str, object]:
    """What a failed `dvc exp run` must leave as it was."""
    git = dvc(repo, "git", "status", "--porcelain", "--untracked-files=all").stdout
    return {
        "params.yaml": (repo / "params.yaml").read_text(),
        "dvc.lock": (repo / "dvc.lock").read_text(),
        "data/prepared": snapshot(repo / "data/prepared"),
        FOLDER: snapshot(repo / FOLDER),
        "git status": git,
    }


@pytest.mark.parametrize("case", DVC_CASES)
def test_dvc_exp_run_stops_with_the_message_and_changes_nothing(dvc_repo: Path, case: str) -> None:
    BAD[case][0](dvc_repo)
    before = state(dvc_repo)
    assert before["data/prepared"] == {"list.txt": "a.jpg\n"}
    run = dvc(dvc_repo, str(DVC), "exp", "run", "-S", f"data.instance_dir={FOLDER}", check=False)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "data.instance_dir=" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"conf/ with the -S overrides: {expected(case, dvc_repo)}"
    ), run.stderr
    assert "Errno" not in run.stdout + run.stderr
    assert state(dvc_repo) == before


def test_dvc_exp_run_takes_a_good_folder_and_a_missing_sample_subject(dvc_repo: Path, tmp_path: Path) -> None:
    """A linked folder holding a broken link passes, as DVC does not enter it; the default needs no folder yet."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "dangling.jpg").symlink_to("missing.jpg")
    (dvc_repo / FOLDER).mkdir()
    (dvc_repo / FOLDER / "b.jpg").write_bytes(b"a photo")
    (dvc_repo / FOLDER / "linked").symlink_to(tmp_path / "elsewhere")
    dvc(dvc_repo, str(DVC), "exp", "run", "-S", f"data.instance_dir={FOLDER}")
    assert (dvc_repo / "data/prepared/list.txt").read_text() == "b.jpg\nlinked\n"
    shutil.rmtree(dvc_repo / "data/sample_subject")  # a fresh clone: the stage writes it
    dvc(dvc_repo, str(DVC), "exp", "run", "-S", "data.instance_dir=data/sample_subject")
    assert (dvc_repo / "data/prepared/list.txt").read_text() == "a.jpg\n"


@pytest.mark.parametrize("case", ["missing", "broken_link_inside"])
def test_a_plain_repro_fails_in_dvc_as_the_readme_says(dvc_repo: Path, case: str) -> None:
    """Without a composition no project code runs before DVC hashes prep's dependencies: DVC's own error, prep's
    outputs removed, `dvc checkout prep` restores them."""
    BAD[case][0](dvc_repo)
    params = dvc_repo / "params.yaml"
    params.write_text(
        params.read_text().replace("instance_dir: data/sample_subject", f"instance_dir: {FOLDER}")
    )
    run = dvc(dvc_repo, str(DVC), "repro", check=False)
    error = "ERROR: failed to reproduce 'prep': [Errno 2] No such file or directory: "
    bad = {"missing": FOLDER, "broken_link_inside": f"{FOLDER}/sub/dangling.jpg"}[case]
    assert run.returncode != 0 and f"{error}'{dvc_repo / bad}'" in run.stderr, run.stderr
    assert not (dvc_repo / "data/prepared").exists()
    dvc(dvc_repo, str(DVC), "checkout", "prep")
    assert snapshot(dvc_repo / "data/prepared") == {"list.txt": "a.jpg\n"}
    readme = " ".join((PROJECT_ROOT / "README.md").read_text().split())
    assert f"`{error}'<path>'`" in readme and "`dvc checkout prep` restores them" in readme


@pytest.mark.parametrize(
    ("override", "wanted"),
    [
        ("data.instance_dir={missing}", "data.instance_dir='{missing}': no such folder"),
        ("lora.rnak=3", "Could not override 'lora.rnak'. To append to your config use +lora.rnak=3"),
        ("infer.guidance_scale=-3", "infer.guidance_scale=-3.0 must be >= 0"),
    ],
)
def test_make_params_stops_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    override: str,
    wanted: str,
) -> None:
    """`make params` (python -m stages.compose): the same checks, one line instead of a traceback."""
    from stages.compose import main

    missing = tmp_path / "missing"
    out = tmp_path / "params.yaml"
    out.write_text("previous: content\n")
    monkeypatch.chdir(PROJECT_ROOT)
    with pytest.raises(SystemExit) as info:
        main(["--out", str(out), override.format(missing=missing)])
    message = str(info.value.code)
    assert message.startswith("error: ") and wanted.format(missing=missing) in message
    assert "\n" not in message and "Traceback" not in message
    assert out.read_text() == "previous: content\n"
