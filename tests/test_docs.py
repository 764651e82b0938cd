"""The README (a user's guide) and docs/ (development, tests, benchmarks) hold together: every relative link
and anchor resolves, the quick start keeps the two commands CI runs, and the GPU status keeps its marker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import workflow_tools as wt

README = wt.REPO / "README.md"
PAGES = [README, *sorted((wt.REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8")))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(wt.REPO).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_quick_start_keeps_the_two_commands_ci_runs():
    """A fresh machine needs exactly these two commands; CI runs the same ones."""
    quick_start = _section(README.read_text(encoding="utf-8"), "Quick start")
    ci = (wt.REPO / ".ci" / "run").read_text(encoding="utf-8")
    for command in ("bash scripts/quickstart.sh", "bash scripts/test.sh"):
        assert f"```bash\n{command}\n```" in quick_start, command
        assert command in ci, command
        assert (wt.REPO / command.split()[1]).is_file(), command


def test_readme_nodes_section_names_every_node(pack):
    nodes = _section(README.read_text(encoding="utf-8"), "Nodes")
    for name in pack.NODE_DISPLAY_NAME_MAPPINGS.values():
        assert f"**{name}**" in nodes, name


def test_gpu_status_keeps_its_marker_under_dynamic_vram():
    """The GPU status paragraph is updated by whoever runs the GPU check; the marker finds it."""
    section = _section(README.read_text(encoding="utf-8"), "Dynamic VRAM")
    marker = section.index("<!-- gpu-status -->")
    assert "**GPU status:**" in section[marker:], "the status paragraph follows its marker"
    assert "--disable-dynamic-vram" in section
