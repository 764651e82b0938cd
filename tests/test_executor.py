"""Every shipped workflow, run in ComfyUI's own PromptExecutor with this pack loaded as a custom node
(the Flux ones validated by ComfyUI but not run: see FLUX_SKIP).

Needs a full ComfyUI source tree (COMFYUI_PATH, kept outside this repository) and a Python with
ComfyUI's requirements; without them every test here is reported as skipped, with the reason.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -c tests/pytest.ini \
        tests/test_executor.py -s

The models are random-weight files (tests/executor_models.py) placed under the public file names the
workflows use, built once into a cache folder ($AD_TEST_CACHE, else ~/.cache/...); the input images
are the shipped examples (example-images). Each workflow runs at 64x64 (a wider texture at 128x64)
with 2 steps (2 epochs for the decoder fine-tune, 64-pixel windows that still make several windows):
the graph, the node wiring, the loaders, the text encoders, the VAE, ControlNet, LoRA and the pack's
nodes are all exercised for real; the pictures mean nothing.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import workflow_build
import workflow_tools as wt
from fixtures.make_object_info import CORE_TYPES, trim
from test_workflows import NAMES

SMALL = 64  # pixels: an 8x8 latent
STEPS = 2
EPOCHS = 2  # of AD Fine-Tune VAE Decoder
WINDOW, STRIDE = SMALL, SMALL // 2  # AD Texture Windows: a latent wider than SMALL gets several windows
SDXL_WORKFLOWS = {"06_sdxl_style_text_to_image_1024"}
# Why the Flux workflows are validated but not executed here. A random-weight Flux diffusion model that
# ComfyUI detects as FLUX.1-dev is affordable (detection fixes the width at 3072 and 24 heads and counts only
# the blocks: 1 double + 1 single block is 546M parameters, a 1.1 GB fp16 file that loads as Flux in about
# 3 s), and so are CLIP-L and the Flux VAE, but DualCLIPLoader (type flux)
# always builds the full T5-XXL from ComfyUI's fixed t5_config_xxl.json (24 blocks, d_model 4096, 4.7B
# parameters), whatever the file holds: a smaller file fails on the first mismatched shape (load_state_dict),
# and a file without T5 weights still allocates the whole model (9.5 GB in fp16, ComfyUI's text-encoder dtype
# on a CPU; 4.9 GB from an fp8 file) and then encodes 512 tokens through it, about 5 TFLOP per prompt. The
# Flux AD passes themselves run through ComfyUI's classes in tests/test_flux_*.py.
FLUX_SKIP = ("Flux workflow: DualCLIPLoader (type flux) always builds the full 4.7B-parameter T5-XXL "
             "(ComfyUI's t5_config_xxl.json), which a CI machine cannot hold or run; ComfyUI's validate_prompt "
             "checks the graph (test_flux_workflow_passes_comfyuis_validation), tests/test_workflows.py its settings, "
             "tests/test_flux_*.py the Flux AD passes through ComfyUI's classes")
FLUX_KINDS = ("flux-dev", "flux-clip-l", "flux-t5xxl", "flux-vae", "flux-lora")  # not built: see FLUX_SKIP
EXAMPLE_IMAGES = wt.REPO / "example-images"
CURVE_NODES = ("LatentADOptimize", "ADFineTuneVAEDecoder")  # output 1 is `loss_curve`
LOSS_CURVE_SIZE = (512, 320)  # what the loss-curve plots are drawn at


def _comfy_root() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    return Path(value).resolve() if value else None


class ServerStub:
    """What PromptExecutor and its progress handlers use of ComfyUI's PromptServer."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.events: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        pass


def _run(value):
    return asyncio.run(value) if asyncio.iscoroutine(value) else value


class Host:
    """ComfyUI booted in this process: folders, extra nodes, this pack, an executor."""

    def __init__(self, root: Path, work: Path) -> None:
        import execution
        import folder_paths
        import nodes

        self.root, self.work = root, work
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        self.timings: dict[str, float] = {}
        for sub in ("input", "output", "temp"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.set_input_directory(str(work / "input"))
        folder_paths.set_output_directory(str(work / "output"))
        folder_paths.set_temp_directory(str(work / "temp"))
        self.model_files = self._place_models()
        self._write_images()
        failed = _run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self.failed_extras = list(failed or [])
        self.loaded = _run(nodes.load_custom_node(str(wt.REPO)))
        self.server = ServerStub()
        # as main.py builds it with no cache flags and no RAM headroom (v0.33 reads cache_args on every prompt)
        self.executor = execution.PromptExecutor(self.server, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})

    def _place_models(self) -> dict[str, Path]:
        import executor_models

        placed = {}
        for folder, files in wt.MODEL_FILES.items():
            target = self.work / "models" / folder
            target.mkdir(parents=True, exist_ok=True)
            self.folder_paths.add_model_folder_path(folder, str(target), is_default=True)
            for name, kind in files.items():
                link = target / name
                if kind in FLUX_KINDS:  # a name for ComfyUI's validation to find, never loaded
                    link.touch()
                    placed[name] = link
                    continue
                if not link.exists():
                    link.symlink_to(executor_models.cached(kind))
                placed[name] = link
        return placed

    def _write_images(self) -> None:
        """Every image the workflows load, copied from example-images into input/ as the README says."""
        names = {v for path in wt.workflow_files() for n in wt.load_json(path)["nodes"] if n["type"] == "LoadImage"
                 for v in n["widgets_values"][:1]}
        missing = sorted(name for name in names if not (EXAMPLE_IMAGES / name).is_file())
        assert not missing, f"the workflows load images that example-images lacks: {missing}"
        for name in sorted(names):
            shutil.copyfile(EXAMPLE_IMAGES / name, self.work / "input" / name)

    def live_object_info(self, name: str) -> dict:
        """/object_info of a node type, as ComfyUI's server computes it (server.py node_info)."""
        return wt.live_object_info(self.nodes, name)

    def run(self, prompt: dict) -> tuple[bool, dict, list]:
        prompt_id = str(uuid.uuid4())
        valid = _run(self.execution.validate_prompt(prompt_id, prompt, None))
        ok, error, outputs, node_errors = valid
        if not ok:
            return False, {"error": error, "node_errors": node_errors}, []
        self.executor.execute(prompt, prompt_id, {"client_id": None}, outputs)
        messages = [m for m in self.executor.status_messages if m[0] == "execution_error"]
        result = getattr(self.executor, "history_result", {}).get("outputs", {})
        return self.executor.success, {"errors": messages}, result


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    root = _comfy_root()
    if root is None:
        pytest.skip("COMFYUI_PATH is not set: the executor tests need a full ComfyUI source tree")
    missing = [f for f in ("nodes.py", "execution.py", "folder_paths.py") if not (root / f).is_file()]
    if missing:
        pytest.skip(f"COMFYUI_PATH={root} is not a full ComfyUI tree (no {', '.join(missing)})")
    import comfy.model_management

    comfy_dir = Path(comfy.model_management.__file__).resolve().parent
    if comfy_dir.parent != root:
        pytest.skip(f"comfy was imported from {comfy_dir}, not from COMFYUI_PATH")
    try:
        import execution  # noqa: F401
        import folder_paths  # noqa: F401
        import nodes  # noqa: F401
    except ImportError as error:
        pytest.skip(f"ComfyUI's nodes.py does not import here ({error}); run with a Python that has "
                    "ComfyUI's requirements.txt installed")
    started = time.perf_counter()
    instance = Host(root, tmp_path_factory.mktemp("comfyui"))
    instance.timings["setup"] = time.perf_counter() - started
    yield instance
    version = _comfy_version(root)
    ran = {k: v for k, v in instance.timings.items() if k != "setup"}
    print(f"\nComfyUI {version} at {root}: {len(ran)} workflows ran in {sum(ran.values()):.0f} s "
          f"(setup {instance.timings['setup']:.0f} s)", file=sys.stderr)
    for name, seconds in ran.items():
        print(f"  {name}: {seconds:.1f} s", file=sys.stderr)


def _comfy_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text() if (root / "comfyui_version.py").is_file() else ""
    return text.split('"')[1] if '"' in text else "unknown version"


# -- the host sees what the validation tests assume --------------------------------------------------------

def test_pack_loads_through_comfyuis_loader(host, pack):
    assert host.loaded, "nodes.load_custom_node returned False"
    for name in pack.NODE_CLASS_MAPPINGS:
        cls = host.nodes.NODE_CLASS_MAPPINGS[name]
        assert Path(sys.modules[cls.__module__].__file__).resolve().is_relative_to(wt.REPO)
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS[name]


def test_help_pages_are_registered(host, pack):
    web = {Path(v).resolve() for v in host.nodes.EXTENSION_WEB_DIRS.values()}
    assert (wt.REPO / "web").resolve() in web
    for name in pack.NODE_CLASS_MAPPINGS:
        assert (wt.REPO / "web" / "docs" / f"{name}.md").is_file()


def test_core_fixture_matches_the_running_comfyui(host):
    for name in CORE_TYPES:
        assert name in host.nodes.NODE_CLASS_MAPPINGS, f"{name} is not a node of this ComfyUI"
    live = trim(json.loads(json.dumps({name: host.live_object_info(name) for name in CORE_TYPES})))
    import comfyui_version

    version = comfyui_version.__version__
    assert version in wt.HOST_OBJECT_INFO, f"no core schema fixture for ComfyUI {version}: tests/fixtures/make_object_info.py"
    fixture = wt.load_json(wt.HOST_OBJECT_INFO[version])
    for name in CORE_TYPES:
        a, b = live[name], copy.deepcopy(fixture[name])
        for entry in (a, b):  # file lists depend on the folders; the rest must agree
            for section in entry["input"].values():
                for input_name, spec in section.items():
                    if (name, input_name) in wt.FILE_COMBOS or (len(spec) > 1 and isinstance(spec[1], dict)
                                                                and spec[1].get("image_upload")):
                        spec[0] = []
            entry.pop("display_name", None)
        assert a == b, name


def test_core_titles_are_comfyuis_display_names(host):
    for name, title in workflow_build.CORE_TITLES.items():
        info = host.live_object_info(name)
        assert (info.get("display_name") or name) == title


# -- the workflows run ---------------------------------------------------------------------------------------

def small(prompt: dict) -> dict:
    """The same graph at 64x64 (the shorter side of an Empty Latent Image, keeping its aspect) with
    2 steps, 2 fine-tuning epochs and 64-pixel windows."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "ImageScale":
            inputs["width"] = inputs["height"] = SMALL
        if node["class_type"] == "EmptyLatentImage":
            shorter = min(inputs["width"], inputs["height"])
            inputs["width"], inputs["height"] = (inputs["width"] * SMALL // shorter, inputs["height"] * SMALL // shorter)
        if node["class_type"] in ("LatentADOptimize", "KSampler"):
            inputs["steps"] = STEPS
        if node["class_type"] == "ADFineTuneVAEDecoder":
            inputs["epochs"] = EPOCHS
        if node["class_type"] == "ADTextureWindows":
            inputs["window_size"], inputs["stride"] = WINDOW, STRIDE
    return prompt


def loss_curve_previews(prompt: dict) -> dict[str, str]:
    """Node id of each Latent AD Optimize / AD Fine-Tune VAE Decoder -> the Preview Image of its loss curve."""
    previews = {}
    for node_id, node in prompt.items():
        source = node["inputs"].get("images")
        if node["class_type"] == "PreviewImage" and isinstance(source, list):
            if prompt[source[0]]["class_type"] in CURVE_NODES and source[1] == 1:
                previews[source[0]] = node_id
    return previews


def output_size(prompt: dict) -> tuple[int, int]:
    """(width, height) of the saved images: the Empty Latent Image's, else the scaled photos'."""
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            return node["inputs"]["width"], node["inputs"]["height"]
    return SMALL, SMALL


def test_small_graphs_keep_what_the_workflows_exercise(pack):
    """Shrunk, a windowed workflow still has several windows, and the fine-tune still trains."""
    import importlib

    plan = importlib.import_module(f"{pack.__name__}.guidance.windows").plan_windows
    windows_node = pack.NODE_CLASS_MAPPINGS["ADTextureWindows"]()
    seen = set()
    for name in NAMES:
        prompt = small(wt.load_json(wt.workflow_path(name, api=True)))
        for node in prompt.values():
            inputs = node["inputs"]
            if node["class_type"] == "ADTextureWindows":
                (settings,) = windows_node.windows(inputs["window_size"], inputs["stride"])
                width, height = output_size(prompt)
                assert len(plan(height // 8, width // 8, settings)) > 1, name
                seen.add(node["class_type"])
            if node["class_type"] == "ADFineTuneVAEDecoder":
                assert inputs["epochs"] > 0 and inputs["lr"] > 0, name
                seen.add(node["class_type"])
    assert seen == {"ADTextureWindows", "ADFineTuneVAEDecoder"}


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_in_comfyuis_executor(host, name, pack):
    if "_flux_" in name:
        pytest.skip(FLUX_SKIP)
    ui = wt.load_json(wt.workflow_path(name))
    api = wt.ui_to_api(ui, wt.all_node_defs(pack))
    assert api == wt.load_json(wt.workflow_path(name, api=True))
    prompt = small(api)

    started = time.perf_counter()
    success, errors, outputs = host.run(prompt)
    host.timings[name] = time.perf_counter() - started
    assert success, json.dumps(errors, indent=1, default=str)[:6000]

    output_nodes = {k for k, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage")}
    assert output_nodes and output_nodes <= set(outputs), f"no results from {output_nodes - set(outputs)}"
    curves = loss_curve_previews(prompt)
    assert set(curves) == {k for k, v in prompt.items() if v["class_type"] in CURVE_NODES}, "an unwatched loss curve"
    from PIL import Image

    for node_id in output_nodes:
        images = outputs[node_id]["images"]
        assert images, f"node {node_id} wrote no image"
        for image in images:
            folder = host.work / image["type"] / image.get("subfolder", "")
            path = folder / image["filename"]
            assert path.is_file(), path
            with Image.open(path) as picture:
                assert picture.size == (LOSS_CURVE_SIZE if node_id in curves.values() else output_size(prompt))
                pixels = np.asarray(picture, dtype=np.float32)
                assert np.isfinite(pixels).all()
                if node_id in curves.values():  # a plot: axes, labels and lines, not a blank image
                    assert pixels.std() > 10, f"loss curve of node {node_id} is blank"
        if prompt[node_id]["class_type"] == "SaveImage":
            assert images[0]["type"] == "output" and images[0]["subfolder"] == "AD"


@pytest.mark.parametrize("name", [n for n in NAMES if "_flux_" in n])
def test_flux_workflow_passes_comfyuis_validation(host, name, pack):
    """ComfyUI's own validate_prompt accepts the Flux graphs as shipped: every node type, link type, widget
    value and model file name (placeholders under the public names; see FLUX_SKIP for why they do not run)."""
    api = wt.load_json(wt.workflow_path(name, api=True))
    ok, error, outputs, node_errors = _run(host.execution.validate_prompt(str(uuid.uuid4()), api, None))
    assert ok, json.dumps({"error": error, "node_errors": node_errors}, indent=1, default=str)[:4000]
    assert {k for k, v in api.items() if v["class_type"] in ("SaveImage", "PreviewImage")} <= set(outputs)


def _detected_config(path: Path):
    """ComfyUI's detection of a checkpoint from its tensor shapes only (meta tensors, no loading)."""
    import comfy.model_detection
    import safetensors
    import torch

    with safetensors.safe_open(str(path), framework="pt") as handle:
        state = {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()
                 if k.startswith("model.diffusion_model.")}
    return comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")


@pytest.mark.parametrize("ckpt_name,family", [(workflow_build.SD15, "SD15"), (workflow_build.SDXL, "SDXL")])
def test_checkpoints_are_detected_as_their_family(host, ckpt_name, family):
    import comfy.model_base
    import comfy.supported_models

    config = _detected_config(host.model_files[ckpt_name])
    assert isinstance(config, getattr(comfy.supported_models, family)), type(config).__name__
    model_class = {"SD15": comfy.model_base.BaseModel, "SDXL": comfy.model_base.SDXL}[family]
    assert type(config.get_model({}, "model.diffusion_model.", device="meta")) is model_class


def test_error_dialog_names_the_pack_not_its_folder(host):
    """The error ComfyUI sends the frontend names the exception type `attention_distillation.<Class>`,
    however the pack's folder is named, and starts with the node's name."""
    prompt = small(wt.load_json(wt.workflow_path("01_sd15_style_transfer", api=True)))
    capture = next(node for node in prompt.values() if node["class_type"] == "CaptureReferenceAttention")
    capture["inputs"]["layers"] = "99"
    success, errors, _ = host.run(prompt)
    assert not success
    (message,) = [data for _, data in errors["errors"]]
    assert message["exception_type"] == "attention_distillation.ADNodeError", message["exception_type"]
    assert message["exception_message"].startswith("[Capture Reference Attention] layer selection '99'")
