"""Every shipped workflow, the Templates browser and the node help pages in ComfyUI's real frontend.

    python scripts/check_frontend.py [--comfyui /path/to/ComfyUI] [--keep]

Run it with the Python that runs that ComfyUI (frontend 1.48, ComfyUI v0.33.0); it needs `chromium` on
the PATH and nothing else (scripts/headless_chromium.py drives it with ComfyUI's aiohttp). It starts
ComfyUI with this pack (scripts/comfy_frontend.py) and checks, as a user meets them:

1. Right after installing the pack (no models, no input images), each workflow loads with every node
   known and every widget value, size and link as saved; the frontend's Errors panel lists exactly the
   model files the workflow loads, each with its download link and folder, and exactly its input images.
2. With the models and images in place, each workflow loads clean: nothing missing, no toast (the
   frontend's schema check and link fixer run), no dialog, no console error.
3. GET /workflow_templates lists the workflows under the pack's folder name; the Templates browser shows
   them under Extensions with their pictures (`workflows/<name>.jpg`), and one opens from there as saved.
4. Each node's help page is served at /extensions/<pack>/docs/<node>.md and renders in the node Info
   panel with its title and one item per input. The frontend first asks for
   /docs/<node>/<locale>.md; that one 404 is the only console error it may log there.

Exits 1 and lists the problems if there are any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import comfy_frontend as cf
from headless_chromium import Chromium


def workflow_problems(workflow: dict, report: dict, installed: bool, absent: list[dict] = ()) -> list[str]:
    """What is wrong with how the frontend holds `workflow` after loading it; `installed`: the models and
    input images are in place (else the frontend must report exactly those as missing). The requests for
    the missing files of `absent` (the workflows loaded before it) may still fail in its console."""
    problems = []
    saved = {n["id"]: n for n in workflow["nodes"]}
    shown = {n["id"]: n for n in report["nodes"]}
    if sorted(saved) != sorted(shown):
        problems.append(f"nodes saved {sorted(saved)}, the frontend holds {sorted(shown)}")
    for node_id, node in saved.items():
        held = shown.get(node_id)
        if held is None:
            continue
        where = f"node {node_id} ({node['type']})"
        if held["type"] != node["type"] or held["mode"] != node.get("mode", 0):
            problems.append(f"{where}: the frontend holds type {held['type']}, mode {held['mode']}")
        if held["widgets_values"] != (node.get("widgets_values") or []):
            problems.append(f"{where}: widget values saved {node.get('widgets_values')}, "
                            f"the frontend holds {held['widgets_values']}")
        if any(abs(a - b) > 0.5 for a, b in zip(held["size"], node["size"])):
            problems.append(f"{where}: resized on load from {node['size']} to {held['size']}")
    if report["links"] != workflow["links"]:
        problems.append("links differ from the saved ones")
    if report["missingNodes"]:
        problems.append(f"node types the frontend does not know: {report['missingNodes']}")
    expected_models = set() if installed else set(cf.model_files(workflow))
    missing_models = {(m["directory"], m["name"], m["url"]) for m in report["missingModels"]}
    if missing_models != expected_models:
        problems.append(f"missing models listed {sorted(missing_models, key=str)}, "
                        f"expected {sorted(expected_models, key=str)}")
    problems += [f"model {name} has no download link" for _, name, url in expected_models if not url]
    expected_media = set() if installed else set(cf.input_images(workflow))
    if set(report["missingMedia"]) != expected_media:
        problems.append(f"missing input images listed {report['missingMedia']}, expected {sorted(expected_media)}")
    if report["errorPanel"] != bool(expected_models or expected_media):
        problems.append(f"Errors panel {'open' if report['errorPanel'] else 'closed'}")
    hidden = {part: count for part, count in report["hiddenCorners"].items()
              if count and (part == "note" or not report["errorPanel"])}  # the panel lies over the graph
    if hidden:
        problems.append(f"corners hidden under the side or tool bars when the file opens: {hidden}")
    problems += [f"toast: {toast}" for toast in report["toasts"]]
    problems += [f"dialog: {key}" for key in report["dialogs"]]
    allowed = [] if installed else missing_file_errors([workflow, *absent])
    problems += [f"console: {e}" for e in report["errors"] if not any(p.search(e) for p in allowed)]
    return problems


def missing_file_errors(workflows: list[dict]) -> list[re.Pattern]:
    """The console errors a user sees while these workflows' models and images are not installed: the Load
    Image previews of the images (404), and the download links, which the Errors panel asks for the
    files' sizes (unreachable offline)."""
    images = {name for workflow in workflows for name in cf.input_images(workflow)}
    hosts = {url.split("/")[2] for workflow in workflows for _, _, url in cf.model_files(workflow) if url}
    return ([re.compile(r"404 .*/api/view\?type=input&filename=" + re.escape(name) + "&") for name in images]
            + [re.compile(r"net::ERR_\w+ \(https://" + re.escape(host) + "/") for host in hosts])


def check_workflows(browser: Chromium, workflows: list[tuple[str, dict]], installed: bool,
                    log=print) -> list[str]:
    problems = []
    for index, (name, workflow) in enumerate(workflows):
        report = cf.load_workflow(browser, workflow, name)
        found = workflow_problems(workflow, report, installed, [w for _, w in workflows[:index]])
        problems += [f"{name} ({'installed' if installed else 'fresh'}): {p}" for p in found]
        log(f"  {name}: {len(report['nodes'])} nodes, {len(report['missingModels'])} missing models, "
            f"{len(report['missingMedia'])} missing images, {len(found)} problems")
    return problems


TEMPLATES = """
async (pack) => {
  const pause = ms => new Promise(r => setTimeout(r, ms));
  await app.extensionManager.command.execute('Comfy.BrowseTemplates');
  let dialog = null, entry = null;
  for (let waited = 0; waited < 30000 && !entry; waited += 250) {  // the first opening loads the lists
    await pause(250);
    dialog = document.querySelector('[role=dialog]');
    entry = dialog && [...dialog.querySelectorAll('*')].find(
      e => e.children.length === 0 && e.textContent.trim() === pack);
  }
  if (!entry) return {error: `no category ${pack} in the Templates browser`};
  entry.click();
  await pause(2000);
  const cards = [...dialog.querySelectorAll('[data-testid^="template-workflow-"]')];
  const shown = [];
  for (const card of cards) {  // pictures load when their card is in view, and unload when it leaves
    card.scrollIntoView({block: 'center'});
    let picture = null;
    for (let waited = 0; waited < 10000 && !(picture && picture.complete && picture.naturalWidth); waited += 100) {
      await pause(100);
      picture = card.querySelector('img');
    }
    const fallback = !picture || !picture.src.startsWith('blob:');  // the frontend's default picture
    shown.push([card.dataset.testid.replace('template-workflow-', ''), fallback ? 0 : picture.naturalWidth]);
  }
  cards[0].scrollIntoView({block: 'center'});
  await pause(1000);
  return {cards: shown};
}
"""

OPEN_TEMPLATE = """
async (name) => {
  document.querySelector(`[data-testid="template-workflow-${name}"]`).click();
  await new Promise(r => setTimeout(r, 2500));
  return adGraphReport();
}
"""


def check_templates(server: cf.ComfyServer, browser: Chromium, log=print, open_one: bool = True) -> list[str]:
    """The pack's workflows in GET /workflow_templates and in the Templates browser, with pictures.
    Leaves the browser open on the pack's category unless `open_one` opens its first workflow."""
    pack, files = cf.pack_folder_name(), sorted(cf.WORKFLOWS.glob("*.json"))
    problems = []
    listed = server.get_json("/workflow_templates").get(pack, [])
    if sorted(listed) != [p.stem for p in files]:
        problems.append(f"/workflow_templates lists {sorted(listed)} for {pack}")
    for path in files:
        picture, kind = server.get(f"/api/workflow_templates/{pack}/{path.stem}.jpg")
        if kind != "image/jpeg" or picture != path.with_suffix(".jpg").read_bytes():
            problems.append(f"{path.stem}.jpg is not served as the Templates picture ({kind})")
    browser.errors.clear()
    shown = browser.call(TEMPLATES, pack)
    if "error" in shown:
        return problems + [f"Templates browser: {shown['error']}"]
    names = [name for name, _ in shown["cards"]]
    if sorted(names) != [p.stem for p in files]:
        problems.append(f"Templates browser shows {names}")
    from PIL import Image

    widths = {p.stem: Image.open(p.with_suffix(".jpg")).width for p in files}
    problems += [f"Templates browser: {name} shows no picture of its own" for name, width in shown["cards"]
                 if width != widths.get(name)]
    log(f"  Templates browser, {pack}: {len(names)} cards, "
        f"{sum(1 for _, width in shown['cards'] if width)} with their picture")
    if open_one:
        first = files[0]
        report = browser.call(OPEN_TEMPLATE, first.stem)
        report["errors"] = list(browser.errors)
        found = workflow_problems(json.loads(first.read_text(encoding="utf-8")), report, installed=True)
        problems += [f"{first.stem} opened from the Templates browser: {p}" for p in found]
        log(f"  opened {first.stem} from the Templates browser: {len(found)} problems")
    return problems


HELP = """
async (type, title) => {
  const pause = ms => new Promise(r => setTimeout(r, ms));
  app.canvas.deselectAll();
  const node = LiteGraph.createNode(type);
  app.graph.add(node);
  app.canvas.selectNode(node);
  adStores.get('rightSidePanel').openPanel('info');  // what the selection toolbox's Info button does
  for (let waited = 0; waited < 30000; waited += 250) {
    const content = document.querySelector('.node-help-content');
    const heading = content && content.querySelector('.markdown-content h1');
    if (content && content.querySelector('.fallback-content')) return {fallback: content.innerText.slice(0, 300)};
    if (heading && heading.textContent.trim() === title) {
      const inputs = [...content.querySelectorAll('h2')].find(h => h.textContent.trim() === 'Inputs');
      const list = inputs && inputs.nextElementSibling;
      return {title: heading.textContent.trim(),
              inputs: list ? [...list.children].map(item => item.querySelector('code')?.textContent) : []};
    }
    await pause(250);
  }
  return {timeout: document.querySelector('.node-help-content')?.innerText.slice(0, 300) ?? 'no help panel'};
}
"""


def check_help(server: cf.ComfyServer, browser: Chromium, log=print) -> list[str]:
    """Each node's help page is served and renders in the node Info panel."""
    pack = cf.pack_folder_name()
    info = server.get_json("/object_info")
    ours = {name: entry for name, entry in info.items() if entry.get("python_module") == f"custom_nodes.{pack}"}
    problems = [] if ours else ["the pack's nodes are not in /object_info"]
    browser.call("async () => { await app.loadGraphData({nodes: [], links: [], version: 0.4}, true, false); }")
    for name, entry in sorted(ours.items()):
        page, _ = server.get(f"/extensions/{pack}/docs/{name}.md")
        if page != (cf.REPO / "web" / "docs" / f"{name}.md").read_bytes():
            problems.append(f"{name}: /extensions/{pack}/docs/{name}.md is not web/docs/{name}.md")
        browser.errors.clear()
        shown = browser.call(HELP, name, entry["display_name"])
        order = entry["input_order"]
        expected = order.get("required", []) + order.get("optional", [])
        if shown.get("title") != entry["display_name"] or shown.get("inputs") != expected:
            problems.append(f"{name}: the Info panel shows {shown}, expected the page of {expected}")
        locale_probe = re.compile(rf"404 .*/extensions/{re.escape(pack)}/docs/{name}/[a-z-]+\.md")
        problems += [f"{name} help, console: {e}" for e in browser.errors if not locale_probe.search(e)]
    browser.evaluate("adStores.get('rightSidePanel').closePanel()")
    log(f"  help pages: {len(ours)} nodes")
    return problems


def run_checks(comfyui: Path, workflows: list[tuple[str, dict]], log=print, keep: bool = False) -> list[str]:
    """All of the module docstring's checks on `workflows` ((file name, contents) pairs); the problems."""
    base = Path(tempfile.mkdtemp(prefix="ad-frontend-"))
    started = time.monotonic()
    problems: list[str] = []
    server = None
    try:
        cf.prepare_base(base)
        server = cf.ComfyServer(Path(comfyui), base)
        log(f"ComfyUI up in {time.monotonic() - started:.0f} s (frontend {cf.frontend_version()})")
        with Chromium(1600, 1000) as browser:
            cf.open_frontend(browser, server.url)
            startup = [e for e in browser.errors if f"/extensions/{cf.pack_folder_name()}/" in e]
            problems += [f"frontend start, console: {e}" for e in startup]
            log("right after installing the pack (no models, no input images):")
            problems += check_workflows(browser, workflows, installed=False, log=log)
            cf.install_models_and_images(base, [w for _, w in workflows])
            cf.open_frontend(browser, server.url)  # the model lists are read when the page opens
            log("with the models and input images in place:")
            problems += check_workflows(browser, workflows, installed=True, log=log)
            problems += check_templates(server, browser, log=log)
            problems += check_help(server, browser, log=log)
    except Exception:
        if server is not None:
            log(f"ComfyUI's log ends:\n{server.log_tail()}")
        raise
    finally:
        if server is not None:
            server.stop()
        if keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    log(f"checked in {time.monotonic() - started:.0f} s")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                        help="a full ComfyUI source tree (default: $COMFYUI_PATH)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary ComfyUI base directory")
    args = parser.parse_args(argv)
    reason = cf.environment_problem(args.comfyui)
    if reason:
        parser.error(reason)
    workflows = [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(cf.WORKFLOWS.glob("*.json"))]
    problems = run_checks(args.comfyui, workflows, keep=args.keep)
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
