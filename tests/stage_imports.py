"""The project modules each DVC stage's command imports, derived from the source (what dvc.yaml's deps must cover).

``python -m tests.stage_imports`` prints, for every stage of dvc.yaml, the deps its code needs: one entry per
``stages/lib`` sub-package it reaches (the folder) and one per other module.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Modules whose edits cannot change any stage's outputs, so no stage depends on them; each named once, with why.
EXEMPT = {
    "stages/__main__.py": "dispatches `python -m stages <name>` to the stage module and starts the MLflow sidecar",
    "stages/lib/tracking/sidecar.py": "runs the MLflow client in a second process; writes nothing the stage outputs",
    "stages/lib/tracking/mlflow_run.py": "talks to the MLflow store only (runs, params, metrics, artifacts)",
}
COMMAND = re.compile(r"python -m stages(\.| )(\w+)")  # `python -m stages <name>` or `python -m stages.<name>`


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of the project module ``name`` (``stages.lib.config.schema``), or None when it is not one."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(tree: ast.AST) -> set[str]:
    """Every ``stages...`` module an import statement names, at any depth (functions, TYPE_CHECKING blocks)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "stages")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stages":
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' ``__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(roots: list[str], root: Path = ROOT) -> set[Path]:
    """The files of every project module that importing ``roots`` can import, directly or indirectly."""
    seen: set[Path] = set()
    todo = [n for r in roots for n in _with_parents(r)]
    while todo:
        path = module_file(todo.pop(), root)
        if path is None or path in seen:
            continue
        seen.add(path)
        for name in _imported_names(ast.parse(path.read_text(), filename=str(path))):
            todo.extend(_with_parents(name))
    return seen


def _docstring_only(path: Path) -> bool:
    """A package ``__init__.py`` that holds only its docstring runs no code: no stage needs to depend on it."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body
    )


def stage_commands(root: Path = ROOT) -> dict[str, str]:
    """dvc.yaml's stage name -> command (a ``foreach`` stage under its own name)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: (spec.get("do", spec))["cmd"] for name, spec in stages.items()}


def stage_deps(name: str, root: Path = ROOT) -> list[str]:
    """dvc.yaml's deps of stage ``name`` (a ``foreach`` stage's ``do``)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][name]
    return list(spec.get("do", spec)["deps"])


def stage_modules(name: str, root: Path = ROOT) -> set[str]:
    """Repo-relative paths of the project modules the command of stage ``name`` imports, exemptions left out."""
    match = COMMAND.search(stage_commands(root)[name])
    if match is None:
        raise ValueError(f"dvc.yaml: stage {name}'s command is not `python -m stages <stage>`")
    separator, stage = match.groups()
    entry = ["stages.__main__"] if separator == " " else []  # the dispatcher runs first
    files = import_closure([*entry, f"stages.{stage}"], root)
    return {p.relative_to(root).as_posix() for p in files if not _docstring_only(p)} - set(EXEMPT)


def needed_deps(name: str, root: Path = ROOT) -> list[str]:
    """The deps that cover ``stage_modules(name)``: a ``stages/lib`` sub-package as its folder, other files as such."""
    deps = set()
    for module in stage_modules(name, root):
        parts = module.split("/")
        deps.add("/".join(parts[:3]) if len(parts) > 3 and parts[:2] == ["stages", "lib"] else module)
    return sorted(deps)


def uncovered(name: str, root: Path = ROOT) -> list[str]:
    """The modules of stage ``name`` that none of its dvc.yaml deps covers (a dep covers itself and what is under it)."""
    deps = [d.rstrip("/") for d in stage_deps(name, root)]
    return sorted(
        m for m in stage_modules(name, root) if not any(m == d or m.startswith(d + "/") for d in deps)
    )


if __name__ == "__main__":
    for stage in stage_commands():
        print(f"{stage}:")
        print("\n".join(f"  - {dep}" for dep in needed_deps(stage)))
    sys.exit(0)
