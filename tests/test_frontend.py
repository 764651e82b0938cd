"""The shipped workflows, the Templates browser and the node help pages in ComfyUI's real frontend
(scripts/check_frontend.py: ComfyUI's main.py with this pack, frontend 1.48 in headless Chromium).

Skipped, with the reason, without COMFYUI_PATH, without `chromium` on the PATH, or where this Python's
comfyui-frontend-package is older than 1.48 (ComfyUI v0.33.0 ships 1.48.7). About 2.5 minutes on 2 cores.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -c tests/pytest.ini \
        tests/test_frontend.py
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import workflow_layout as wl
import workflow_tools as wt

sys.path.insert(0, str(wt.REPO / "scripts"))
DOCTORED = "doctored copy of 01.json"


def _doctored(workflow: dict) -> dict:
    """Workflow 01 with what the check is there to see: a node type no pack defines, a widget value short
    (the frontend fills in the default), and a saved view that puts the note under the side bar."""
    doctored = copy.deepcopy(workflow)
    nodes = {n["type"]: n for n in doctored["nodes"]}
    nodes["SaveImage"]["type"] = "ADNoSuchNode"
    nodes["ImageScale"]["widgets_values"] = nodes["ImageScale"]["widgets_values"][:-1]
    frame = wl.bounds(doctored)
    doctored["extra"]["ds"]["offset"] = [-frame.left, -frame.top]
    return doctored


@pytest.fixture(scope="module")
def frontend_problems() -> list[str]:
    comfyui = os.environ.get("COMFYUI_PATH")
    try:
        import comfy_frontend
    except ImportError as error:  # aiohttp: ComfyUI's requirements
        pytest.skip(f"this Python lacks ComfyUI's requirements ({error})")
    reason = comfy_frontend.environment_problem(Path(comfyui) if comfyui else None)
    if reason:
        pytest.skip(reason)
    import check_frontend

    workflows = [(p.name, wt.load_json(p)) for p in wt.workflow_files()]
    workflows.append((DOCTORED, _doctored(workflows[0][1])))
    return check_frontend.run_checks(Path(comfyui), workflows)


def test_every_workflow_template_and_help_page_is_clean_in_the_frontend(frontend_problems):
    assert [p for p in frontend_problems if not p.startswith(DOCTORED)] == []


def test_the_check_sees_an_unknown_node_a_changed_widget_value_and_a_hidden_note(frontend_problems):
    found = [p for p in frontend_problems if p.startswith(f"{DOCTORED} (installed)")]
    expected = ["node types the frontend does not know: ['ADNoSuchNode']",
                "(ImageScale): widget values saved ['lanczos', 512, 512], the frontend holds "
                "['lanczos', 512, 512, 'disabled']",
                "corners hidden under the side or tool bars when the file opens: {'note': "]
    for text in expected:
        assert any(text in p for p in found), (text, found)
