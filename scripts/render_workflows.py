"""Render a picture of every shipped workflow in the real ComfyUI frontend, in headless Chromium.

    python scripts/render_workflows.py --comfyui /path/to/ComfyUI [--images DIR] [--out DIR]

Run it with a Python that has ComfyUI's requirements (the frontend comes from the
`comfyui-frontend-package` of ComfyUI's requirements.txt) and `selenium`; it needs `chromium` and
`chromedriver` on the PATH (Debian: apt-get install chromium chromium-driver).

It starts that ComfyUI on a private port with a throw-away base directory: this pack linked into its
custom_nodes, empty placeholder files under the model names the workflows use (so the loaders show
them as present), the workflows' input images (taken from --images when a file of that name is
there, else generated), and settings that keep first-run dialogs away. Each workflow is loaded with
`app.loadGraphData`, exactly like a file dropped on the canvas; the script fails when the frontend
does not know a node type (a red node), and otherwise writes docs/images/workflows/<name>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import workflow_tools  # noqa: E402  (the workflows' slugs: the pictures' names)

WORKFLOWS = REPO / "workflows"
DEFAULT_OUT = REPO / "docs" / "images" / "workflows"
DEFAULT_IMAGES = REPO / "example-images"
MODEL_FOLDERS = {"ckpt_name": "checkpoints", "lora_name": "loras", "control_net_name": "controlnet"}
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Workflow.Persist": False,
    "Comfy.UseNewMenu": "Top",
    "Comfy.LinkRenderMode": 2,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Graph.CanvasInfo": False,
}
MAX_WIDTH = 1600  # pixels of the committed pictures
SCALE = 1.0  # canvas zoom while rendering
MARGIN = 40


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                        help="a full ComfyUI source tree (default: $COMFYUI_PATH)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder with the input images the workflows name (missing ones are generated)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the PNGs go")
    parser.add_argument("--only", nargs="*", default=None, help="workflow names (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary ComfyUI base directory")
    args = parser.parse_args(argv)
    if not args.comfyui or not (Path(args.comfyui) / "main.py").is_file():
        parser.error("--comfyui (or COMFYUI_PATH) must point at a full ComfyUI source tree")
    return args


def pack_folder_name() -> str:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for line in text.split("[project]", 1)[1].splitlines():
        if line.strip().startswith("name"):
            return line.split("=", 1)[1].strip().strip('"')
    return "attention-distillation"


def prepare_base(base: Path, workflows: list[Path], images: Path) -> None:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / pack_folder_name()).symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS), encoding="utf-8")
    for path in workflows:
        for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
            values = node.get("widgets_values") or []
            if node["type"] == "LoadImage":
                write_input_image(base / "input" / values[0], images)
            for value in values:
                if isinstance(value, str) and value.endswith(".safetensors"):
                    folder = next(m["directory"] for m in node["properties"]["models"] if m["name"] == value)
                    (base / "models" / folder).mkdir(parents=True, exist_ok=True)
                    (base / "models" / folder / value).touch()


def write_input_image(target: Path, images: Path) -> None:
    from PIL import Image, ImageDraw

    if target.exists():
        return
    if (images / target.name).is_file():
        shutil.copyfile(images / target.name, target)
        return
    picture = Image.new("RGB", (512, 512), (0, 0, 0))
    draw = ImageDraw.Draw(picture)
    if "labels" in target.name:  # a label map of a reference: three grey-level regions
        draw.rectangle([170, 0, 511, 511], fill=(128, 128, 128))
        draw.ellipse([260, 140, 480, 360], fill=(255, 255, 255))
    elif "layout" in target.name:  # a label map of a target layout: the same three levels, placed anew
        draw.rectangle([0, 0, 511, 255], fill=(128, 128, 128))
        draw.ellipse([136, 136, 376, 376], fill=(255, 255, 255))
    else:
        for i in range(16):
            draw.rectangle([i * 32, 0, i * 32 + 31, 511], fill=(40 + i * 12, 90 + (i * 37) % 120, 200 - i * 9))
        draw.ellipse([140, 140, 372, 372], fill=(230, 200, 60))
    picture.save(target)


def stand_in_torchvision() -> None:
    """Make every `import torchvision...` succeed with placeholder modules, unless the real one imports."""
    import importlib.abc
    import importlib.machinery
    import types

    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]

    class Placeholder(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return lambda *args, **kwargs: None

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Placeholder(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(comfyui: Path, base: Path, port: int) -> subprocess.Popen:
    arguments = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
                 "--disable-auto-launch"]
    # ComfyUI's main.py, after a stand-in for torchvision where PyPI's torchvision does not import beside
    # this torch: ComfyUI imports it only in model files the frontend does not need, but a node module
    # that fails to import leaves the frontend without that node (and 1.27's combo widgets then break).
    launcher = (f"import runpy, sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); "
                "import render_workflows; render_workflows.stand_in_torchvision(); "
                f"sys.argv = {arguments!r}; runpy.run_path('main.py', run_name='__main__')")
    command = [sys.executable, "-c", launcher]
    log = open(base / "comfyui.log", "w")
    process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited; see {base / 'comfyui.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info/LatentADOptimize", timeout=5) as r:
                if json.load(r):
                    return process
        except OSError:
            time.sleep(1)
    process.terminate()
    raise RuntimeError("ComfyUI did not start within 3 minutes")


def browser(width: int = 1920, height: int = 1200):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--force-device-scale-factor=1", "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


LOAD_SCRIPT = """
const [workflow, name, done] = arguments;
(async () => {
  await app.loadGraphData(workflow, true, true, name);
  await new Promise(r => setTimeout(r, 2500));
  const missing = workflow.nodes.map(n => n.type).filter(t => !LiteGraph.registered_node_types[t]);
  const resized = [];
  for (const node of app.graph._nodes) {
    const saved = workflow.nodes.find(n => n.id === node.id).size;
    if (Math.abs(node.size[0] - saved[0]) > 0.5 || Math.abs(node.size[1] - saved[1]) > 0.5)
      resized.push(`${node.title}: saved ${saved}, shown ${[node.size[0], node.size[1]]}`);
  }
  const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
  let box = [Infinity, Infinity, -Infinity, -Infinity];
  for (const node of app.graph._nodes) {
    box = [Math.min(box[0], node.pos[0]), Math.min(box[1], node.pos[1] - titleHeight),
           Math.max(box[2], node.pos[0] + node.size[0]), Math.max(box[3], node.pos[1] + node.size[1])];
  }
  done({missing, resized, box, count: app.graph._nodes.length});
})().catch(e => done({error: String(e && e.stack || e)}));
"""

FRAME_SCRIPT = """
const [box, scale, margin, top] = arguments;
const ds = app.canvas.ds;
ds.scale = scale;
ds.offset = [margin / scale - box[0], (margin + top) / scale - box[1]];
app.canvas.setDirty(true, true);
app.canvas.draw(true, true);
"""


def focus_mode(driver) -> None:
    """Hide the menu bar and side bars (the frontend's focus mode) so the canvas fills the window."""
    driver.execute_script("return app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
    time.sleep(1.0)


def render(driver, url: str, path: Path, out: Path) -> None:
    from PIL import Image

    workflow = json.loads(path.read_text(encoding="utf-8"))
    driver.set_script_timeout(60)
    result = driver.execute_async_script(LOAD_SCRIPT, workflow, path.name)
    if "error" in result:
        raise RuntimeError(f"{path.name}: the frontend could not load it: {result['error']}")
    if result["missing"]:
        raise RuntimeError(f"{path.name}: node types unknown to the frontend (red nodes): {result['missing']}")
    if result["resized"]:
        raise RuntimeError(f"{path.name}: the frontend resized nodes on load: {result['resized']}")
    box = result["box"]
    width = int((box[2] - box[0]) * SCALE) + 2 * MARGIN
    height = int((box[3] - box[1]) * SCALE) + 2 * MARGIN
    chrome = driver.execute_script("return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]")
    driver.set_window_size(width + chrome[0], height + chrome[1])
    time.sleep(1.5)
    driver.execute_script(FRAME_SCRIPT, box, SCALE, MARGIN, 0)
    time.sleep(1.5)
    left, top = driver.execute_script(
        "const r = document.querySelector('#graph-canvas').getBoundingClientRect(); return [r.left, r.top];")
    shot = out / f".{path.stem}.full.png"
    driver.save_screenshot(str(shot))
    with Image.open(shot) as full:
        right, bottom = min(int(left) + width, full.width), min(int(top) + height, full.height)
        picture = full.crop((int(left), int(top), right, bottom)).convert("RGB")
    shot.unlink()
    if picture.width > MAX_WIDTH:
        picture = picture.resize((MAX_WIDTH, round(picture.height * MAX_WIDTH / picture.width)), Image.LANCZOS)
    target = out / f"{workflow_tools.slug_of(path)}.png"
    picture.save(target, optimize=True)
    print(f"{target.relative_to(REPO) if target.is_relative_to(REPO) else target}: {result['count']} nodes, "
          f"{picture.width}x{picture.height}")


TEMPLATES_SCRIPT = """
const [pack, done] = arguments;
(async () => {
  await app.extensionManager.command.execute('Comfy.BrowseTemplates');
  await new Promise(r => setTimeout(r, 2500));
  const entry = [...document.querySelectorAll('.p-dialog li, .p-dialog a, .p-dialog button, .p-dialog span')]
    .find(e => e.textContent.trim() === pack);
  if (!entry) return done({error: 'no category ' + pack + ' in the Templates browser'});
  entry.click();
  await new Promise(r => setTimeout(r, 3000));
  const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map(card => {
    const picture = card.querySelector('img');
    return [card.dataset.testid.replace('template-workflow-', ''), !!picture && picture.naturalWidth > 0];
  });
  done({cards});
})().catch(e => done({error: String(e && e.stack || e)}));
"""

HELP_SCRIPT = """
const [node, done] = arguments;
(async () => {
  await app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
  await new Promise(r => setTimeout(r, 1500));
  const stores = document.getElementById('vue-app').__vue_app__.config.globalProperties.$pinia._s;
  stores.get('nodeHelp').openHelp(stores.get('nodeDef').nodeDefsByName[node]);
  await new Promise(r => setTimeout(r, 2500));
  const panel = document.querySelector('.side-bar-panel');
  done(panel ? panel.getBoundingClientRect().width : -1);
})().catch(e => done({error: String(e && e.stack || e)}));
"""


def screenshot_templates_browser(driver, out: Path) -> None:
    """The Templates browser on this pack's category: every workflow's card has its picture."""
    driver.set_window_size(1600, 3200)  # every card in view: pictures load when their card is seen
    time.sleep(1.0)
    result = driver.execute_async_script(TEMPLATES_SCRIPT, pack_folder_name())
    if "error" in result:
        raise RuntimeError(f"Templates browser: {result['error']}")
    names = [name for name, _ in result["cards"]]
    without = [name for name, shown in result["cards"] if not shown]
    if sorted(names) != sorted(p.stem for p in WORKFLOWS.glob("*.json")) or without:
        raise RuntimeError(f"Templates browser: cards {names}; without a picture: {without}")
    driver.set_window_size(1600, 1900)  # the pack's twelve cards in one picture
    time.sleep(2.0)
    driver.save_screenshot(str(out / "templates-browser.png"))
    print("Templates browser, in the order shown:\n  " + "\n  ".join(names))
    driver.execute_script("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}))")
    driver.find_element("tag name", "body").send_keys("\ue00c")  # Escape closes the dialog
    time.sleep(1.0)


def screenshot_help_sidebar(driver, out: Path, node: str = "LatentADOptimize") -> None:
    """The node library's help panel on one of this pack's nodes."""
    width = driver.execute_async_script(HELP_SCRIPT, node)
    if isinstance(width, dict):
        raise RuntimeError(f"help sidebar: {width['error']}")
    driver.save_screenshot(str(out / "help-sidebar.png"))
    print(f"help sidebar: {width:.0f} px wide")
    driver.execute_script("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")
    time.sleep(1.0)


def check_help_pages(port: int) -> None:
    """The node help pages are served where the frontend's help panel fetches them:
    /extensions/<custom node folder>/docs/<node type>.md."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=30) as response:
        info = json.load(response)
    ours = {name: entry for name, entry in info.items()
            if entry.get("python_module") == f"custom_nodes.{pack_folder_name()}"}
    if not ours:
        raise RuntimeError("the pack's nodes are not in /object_info")
    for name in ours:
        url = f"http://127.0.0.1:{port}/extensions/{pack_folder_name()}/docs/{name}.md"
        with urllib.request.urlopen(url, timeout=30) as response:
            if not response.read().startswith(b"# "):
                raise RuntimeError(f"{url} is not the help page")
    print(f"help pages served for {sorted(ours)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workflows = sorted(WORKFLOWS.glob("*.json"))
    if args.only:
        workflows = [p for p in workflows if workflow_tools.slug_of(p) in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="ad-render-"))
    process = None
    driver = None
    try:
        prepare_base(base, workflows, args.images)
        port = free_port()
        process = start_comfyui(Path(args.comfyui), base, port)
        url = f"http://127.0.0.1:{port}/"
        driver = browser()
        driver.get(url)
        deadline = time.time() + 120
        while not driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
            if time.time() > deadline:
                raise RuntimeError("the frontend did not come up within 2 minutes")
            time.sleep(1)
        time.sleep(3)
        check_help_pages(port)
        if not args.only:
            screenshot_templates_browser(driver, args.out.parent)
            screenshot_help_sidebar(driver, args.out.parent)
            driver.set_window_size(1920, 1200)
            time.sleep(1.0)
        focus_mode(driver)
        for path in workflows:
            render(driver, url, path, args.out)
    finally:
        if driver is not None:
            driver.quit()
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
