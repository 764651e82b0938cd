"""ComfyUI's server as a user runs it (`python main.py`, through scripts/gpucheck/launch.py), and a client of its
HTTP and websocket API: POST /prompt, the events of the run, GET /history."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent / "launch.py"


@dataclass
class PromptRun:
    """What one prompt did: its events (receive time, type, data), outcome and wall time."""

    prompt_id: str | None = None
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0
    events: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """One ComfyUI server process on 127.0.0.1, its output in `log_path`."""

    def __init__(self, python: str, comfy_dir: Path, main_args: list[str], log_path: Path, cpu: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [python, str(LAUNCH), "server", str(comfy_dir), *(["--cpu"] if cpu else []), "--",
                        "--listen", "127.0.0.1", "--port", str(self.port), *main_args]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        """Start and wait until /system_stats answers; returns the seconds it took."""
        started = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting:\n"
                                   + self.log_tail())
            try:
                self.get("/system_stats", timeout=5)
                return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n" + self.log_tail())

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
        return json.loads(text) if text else None

    def get(self, path: str, timeout: float = 60):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: dict, timeout: float = 60):
        return self.request("POST", path, body, timeout=timeout)

    def free_memory(self) -> None:
        """Ask ComfyUI to unload every model and drop its caches (the /free route), then give it a moment."""
        self.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(3)

    def run_prompt(self, prompt: dict, timeout: float) -> PromptRun:
        return asyncio.run(self._run_prompt(prompt, timeout))

    async def _run_prompt(self, prompt: dict, timeout: float) -> PromptRun:
        import aiohttp

        run = PromptRun()
        client_id = uuid.uuid4().hex
        started = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as socket_:
                async with session.post(f"{self.url}/prompt",
                                        json={"prompt": prompt, "client_id": client_id}) as response:
                    body = await response.json(content_type=None)
                if response.status != 200 or "prompt_id" not in body:
                    run.error = f"prompt rejected (HTTP {response.status}): {json.dumps(body)[:4000]}"
                    return run
                run.prompt_id = body["prompt_id"]
                run.error = await self._follow(socket_, run, started + timeout)
        run.seconds = time.perf_counter() - started
        if run.error is None:
            run.outputs, run.error = self._history(run.prompt_id)
        run.ok = run.error is None
        return run

    async def _follow(self, socket_, run: PromptRun, deadline: float) -> str | None:
        """Record the prompt's events until it ends; the error text, or None on success."""
        import aiohttp

        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                self.post("/interrupt", {})
                return "timed out; interrupted"
            try:
                message = await socket_.receive(timeout=remaining)
            except asyncio.TimeoutError:
                continue
            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                return "the websocket closed (did the server exit?)"
            if message.type != aiohttp.WSMsgType.TEXT:
                continue  # binary previews
            event = json.loads(message.data)
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") not in (None, run.prompt_id):
                continue
            run.events.append((time.perf_counter(), kind, data))
            if kind == "execution_error":
                return (f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                        f"{data.get('exception_message')}\n{''.join(data.get('traceback') or [])}")
            if kind == "execution_interrupted":
                return "interrupted"
            if kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                               and data.get("prompt_id") == run.prompt_id):
                return None

    def _history(self, prompt_id: str) -> tuple[dict, str | None]:
        for _ in range(50):
            entry = (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str") not in (None, "success"):
                    return entry.get("outputs") or {}, f"history status {status.get('status_str')}: {status}"
                return entry.get("outputs") or {}, None
            time.sleep(0.2)
        return {}, "the prompt is missing from /history"
