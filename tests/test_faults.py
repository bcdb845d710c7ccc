"""Faults outside the photos: folders that cannot be written, pickled weights that could run code, a failed stage
under DVC (stages/lib/runtime/cli.py, outputs.py, pickles.py, models.py, controlnet.py)."""

from __future__ import annotations

import argparse
import errno
import os
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import base
from stages.lib.config.loader import save_params
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import StageError
from stages.lib.models.controlnet_model import ControlNetLoadError, load_controlnet
from stages.lib.models.loading import ModelLoadError, load_pipeline
from stages.lib.models.pickles import load_weights_only
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.outputs import atomic_dir
from tests.test_prep import digest

UNET = "unet/diffusion_pytorch_model"


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch):
    """Make a folder read-only; where the user is root (who writes anyway) refuse to create entries in it as the
    file system would for anyone else."""
    locked: list[Path] = []
    mkdir = Path.mkdir

    def refusing_mkdir(path: Path, *args: object, **kwargs: object) -> None:
        if path.parent in locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        mkdir(path, *args, **kwargs)

    def lock(folder: Path) -> Path:
        folder.chmod(0o555)
        locked.append(folder)
        if os.access(folder, os.W_OK):
            monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
        return folder

    yield lock
    for folder in locked:
        folder.chmod(0o755)


def test_atomic_dir_in_a_read_only_folder_names_it_and_keeps_the_previous_output(
    tmp_path: Path, read_only
) -> None:
    models = tmp_path / "models"
    (models / "base").mkdir(parents=True)
    (models / "base" / "weights").write_text("previous")
    read_only(models)
    with pytest.raises(StageError) as err, atomic_dir(models / "base"):
        pytest.fail("the body must not run")
    assert str(err.value) == (
        f"cannot write {models / 'base'}: {models} is not writable (Permission denied); "
        f"make it writable (chmod -R u+rwX {models}) and run again"
    )
    assert sorted(p.name for p in models.iterdir()) == ["base"]
    assert (models / "base" / "weights").read_text() == "previous"


def run_stage(run, argv: list[str] | None = None) -> int:
    def run_args(cfg: PipelineConfig, args: argparse.Namespace) -> None:
        run()

    return stage_main("test stage", lambda parser: None, run_args, ["--params", *(argv or [])])


@pytest.fixture
def params(tmp_path: Path) -> str:

    cfg = PipelineConfig()
    cfg.tracking.enabled = False
    path = tmp_path / "params.yaml"
    save_params(cfg, path)
    return str(path)


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (
            errno.EACCES,
            "reports/prep/metrics.json: permission denied: give yourself access to reports/prep "
            "(chmod -R u+rwX reports/prep) or run as its owner",
        ),
        (errno.EROFS, "reports/prep/metrics.json: read-only file system: put the project on a writable disk"),
        (
            errno.ENOSPC,
            "reports/prep/metrics.json: no space left on the device: free some space and run again",
        ),
    ],
)
def test_a_file_system_refusal_is_one_line(
    params: str, code: int, words: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DVC_STAGE", raising=False)

    def refuse() -> None:
        raise OSError(code, os.strerror(code), "reports/prep/metrics.json")

    assert run_stage(refuse, [params]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {words}"]


def test_other_os_errors_keep_their_traceback(params: str) -> None:
    def fail() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        run_stage(fail, [params])


def test_under_dvc_a_failure_says_how_to_restore_the_outputs(
    params: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail() -> None:
        raise StageError("data/photos: no usable images")

    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert run_stage(fail, [params]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: data/photos: no usable images"]
    monkeypatch.setenv("DVC_STAGE", "lora@4")  # DVC sets it for every stage command
    assert run_stage(fail, [params]) == 2
    error, note = capsys.readouterr().err.splitlines()
    assert error == "error: data/photos: no usable images"
    assert (
        "DVC removed the previous outputs of 'lora@4'" in note
        and "`dvc checkout lora@4` restores them" in note
    )


def test_prep_into_a_read_only_folder(
    params: str,
    tmp_path: Path,
    read_only,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stages.prep import main
    from tests.test_prep import make_good

    monkeypatch.delenv("DVC_STAGE", raising=False)
    make_good(tmp_path / "in")
    data = tmp_path / "data"
    (data / "prepared").mkdir(parents=True)
    (data / "prepared" / "old.png").write_text("previous")
    read_only(data)
    argv = ["--params", params, "--input", str(tmp_path / "in"), "--output", str(data / "prepared")]
    assert main([*argv, "--reports", str(tmp_path / "reports")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line == (
        f"error: cannot write {data / 'prepared'}: {data} is not writable (Permission denied); "
        f"make it writable (chmod -R u+rwX {data}) and run again"
    )
    assert sorted(p.name for p in data.iterdir()) == ["prepared"]
    assert (data / "prepared" / "old.png").read_text() == "previous"


def pickle_with_an_object(path: Path) -> Path:
    """A pickle that weights-only loading refuses: it would build a non-tensor object (harmless here)."""
    torch.save({"weight": torch.zeros(2), "probe": Fraction(1, 3)}, path)
    return path


def test_weights_only_pickles_load_and_others_are_refused_in_one_line(tmp_path: Path) -> None:
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.bin")
    assert torch.equal(load_weights_only(tmp_path / "plain.bin")["weight"], torch.ones(2))
    bad = pickle_with_an_object(tmp_path / "bad.bin")
    with pytest.raises(ModelLoadError) as err:
        load_weights_only(bad)
    assert str(err.value) == (
        f"{bad}: refused: this pickle holds a fractions.Fraction object, and unpickling it could run code; "
        "use a .safetensors file (convert this one only on a machine where you trust where it came from)"
    )
    (tmp_path / "text.bin").write_text("not a pickle")
    with pytest.raises(ModelLoadError, match=r"text.bin: cannot be read as a weights-only pickle \("):
        load_weights_only(tmp_path / "text.bin")


def test_a_pickled_bin_in_a_pipeline_folder_is_refused(
    tiny_cfg: PipelineConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pipe"
    base.run(tiny_cfg, folder, tmp_path / "r")
    weights = load_file(folder / f"{UNET}.safetensors")
    (folder / f"{UNET}.safetensors").unlink()
    bad = pickle_with_an_object(folder / f"{UNET}.bin")
    before = digest(folder)
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(folder)
    assert str(err.value).startswith(f"{bad}: refused: this pickle holds a fractions.Fraction object")
    assert "\n" not in str(err.value) and digest(folder) == before
    torch.save(weights, bad)  # a weights-only .bin (what older diffusers saved) still loads
    assert torch.equal(load_pipeline(folder).unet.state_dict()["conv_in.weight"], weights["conv_in.weight"])


def test_a_refused_controlnet_pth_names_the_key_and_the_fix(tmp_path: Path) -> None:
    bad = pickle_with_an_object(tmp_path / "control.pth")
    with pytest.raises(ControlNetLoadError) as err:
        load_controlnet(str(bad))
    assert str(err.value) == (
        f"controlnet.model_path={bad}: refused: this pickle holds a fractions.Fraction object, and unpickling it "
        "could run code; use a .safetensors file (convert this one only on a machine where you trust where it "
        "came from)"
    )
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, tmp_path / "sd.pth")
    with pytest.raises(
        ControlNetLoadError, match=r"sd.pth: no ControlNet weights \(no 'control_model.\*' keys\)"
    ):
        load_controlnet(str(tmp_path / "sd.pth"))
