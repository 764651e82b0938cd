"""A full ComfyUI with this pack, and its frontend in headless Chromium: what scripts/check_frontend.py,
scripts/render_workflows.py and tests/test_frontend.py share.

The server runs ComfyUI's own `main.py` (--cpu, a free localhost port) on a throw-away base directory:
this pack linked into its custom_nodes, every model folder the workflows read (empty until
`install_models_and_images` puts empty files under the model names the workflows use and their input
images in input/, as a user does after the README's download table), and user settings that keep
first-run dialogs away. Written against frontend 1.48 (ComfyUI v0.33.0): it reads the frontend's own
stores (missing nodes, models and media, toasts, dialogs) the way its Errors panel does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import workflow_tools  # noqa: E402  (the model folders of the loader widgets, the workflows' names)

from headless_chromium import Chromium  # noqa: E402

WORKFLOWS = REPO / "workflows"
EXAMPLE_IMAGES = REPO / "example-images"
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.Persist": False,  # no tabs restored from an earlier session
    "Comfy.Validation.Workflows": True,  # the frontend's schema check and link fixer run on every load
    "Comfy.RightSidePanel.IsOpen": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.LinkRenderMode": 2,  # splines, the default
}
STARTUP_SECONDS = 240


def pack_folder_name() -> str:
    """The folder name the README installs the pack under: the frontend's name for the pack."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for line in text.split("[project]", 1)[1].splitlines():
        if line.strip().startswith("name"):
            return line.split("=", 1)[1].strip().strip('"')
    raise ValueError("pyproject.toml has no project name")


def model_files(workflow: dict) -> list[tuple[str, str, str | None]]:
    """(folder, file name, download link the node carries) of every model file the workflow loads."""
    folders = {node_type: folder for (node_type, _), folder in workflow_tools.FILE_COMBOS.items()}
    found: list[tuple[str, str, str | None]] = []
    for node in workflow["nodes"]:
        folder = folders.get(node["type"])
        links = {m["name"]: m.get("url") for m in (node.get("properties") or {}).get("models", [])}
        for value in node.get("widgets_values") or [] if folder else []:
            if isinstance(value, str) and value.endswith(".safetensors"):
                if (folder, value, links.get(value)) not in found:
                    found.append((folder, value, links.get(value)))
    return found


def input_images(workflow: dict) -> list[str]:
    return [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadImage"]


def prepare_base(base: Path) -> None:
    """A base directory as a user has it right after installing the pack: no models, no input images."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / pack_folder_name()).symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    for folder in set(workflow_tools.FILE_COMBOS.values()):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS), encoding="utf-8")


def install_models_and_images(base: Path, workflows: list[dict], images: Path = EXAMPLE_IMAGES) -> None:
    """Empty files under the model names the workflows load, and their input images (from `images`)."""
    for workflow in workflows:
        for folder, name, _ in model_files(workflow):
            (base / "models" / folder / name).touch()
        for name in input_images(workflow):
            if not (base / "input" / name).exists():
                shutil.copyfile(images / name, base / "input" / name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyServer:
    """ComfyUI's main.py on `base`, in this Python, after tests/comfy_env.py's stand-in for torchvision and
    torchaudio where those do not import (ComfyUI imports them only in model files the frontend never
    needs, but a node module that fails to import would leave the frontend without its nodes)."""

    def __init__(self, comfyui: Path, base: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "comfyui.log"
        arguments = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                     "--base-directory", str(base), "--disable-auto-launch"]
        if "--database-url" in (comfyui / "comfy" / "cli_args.py").read_text(encoding="utf-8"):
            arguments += ["--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]  # not in the tree
        launcher = (f"import runpy, sys; sys.path.insert(0, {str(REPO / 'tests')!r}); "
                    "import comfy_env; comfy_env.stub_torchvision(); "
                    f"sys.argv = {arguments!r}; runpy.run_path('main.py', run_name='__main__')")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-c", launcher], cwd=comfyui, stdout=log,
                                            stderr=subprocess.STDOUT)
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if "LatentADOptimize" in self.get_json("/object_info/LatentADOptimize"):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start within {STARTUP_SECONDS} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def get(self, path: str) -> tuple[bytes, str]:
        """The body and content type the server answers for `path` (an HTTPError on a failure)."""
        with urllib.request.urlopen(self.url + urllib.parse.quote(path, safe="/?=&"), timeout=60) as reply:
            return reply.read(), reply.headers.get("Content-Type", "")

    def get_json(self, path: str):
        return json.loads(self.get(path)[0])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# Installed once per page: a recorder of the frontend's toasts, and `adGraphReport()`, what the frontend
# holds after a load: the graph as it would save it, and what its Errors panel and dialogs show.
PROBES = """
(() => {
  const stores = document.getElementById('vue-app').__vue_app__.config.globalProperties.$pinia._s;
  window.adStores = stores;
  window.adToasts = [];
  stores.get('toast').$onAction(({name, args}) => {
    if (name === 'add' || name === 'addAlert') window.adToasts.push(JSON.stringify(args[0]));
  });
  window.adGraphReport = () => {
    const graph = app.graph.serialize();
    const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
    let box = [Infinity, Infinity, -Infinity, -Infinity];
    for (const node of app.graph._nodes) {
      box = [Math.min(box[0], node.pos[0]), Math.min(box[1], node.pos[1] - titleHeight),
             Math.max(box[2], node.pos[0] + node.size[0]), Math.max(box[3], node.pos[1] + node.size[1])];
    }
    // Which corners of the note and of the whole graph, in the view the file opened with, are hidden
    // under the side bar, the tab bar or a tool bar (corners outside the window are not counted).
    const area = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
    const hidden = (b) => [[b[0], b[1]], [b[2], b[1]], [b[0], b[3]], [b[2], b[3]]]
      .map(([x, y], i) => [area.left + (x + ds.offset[0]) * ds.scale + (i % 2 ? -3 : 3),
                           area.top + (y + ds.offset[1]) * ds.scale + (i < 2 ? 3 : -3)])
      .filter(([x, y]) => x >= 0 && y >= 0 && x < innerWidth && y < innerHeight
                          && document.elementFromPoint(x, y) !== app.canvas.canvas).length;
    const note = app.graph._nodes.find(n => n.type === 'Note');
    const noteBox = note && [note.pos[0], note.pos[1] - titleHeight, note.pos[0] + note.size[0], note.pos[1] + note.size[1]];
    const missingNodes = stores.get('missingNodesError').missingNodesError?.nodeTypes ?? [];
    return JSON.parse(JSON.stringify({
      nodes: graph.nodes.map(n => ({id: Number(n.id), type: n.type, mode: n.mode, size: n.size,
                                    widgets_values: n.widgets_values ?? []})),
      links: graph.links,
      missingNodes: missingNodes.map(n => typeof n === 'string' ? n : n.type),
      missingModels: (stores.get('missingModel').missingModelCandidates ?? []).map(
        m => ({name: m.name, directory: m.directory, url: m.url ?? null, node: m.nodeType})),
      missingMedia: (stores.get('missingMedia').missingMediaCandidates ?? []).map(m => m.name),
      toasts: window.adToasts.splice(0),
      dialogs: stores.get('dialog').dialogStack.map(d => d.key),
      errorPanel: stores.get('executionError').isErrorOverlayOpen,
      box,
      hiddenCorners: {note: noteBox ? hidden(noteBox) : 0, graph: hidden(box)},
    }));
  };
})()
"""

LOAD = """
async (workflow, name, settle) => {
  await app.loadGraphData(workflow, true, true, name);
  await new Promise(r => setTimeout(r, settle));
  return adGraphReport();
}
"""


def open_frontend(browser: Chromium, url: str, timeout: float = 120) -> None:
    """Open (or reopen) the frontend and wait until its graph and stores are up."""
    browser.open(url)
    deadline = time.monotonic() + timeout
    while not browser.evaluate("!!(window.app && window.app.graph && window.LiteGraph "
                               "&& document.getElementById('vue-app')?.__vue_app__)"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the frontend did not come up within {timeout:.0f} s")
        browser.pause(0.5)
    browser.pause(3)  # extensions, templates and settings finish loading
    browser.evaluate(PROBES)


def load_workflow(browser: Chromium, workflow: dict, name: str, settle: float = 2.0) -> dict:
    """Load a workflow as a file dropped on the canvas is loaded; what the frontend then holds
    (`adGraphReport`), with `errors`: what the page logged as errors meanwhile."""
    browser.errors.clear()
    report = browser.call(LOAD, workflow, name, int(settle * 1000))
    report["errors"] = list(browser.errors)
    return report


def frontend_version() -> str | None:
    """The comfyui-frontend-package of this Python (the one ComfyUI serves), if any."""
    from importlib import metadata

    try:
        return metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        return None


def environment_problem(comfyui: Path | None) -> str | None:
    """Why the frontend cannot be driven here, or None."""
    from headless_chromium import chromium_binary

    if comfyui is None or not (Path(comfyui) / "main.py").is_file():
        return "no full ComfyUI tree (COMFYUI_PATH or --comfyui)"
    if chromium_binary() is None:
        return "no chromium on the PATH (Debian: apt-get install chromium)"
    version = frontend_version()
    if version is None:
        return "this Python has no comfyui-frontend-package (ComfyUI's requirements)"
    if tuple(int(p) for p in version.split(".")[:2]) < (1, 48):
        return f"frontend {version}: these checks read the stores of frontend 1.48 (ComfyUI v0.33.0)"
    if os.name == "nt":
        return "the base directory links the pack into custom_nodes (a symlink)"
    return None
