"""Node help pages (web/docs) and the README's Workflows and Nodes sections agree with the nodes and the files."""

from __future__ import annotations

import re

import pytest
import workflow_tools as wt

WEB = wt.REPO / "web"
# One input per list item (a table does not fit the 253 px help sidebar):
#   - **`lr`** · FLOAT · default 0.015 (0 to 1): what it is, and when to change it
ROW = re.compile(r"^- \*\*`(?P<name>[a-z_]+)`\*\* · (?P<type>[A-Z_]+)(?: · (?P<default>[^:]+))?: \S", re.M)
SIDEBAR_CHARACTERS = 30  # the longest word that fits one line of the help sidebar (253 px)


def _readme_section(title: str) -> str:
    text = (wt.REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_pack_declares_its_web_directory(pack):
    assert (wt.REPO / pack.WEB_DIRECTORY).resolve() == WEB.resolve()
    assert sorted(p.stem for p in (WEB / "docs").glob("*.md")) == sorted(pack.NODE_CLASS_MAPPINGS)


def _expected_default(options: dict, kind: str) -> str | None:
    if "default" not in options:
        return None
    value = options["default"]
    if kind == "BOOLEAN":
        return "true" if value else "false"
    if kind in ("STRING", "COMBO"):
        return f"`{value}`"
    return repr(value)


@pytest.mark.parametrize("node", ["CaptureReferenceAttention", "LatentADOptimize", "ADLossGuidance", "ADTextureWindows",
                                  "ADSeamlessTiling", "ADFineTuneVAEDecoder"])
def test_help_page_documents_every_input_with_its_default(pack, node):
    page = (WEB / "docs" / f"{node}.md").read_text(encoding="utf-8")
    assert page.startswith(f"# {pack.NODE_DISPLAY_NAME_MAPPINGS[node]}\n")
    definition = wt.pack_node_defs(pack)[node]
    rows = {m["name"]: m for m in ROW.finditer(page.split("## Inputs", 1)[1].split("\n## ", 1)[0])}
    assert list(rows) == [i.name for i in definition.inputs], "one row per input, in the node's order"
    for item in definition.inputs:
        row = rows[item.name]
        assert row["type"] == item.type, item.name
        expected = _expected_default(item.options, item.type)
        cell = (row["default"] or "").strip()
        if expected is None:
            assert cell in ("", "optional") or cell.startswith("optional, "), f"{item.name}: {cell}"
            assert (cell != "") == (item.section == "optional"), f"{item.name}: say whether it is optional"
        else:
            assert cell.removeprefix("default ").split(" (")[0] == expected, f"{item.name}: page says {cell}, the node {expected}"
        bounds = re.search(r"\((\S+) to (\S+)\)", cell)
        if bounds:
            assert (float(bounds[1]), float(bounds[2])) == (item.options["min"], item.options["max"]), item.name
    assert "## Errors" in page


@pytest.mark.parametrize("page", sorted((WEB / "docs").glob("*.md")), ids=lambda p: p.stem)
def test_help_page_fits_the_help_sidebar(page):
    """Frontend 1.27 opens node help in a 253 px sidebar (1.48 in its node Info panel, about 300 px wide on a
    1600 px window): no tables (their last column is cut off there) and no word too long to wrap."""
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"^\s*\|", text, re.M), "tables do not fit the help sidebar; use one list item per row"
    long_words = [w for w in re.findall(r"\S+", text) if len(w.strip("*`_()[].,:;")) > SIDEBAR_CHARACTERS]
    assert not long_words, long_words


def test_readme_shows_every_workflow_and_its_picture():
    section = _readme_section("Workflows")
    for path in wt.workflow_files():
        assert f"`{path.name}`" in section, path.name
        picture = f"docs/images/workflows/{wt.slug_of(path)}.png"
        assert f"]({picture})" in section, picture
        assert (wt.REPO / picture).is_file(), picture
    for folder, files in wt.MODEL_FILES.items():
        for name in files:
            assert f"| `models/{folder}` | `{name}` |" in section, name


def test_readme_nodes_section_names_the_help_pages():
    assert "web/docs/" in _readme_section("Nodes")
