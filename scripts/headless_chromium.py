"""Headless Chromium driven over the Chrome DevTools Protocol, with nothing but ComfyUI's own `aiohttp`.

The frontend scripts and their test need a browser that runs the real frontend; this drives the
`chromium` of the system (Debian: `apt-get install chromium`) without selenium or chromedriver, so they
run in the Python that runs ComfyUI. Only what they use is here: open a page, run JavaScript (awaiting
promises), click, size the viewport, take screenshots, and collect what the page reports as errors.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--no-first-run", "--no-default-browser-check", "--mute-audio",
         "--remote-debugging-port=0")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class JavaScriptError(RuntimeError):
    """An exception thrown by JavaScript the driver ran (its message and stack)."""


class Chromium:
    """One headless Chromium with one page; `errors` collects the page's console errors and uncaught
    exceptions, each as text, in the order they happened."""

    def __init__(self, width: int = 1920, height: int = 1200, startup_seconds: float = 60) -> None:
        binary = chromium_binary()
        if binary is None:
            raise FileNotFoundError("no chromium on the PATH (Debian: apt-get install chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="ad-chromium-"))
        self.process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}",
                                         f"--window-size={width},{height}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        try:
            port = self._debugging_port(startup_seconds)
            self._run(self._connect(port))
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
            self.resize(width, height)
        except BaseException:
            self.close()
            raise

    def _debugging_port(self, startup_seconds: float) -> int:
        marker = self.profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode} on start")
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"chromium did not open its debugging port within {startup_seconds:.0f} s")

    def _run(self, coroutine):
        return self._loop.run_until_complete(coroutine)

    async def _connect(self, port: int) -> None:
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as reply:
            page = next(t for t in await reply.json() if t["type"] == "page")
        self._socket = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = self._loop.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._event(data["method"], data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("chromium closed the DevTools connection"))

    def _event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(" ".join(_remote_text(a) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(_exception_text(params["exceptionDetails"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"{entry['text']} ({entry.get('url', '')})".replace(" ()", ""))

    async def _send(self, method: str, params: dict, timeout: float) -> dict:
        self._next_id += 1
        future = self._loop.create_future()
        self._pending[self._next_id] = future
        await self._socket.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]

    def send(self, method: str, params: dict | None = None, wait: float = 60) -> dict:
        """One DevTools command; its result (waiting at most `wait` seconds)."""
        return self._run(self._send(method, params or {}, wait))

    def pause(self, seconds: float) -> None:
        """Wait while still taking the page's events in."""
        self._run(asyncio.sleep(seconds))

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression (a promise is awaited), as JSON gives it back."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "timeout": int(timeout * 1000)},
                           wait=timeout + 5)
        if "exceptionDetails" in result:
            raise JavaScriptError(_exception_text(result["exceptionDetails"]))
        return result["result"].get("value")

    def call(self, function: str, *arguments, timeout: float = 60):
        """`(function)(...arguments)` in the page, the arguments passed as JSON."""
        return self.evaluate(f"({function})(...{json.dumps(list(arguments))})", timeout=timeout)

    def click(self, x: float, y: float) -> None:
        """A left mouse click at viewport point (x, y), as a user's (pointer events included)."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 0 if kind == "mouseMoved" else 1})

    def resize(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def screenshot(self, path: Path, clip: tuple[float, float, float, float] | None = None) -> None:
        """A PNG of the viewport, or of the (x, y, width, height) part of the page."""
        params: dict = {"format": "png"}
        if clip is not None:
            params["clip"] = dict(zip(("x", "y", "width", "height"), clip)) | {"scale": 1}
        data = self.send("Page.captureScreenshot", params, wait=120)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if getattr(self, "_session", None) is not None:
                self._reader.cancel()
                self._run(self._session.close())
            self._loop.close()
        finally:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remote_text(value: dict) -> str:
    if "value" in value:
        return str(value["value"])
    return value.get("description") or value.get("unserializableValue") or value.get("type", "")


def _exception_text(details: dict) -> str:
    exception = details.get("exception") or {}
    return exception.get("description") or details.get("text", "exception")
