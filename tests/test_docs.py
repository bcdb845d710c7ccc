"""README.md and docs/: the benchmark tables are the committed result JSONs as the benchmarks' own ``--table``
renders them (not typed by hand), the pages speak of results, not of development history, and their links
resolve."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import attention_first_use, multi_gpu, recipe, speed, train_step

from .conftest import PROJECT_ROOT

TABLES = [  # (renderer, result JSON, docs page that shows it)
    (train_step.render_table, "benchmarks/results_h200.json", "docs/gpu.md"),
    (train_step.render_table, "benchmarks/results_tiny_cpu.json", "docs/miniature.md"),
    (multi_gpu.render_table, "benchmarks/results_h200_multi_gpu_n1.json", "docs/gpu.md"),
    (speed.markdown_table, "benchmarks/results/speed_h100.json", "README.md"),
    (speed.markdown_table, "benchmarks/results/speed_h100.json", "docs/gpu-speed.md"),
    (recipe.markdown_table, "benchmarks/results/recipe_h100_s01.json", "docs/gpu-speed.md"),
    (recipe.markdown_table, "benchmarks/results/recipe_h100_s01_r4.json", "docs/gpu-speed.md"),
    (recipe.markdown_table, "benchmarks/results/recipe_h100_s01_r4_profiled.json", "docs/gpu-speed.md"),
    (recipe.markdown_table, "benchmarks/results/recipe_h100_s01_r4_cudnn_off.json", "docs/gpu-speed.md"),
    (
        attention_first_use.markdown_table,
        "benchmarks/results/attention_first_use_h100.json",
        "docs/gpu-speed.md",
    ),
]


@pytest.mark.parametrize(("render", "result", "page"), TABLES, ids=[t[1].split("/")[-1] for t in TABLES])
def test_docs_show_the_rendered_benchmark_table(render, result: str, page: str) -> None:
    rendered = render(json.loads((PROJECT_ROOT / result).read_text()))
    table = "\n".join(line for line in rendered.splitlines() if line.startswith("|"))
    assert table, rendered
    assert table in (PROJECT_ROOT / page).read_text(), f"{page}: regenerate with --table {result}"


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in (PROJECT_ROOT / "docs").glob("*.md"))])
def test_docs_speak_of_results_not_of_history(page: str) -> None:
    """User-facing pages state results and how to reproduce them, never when or where they were worked on."""
    path = PROJECT_ROOT / page if page == "README.md" else PROJECT_ROOT / "docs" / page
    text = path.read_text().lower()
    for phrase in ("session ", "gpu machine", "slow hour", "fast hour", "last time"):
        assert phrase not in text, f"{path.name}: '{phrase}'"


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown text (headings outside code blocks)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(f"docs/{p.name}" for p in (PROJECT_ROOT / "docs").glob("*.md"))]
)
def test_intra_doc_links_resolve(page: str) -> None:
    path = PROJECT_ROOT / page
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page}: {target}"
        if anchor:
            assert anchor in _anchors(linked.read_text()), f"{page}: {target}"
