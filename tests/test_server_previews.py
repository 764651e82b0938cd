"""ComfyUI's real server delivers Latent AD Optimize's live previews and progress text over the websocket.

Starts `main.py` of the ComfyUI tree at COMFYUI_PATH in a subprocess on a free localhost port, with its own
temporary --base-directory (models, custom_nodes holding this pack, input, output, user), --cpu and
--preview-method latent2rgb; queues a prompt through /prompt and reads the websocket until the prompt is
done. The checkpoint is the random-weight SD1.5 file of tests/executor_models.py. Skipped, with the
reason, without COMFYUI_PATH or without ComfyUI's requirements in this Python.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -c tests/pytest.ini \
        tests/test_server_previews.py
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import workflow_tools as wt

STARTUP_SECONDS = 240
RUN_SECONDS = 300
STEPS = 12
CHECKPOINT = "tiny_sd15.safetensors"
PREVIEW_IMAGE, TEXT, PREVIEW_IMAGE_WITH_METADATA = 1, 3, 4  # protocol.BinaryEventTypes of ComfyUI
OPTIMIZE, CURVE = "7", "8"
# Runs main.py as `python main.py ...` would, after the torchvision stand-in of tests/comfy_env.py (only
# used where this Python's torchvision does not import, as for the in-process tests).
LAUNCHER = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); from comfy_env import stub_torchvision; "
    "stub_torchvision(); sys.argv = sys.argv[2:]; sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prompt() -> dict:
    """Reference photo → Capture → Latent AD Optimize (texture from an empty latent) → its loss curve."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "CaptureReferenceAttention",
              "inputs": {"model": ["1", 0], "reference": ["4", 0], "null_conditioning": ["2", 0],
                         "layers": "paper default"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        OPTIMIZE: {"class_type": "LatentADOptimize",
                   "inputs": {"model": ["1", 0], "reference": ["5", 0], "latent": ["6", 0], "steps": STEPS,
                              "lr": 0.05, "iterations": 1, "content_weight": 0.0, "seed": 0}},
        CURVE: {"class_type": "PreviewImage", "inputs": {"images": [OPTIMIZE, 1]}},
    }


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        pytest.skip("COMFYUI_PATH is not set: this test starts ComfyUI's own server from a full source tree")
    root = Path(value).resolve()
    if not (root / "main.py").is_file() or not (root / "server.py").is_file():
        pytest.skip(f"COMFYUI_PATH={root} is not a full ComfyUI tree (no main.py/server.py)")
    try:
        import aiohttp  # noqa: F401
        import executor_models
    except ImportError as error:
        pytest.skip(f"this Python lacks ComfyUI's requirements ({error})")
    from PIL import Image

    base = tmp_path_factory.mktemp("comfyui-base")
    for sub in ("models/checkpoints", "custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "models/checkpoints" / CHECKPOINT).symlink_to(executor_models.cached("sd15"))
    (base / "custom_nodes" / "attention_distillation").symlink_to(wt.REPO, target_is_directory=True)
    Image.new("RGB", (64, 64), (180, 90, 40)).save(base / "input" / "reference.png")
    port = free_port()
    log = open(base / "server.log", "w")  # noqa: SIM115 - closed below
    command = [sys.executable, "-c", LAUNCHER, str(Path(__file__).resolve().parent), str(root / "main.py"), "--base-directory", str(base), "--listen", "127.0.0.1",
               "--port", str(port), "--cpu", "--preview-method", "latent2rgb", "--disable-auto-launch",
               "--disable-api-nodes"]
    process = subprocess.Popen(command, cwd=base, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, base / "server.log")
        yield url, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/object_info/LatentADOptimize", timeout=5) as reply:
                if "LatentADOptimize" in json.load(reply):
                    return
                pytest.fail(f"the server runs without this pack's nodes:\n{log.read_text()[-4000:]}")
        except OSError:
            time.sleep(1)
    pytest.fail(f"ComfyUI did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


async def queue_and_listen(url: str, graph: dict) -> tuple[list[tuple[str | None, int, bytes]], list[dict]]:
    """Queue `graph` and read the websocket until it is done: (binary events with the node executing
    when they came, json messages)."""
    import aiohttp

    client_id = str(uuid.uuid4())
    binary: list[tuple[str | None, int, bytes]] = []
    messages: list[dict] = []
    running: str | None = None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
            async with session.post(f"{url}/prompt", json={"prompt": graph, "client_id": client_id}) as reply:
                body = await reply.json()
                assert reply.status == 200, body
            prompt_id = body["prompt_id"]
            deadline = time.monotonic() + RUN_SECONDS
            while time.monotonic() < deadline:
                message = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                if message.type == aiohttp.WSMsgType.BINARY:
                    (event,) = struct.unpack(">I", message.data[:4])
                    binary.append((running, event, message.data[4:]))
                elif message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    messages.append(data)
                    if data["type"] == "executing" and data["data"].get("prompt_id") == prompt_id:
                        running = data["data"]["node"]
                        if running is None:
                            return binary, messages
                    if data["type"] == "execution_error":
                        pytest.fail(json.dumps(data["data"], indent=1)[:4000])
                else:
                    pytest.fail(f"websocket closed: {message}")
    pytest.fail(f"the prompt did not finish within {RUN_SECONDS} s")


def test_queued_optimize_sends_previews_and_loss_text_while_it_runs(comfy_server):
    from PIL import Image

    url, base = comfy_server
    binary, messages = asyncio.run(queue_and_listen(url, prompt()))
    previews = [data for node, event, data in binary if node == OPTIMIZE and event in (PREVIEW_IMAGE,
                                                                                       PREVIEW_IMAGE_WITH_METADATA)]
    assert previews, f"no preview while Latent AD Optimize ran; binary events: {[(n, e) for n, e, _ in binary]}"
    for data in previews:
        (image_type,) = struct.unpack(">I", data[:4])
        assert image_type == 1  # JPEG
        with Image.open(io.BytesIO(data[4:])) as picture:
            assert picture.format == "JPEG" and picture.width == picture.height  # the 64x64 latent's preview
    texts = [data for _, event, data in binary if event == TEXT]
    on_node = []
    for data in texts:
        (length,) = struct.unpack(">I", data[:4])
        if data[4:4 + length].decode() == OPTIMIZE:
            on_node.append(data[4 + length:].decode())
    assert on_node and on_node[-1].startswith(f"step {STEPS}/{STEPS}\nAD loss "), on_node[-3:]
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == OPTIMIZE]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == STEPS
    (executed,) = [m["data"] for m in messages if m["type"] == "executed" and m["data"]["node"] == CURVE]
    (curve,) = executed["output"]["images"]
    with Image.open(base / curve["type"] / curve.get("subfolder", "") / curve["filename"]) as picture:
        assert picture.size == (512, 320)
    print(f"\n{len(previews)} previews and {len(on_node)} progress texts over {STEPS} steps", file=sys.stderr)
