"""dvc.yaml's deps cover the code each stage runs, stages stay independent modules, and the library has no cycles."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.stage_imports import ROOT, import_closure, module_file, stage_commands, uncovered

STAGE_NAMES = sorted(stage_commands())
STAGE_MODULES = sorted(
    p.stem for p in (ROOT / "stages").glob("*.py") if p.stem not in {"__init__", "__main__"}
)


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_deps_cover_every_module_the_stage_imports(stage):
    missing = uncovered(stage)
    assert not missing, (
        f"dvc.yaml: stage {stage} runs code its deps do not list: {missing}. "
        "Add them (python -m tests.stage_imports prints every stage's code deps)."
    )


def test_the_import_closure_follows_function_level_and_package_imports(tmp_path):
    pkg = tmp_path / "stages" / "lib" / "pkg"
    pkg.mkdir(parents=True)
    for init in (tmp_path / "stages", tmp_path / "stages" / "lib", pkg):
        (init / "__init__.py").write_text('"""doc"""\n')
    (pkg / "a.py").write_text("def f():\n    from stages.lib.pkg import b\n")
    (pkg / "b.py").write_text("from stages.lib.pkg.c import X\n")
    (pkg / "c.py").write_text("X = 1\n")
    (pkg / "unused.py").write_text("")
    files = {p.relative_to(tmp_path).as_posix() for p in import_closure(["stages.lib.pkg.a"], tmp_path)}
    assert {"stages/lib/pkg/a.py", "stages/lib/pkg/b.py", "stages/lib/pkg/c.py"} <= files
    assert "stages/lib/pkg/unused.py" not in files and "stages/lib/pkg/__init__.py" in files


def _project_imports(path: Path) -> set[Path]:
    """The project modules ``path`` imports at run time (anywhere but under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for child in ast.walk(stmt)
    }
    found: set[Path] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("stages")]
        else:
            continue
        found.update(f for n in names if (f := module_file(n)) is not None and f.name != "__init__.py")
    return found - {path}


def test_no_stage_module_imports_another_stage():
    stage_files = {ROOT / "stages" / f"{name}.py" for name in STAGE_MODULES}
    for path in sorted(stage_files):
        others = sorted(p.stem for p in _project_imports(path) & stage_files)
        assert not others, (
            f"{path.relative_to(ROOT)} imports the stage(s) {others}: move what they share to stages/lib"
        )


def test_the_project_has_no_import_cycles():
    modules = sorted(p for p in (ROOT / "stages").rglob("*.py") if p.name != "__init__.py")
    graph = {p: _project_imports(p) for p in modules}
    state: dict[Path, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: Path, path: list[Path]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [p.relative_to(ROOT).as_posix() for p in path[path.index(nxt) :] + [nxt]]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])
    assert len(state) == len(modules)


def test_no_two_modules_share_a_name_across_stages_and_lib():
    stage_names = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    lib_names = {p.stem for p in (ROOT / "stages" / "lib").rglob("*.py")} - {"__init__"}
    assert not stage_names & lib_names, (
        f"stage and library modules with one name: {sorted(stage_names & lib_names)}"
    )


def test_editing_a_library_module_makes_exactly_its_stages_stale(tmp_path, monkeypatch):
    """In a copy of the repository with every output stubbed and committed, an edit of the optimizer module makes
    DVC report the training stages changed, and no others."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    repo = tmp_path / "repo"
    for rel in files:
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    monkeypatch.chdir(repo)  # DVC resolves stage paths from the working directory
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        stages = dvc_repo.index.stages
        data = [
            o.fs_path for stage in stages for o in (*stage.outs, *stage.deps) if not Path(o.fs_path).exists()
        ]
        for out in map(Path, data):  # every output, and inputs inside outputs (models/export/lora_extracted)
            if out.suffix:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("stub\n")
            else:
                out.mkdir(parents=True, exist_ok=True)
                (out / "stub.txt").write_text("stub\n")
        dvc_repo.commit(force=True)
        assert dvc_repo.status() == {}, dvc_repo.status()

    with (repo / "stages/lib/training/optim.py").open("a") as fh:
        fh.write("\n# an edit\n")
    with Repo(str(repo)) as dvc_repo:
        report = dvc_repo.status()
    changed = {name.split(":")[-1] for name in report}  # "dvc.yaml:lora@4" or "lora@4"
    assert {"base", "dreambooth", "controlnet_train"} <= changed, report
    assert any(name.startswith("lora@") for name in changed), report
    assert not changed & {
        "sample_subject",
        "prep",
        "class_images",
        "convert",
        "infer",
        "compare",
        "controlnet",
    }, report


def test_resume_fingerprints_name_existing_code_files():
    """The code files hashed into checkpoint fingerprints exist (a renamed module would otherwise fail at run time)."""
    from stages import controlnet_train
    from stages.lib.miniature import pretrain
    from stages.lib.training import finetune

    for module in (controlnet_train, pretrain, finetune):
        missing = [str(p) for p in module.CODE_FILES if not p.is_file()]
        assert not missing, f"{module.__name__}.CODE_FILES: {missing}"


def test_every_project_import_names_something_that_exists():
    """``from stages... import name``: the module exists and has ``name`` (as attribute or submodule)."""
    import importlib

    problems = []
    for path in sorted(
        [*ROOT.glob("stages/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("stages")
            ):
                continue
            try:
                module = importlib.import_module(node.module)
            except ModuleNotFoundError as err:
                if (err.name or "").startswith("stages"):
                    problems.append(f"{path.relative_to(ROOT)}: {node.module}")
                continue  # a third-party package this machine lacks (triton)
            problems += [
                f"{path.relative_to(ROOT)}: {node.module}.{alias.name}"
                for alias in node.names
                if not hasattr(module, alias.name) and module_file(f"{node.module}.{alias.name}") is None
            ]
    assert not problems, problems
