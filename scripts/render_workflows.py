"""Render the README's pictures in ComfyUI's real frontend, in headless Chromium.

    python scripts/render_workflows.py [--comfyui /path/to/ComfyUI] [--only SLUG ...]

Run it with the Python that runs that ComfyUI (frontend 1.48, ComfyUI v0.33.0); it needs `chromium` on
the PATH (scripts/headless_chromium.py drives it with ComfyUI's aiohttp). It starts ComfyUI with this
pack, the models in place as empty files and the example images in input/ (scripts/comfy_frontend.py),
loads each workflow as a dropped file is loaded, fails on anything scripts/check_frontend.py finds
wrong with it (an unknown node, a resized node, a changed widget value, a toast, a console error), and
writes docs/images/workflows/<slug>.png: the whole graph at 100 %, at most MAX_WIDTH pixels wide.
Without --only it also writes docs/images/templates-browser.png (the Templates browser on this pack,
failing unless every workflow is there with its picture) and docs/images/help-sidebar.png (the node
Info panel on Latent AD Optimize).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import check_frontend
import comfy_frontend as cf
from headless_chromium import Chromium
from PIL import Image

DEFAULT_OUT = cf.REPO / "docs" / "images"
MAX_WIDTH = 1600  # pixels of the committed workflow pictures
SCALE = 1.0  # canvas zoom while rendering
MARGIN = 40
WINDOW = (1600, 1000)
TEMPLATES_WINDOW = (1600, 1800)  # the dialog tall enough for the pack's fifteen cards
HELP_WORKFLOW, HELP_NODE = "03 Texture synthesis by optimization, SD1.5.json", "LatentADOptimize"

FRAME = """
(box, scale, margin) => {
  const ds = app.canvas.ds;
  ds.scale = scale;
  ds.offset = [margin / scale - box[0], margin / scale - box[1]];
  app.canvas.deselectAll();
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const r = app.canvas.canvas.getBoundingClientRect();
  return [r.left, r.top];
}
"""

CENTRE_OF = """
(selector, text) => {
  const element = [...document.querySelectorAll(selector)].find(e => e.innerText.trim().startsWith(text));
  if (!element) return null;
  const r = element.getBoundingClientRect();
  return [r.left + r.width / 2, r.top + r.height / 2];
}
"""


def sort_by_name(browser: Chromium) -> bool:
    """Pick "A → Z" in the Templates browser's sort menu, as a user does."""
    for selector, text in (("[role=dialog] [role=combobox]", "Default"), ("[role=option]", "A \u2192 Z")):
        point = browser.call(CENTRE_OF, selector, text)
        if point is None:
            return False
        browser.click(*point)
        browser.pause(1.0)
    browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 1, "y": 1})  # no card hovered
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                        help="a full ComfyUI source tree (default: $COMFYUI_PATH)")
    parser.add_argument("--images", type=Path, default=cf.EXAMPLE_IMAGES,
                        help="folder with the input images the workflows name")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the PNGs go (workflows/ below it)")
    parser.add_argument("--only", nargs="*", default=None, help="workflow slugs (default: all, and the two others)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary ComfyUI base directory")
    args = parser.parse_args(argv)
    reason = cf.environment_problem(args.comfyui)
    if reason:
        parser.error(reason)
    return args


def load_clean(browser: Chromium, path: Path) -> dict:
    workflow = json.loads(path.read_text(encoding="utf-8"))
    report = cf.load_workflow(browser, workflow, path.name)
    problems = check_frontend.workflow_problems(workflow, report, installed=True)
    if problems:
        raise RuntimeError(f"{path.name} does not load clean:\n  " + "\n  ".join(problems))
    return report


def render(browser: Chromium, path: Path, out: Path) -> Path:
    """The whole graph at SCALE, MARGIN around it."""
    box = load_clean(browser, path)["box"]
    width = int((box[2] - box[0]) * SCALE) + 2 * MARGIN
    height = int((box[3] - box[1]) * SCALE) + 2 * MARGIN
    browser.resize(width, height)
    browser.pause(1.0)  # the canvas follows the window
    left, top = browser.call(FRAME, box, SCALE, MARGIN)
    browser.pause(1.5)  # image previews and DOM widgets settle
    target = out / f"{cf.workflow_tools.slug_of(path)}.png"
    shot = out / f".{target.stem}.full.png"
    browser.screenshot(shot, clip=(left, top, width, height))
    with Image.open(shot) as full:
        picture = full.convert("RGB")
    shot.unlink()
    if picture.width > MAX_WIDTH:
        picture = picture.resize((MAX_WIDTH, round(picture.height * MAX_WIDTH / picture.width)), Image.LANCZOS)
    picture.save(target, optimize=True)
    return target


def screenshot_templates_browser(server: cf.ComfyServer, browser: Chromium, out: Path) -> None:
    browser.resize(*TEMPLATES_WINDOW)
    browser.pause(1.0)
    problems = check_frontend.check_templates(server, browser, open_one=False)
    if problems:
        raise RuntimeError("Templates browser:\n  " + "\n  ".join(problems))
    if not sort_by_name(browser):
        print("  (could not sort the cards by name: shown in the server's order)")
    browser.pause(2.0)  # the pictures of the cards in view load again
    browser.screenshot(out / "templates-browser.png")
    browser.evaluate("adStores.get('dialog').closeDialog()")
    browser.resize(*WINDOW)
    browser.pause(1.0)


HELP = """
async (id, title) => {
  const node = app.graph.getNodeById(id);
  app.canvas.deselectAll();
  app.canvas.selectNode(node);
  adStores.get('rightSidePanel').openPanel('info');
  for (let waited = 0; waited < 30000; waited += 250) {
    const heading = document.querySelector('.node-help-content .markdown-content h1');
    if (heading && heading.textContent.trim() === title) return true;
    await new Promise(r => setTimeout(r, 250));
  }
  return false;
}
"""


def screenshot_help_panel(server: cf.ComfyServer, browser: Chromium, out: Path) -> None:
    """A workflow as it opens, one of the pack's nodes selected, its help in the node Info panel."""
    load_clean(browser, cf.WORKFLOWS / HELP_WORKFLOW)
    node = next(n["id"] for n in json.loads((cf.WORKFLOWS / HELP_WORKFLOW).read_text())["nodes"]
                if n["type"] == HELP_NODE)
    title = server.get_json(f"/object_info/{HELP_NODE}")[HELP_NODE]["display_name"]
    if not browser.call(HELP, node, title):
        raise RuntimeError(f"the help page of {HELP_NODE} did not render in the node Info panel")
    browser.pause(1.0)
    browser.screenshot(out / "help-sidebar.png")
    browser.evaluate("adStores.get('rightSidePanel').closePanel(); app.canvas.deselectAll()")
    browser.pause(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    paths = sorted(cf.WORKFLOWS.glob("*.json"))
    if args.only:
        paths = [p for p in paths if cf.workflow_tools.slug_of(p) in args.only]
    (args.out / "workflows").mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="ad-render-"))
    server = None
    try:
        cf.prepare_base(base)
        cf.install_models_and_images(base, [json.loads(p.read_text(encoding="utf-8")) for p in cf.WORKFLOWS.glob("*.json")],
                                     args.images)
        server = cf.ComfyServer(Path(args.comfyui), base)
        with Chromium(*WINDOW) as browser:
            cf.open_frontend(browser, server.url)
            if not args.only:
                screenshot_help_panel(server, browser, args.out)  # leaves a workflow of the pack open
                print(f"{args.out / 'help-sidebar.png'}")
                screenshot_templates_browser(server, browser, args.out)
                print(f"{args.out / 'templates-browser.png'}")
            browser.evaluate("app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
            browser.pause(1.0)
            for path in paths:
                target = render(browser, path, args.out / "workflows")
                with Image.open(target) as picture:
                    print(f"{target}: {picture.width}x{picture.height}")
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"rendered in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
