"""The GPU check (docs/gpu-check.md): ComfyUI's own server as a user starts it (`main.py` with its defaults:
Dynamic VRAM on NVIDIA, comfy-kitchen kernels), this pack installed as a custom node, random-weight full-size
SD1.5, SDXL and FLUX.1-dev (fp8) built on the machine, and every AD mode run through the HTTP API: plain
sampling, AD Loss Guidance, Latent AD Optimize and AD Fine-Tune VAE Decoder per family. Prints seconds per step
and peak memory against plain sampling (report.md, report.json, server.log under --out) and exits 1 on any
error or non-finite result.

    bash scripts/gpu_check.sh                                  # the lent GPU machine: see docs/gpu-check.md
    python scripts/gpu_check.py --comfyui DIR --cpu --tiny     # a CPU rehearsal with tiny models at 64x64
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpucheck import graphs, models, report  # noqa: E402
from gpucheck.client import LAUNCH, Server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PACK_FOLDER = "comfyui-attention-distillation"
PROBE = Path(__file__).resolve().parent / "gpucheck" / "probe"
SKIPPED = "skipped: over the time budget"
MODEL_BYTES = {"full": 30 * 2**30, "tiny": 10 * 2**30}  # what the files of all three families take


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                        help="the ComfyUI tree to run (default: $COMFYUI_PATH)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs ComfyUI (default: this one)")
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu (torchvision/torchaudio stood in)")
    parser.add_argument("--tiny", action="store_true", help="tiny UNets at 64x64 and 3 steps, for a CPU rehearsal")
    parser.add_argument("--families", default="flux,sdxl,sd15", help="comma-separated, in the order run")
    parser.add_argument("--modes", default=",".join(graphs.MODES), help="comma-separated: " + ", ".join(graphs.MODES))
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT") or None,
                        help="where report.md, report.json and the logs go (default: $OUT, else a temporary folder)")
    parser.add_argument("--work", type=Path, help="ComfyUI's base directory and scratch (default: a temporary folder)")
    parser.add_argument("--models-dir", type=Path,
                        help="where the model files are built or reused (default: /dev/shm when it has room)")
    parser.add_argument("--prompt-timeout", type=float, help="seconds per prompt (default 300; 1800 with --tiny)")
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole check: later prompts are skipped, one still running when it ends "
                             "gets 30 s more (default 480; none with --tiny)")
    parser.add_argument("--server-args", default="", help="more arguments for main.py, e.g. --disable-dynamic-vram")
    args = parser.parse_args(argv)
    if args.comfyui is None or not (Path(args.comfyui) / "main.py").is_file():
        parser.error("--comfyui (or $COMFYUI_PATH) must name a ComfyUI tree with main.py")
    return args


def models_dir(args: argparse.Namespace, work: Path, scale: str) -> Path:
    if args.models_dir:
        return args.models_dir
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * MODEL_BYTES[scale]:
        return Path(tempfile.mkdtemp(prefix="ad-gpu-check-models-", dir=shm))
    return work / "models"


def build_models(args: argparse.Namespace, folder: Path, scale: str, families: list[str], log: Path) -> float:
    started = time.perf_counter()
    command = [args.python, str(LAUNCH), "build", str(args.comfyui), "--models-dir", str(folder), "--scale", scale,
               "--families", ",".join(families), *(["--cpu"] if args.cpu else [])]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            handle.write(line)
            if line.startswith(("ad-gpu-check", "built", "reusing")):
                print("  " + line.rstrip(), flush=True)
    if process.wait() != 0:
        raise RuntimeError(f"building the models failed (exit {process.returncode}); see {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-40:]))
    return time.perf_counter() - started


def prepare_base(base: Path, folder: Path) -> list[str]:
    """ComfyUI's base directory (custom nodes: the pack and the check's probe), the model paths file and an empty
    frontend; returns main.py's arguments for them."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", "frontend"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, target in ((PACK_FOLDER, REPO), ("ad_gpu_check_probe", PROBE)):
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    (base / "frontend" / "index.html").write_text("<!doctype html><title>API only</title>\n")
    paths = base / "extra_model_paths.yaml"
    folders = sorted(set(models.KINDS.values()))
    paths.write_text("ad_gpu_check:\n" + f"    base_path: {folder}\n" + "".join(f"    {f}: {f}\n" for f in folders))
    # The database's default path is the ComfyUI tree's user/ folder, which --base-directory does not move.
    return ["--base-directory", str(base), "--extra-model-paths-config", str(paths),
            "--front-end-root", str(base / "frontend"), "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]


def server_facts(server: Server) -> dict:
    """What the run was: versions and devices (/system_stats), and what ComfyUI's log says it enabled."""
    stats = server.get("/system_stats")
    system, devices = stats.get("system", {}), stats.get("devices", [])
    text = server.log_path.read_text(errors="replace")
    kitchen = re.findall(r"Found comfy_kitchen backend (\w+): \{'available': True", text)
    attention = re.findall(r"(Using [\w -]+ attention[^\n]*)", text)
    stood_in = re.findall(r"ad-gpu-check: standing in for ([^\n]+)", text)
    not_imported = re.findall(r"Cannot import (\S+) module for custom nodes", text)
    return {
        "ComfyUI": system.get("comfyui_version"), "Python": (system.get("python_version") or "").split()[0],
        "torch": system.get("pytorch_version"),
        "devices": "; ".join(f"{d.get('name')} ({(d.get('vram_total') or 0) / 2**30:.0f} GiB)" for d in devices),
        "Dynamic VRAM": "on" if "DynamicVRAM support detected and enabled" in text else "off",
        "comfy-kitchen backends available": ", ".join(kitchen) or "none",
        "attention": attention[-1] if attention else "?",
        "stood in for": stood_in[-1] if stood_in else "?",
        "node modules that failed to import": ", ".join(Path(m).name for m in not_imported) or "none",
    }


def latent_finite(output_dir: Path, outputs: dict) -> bool | None:
    """Whether the SaveLatent result of node 21 holds only finite values (None when there is none)."""
    files = (outputs.get("21") or {}).get("latents") or []
    if not files:
        return None
    import safetensors.torch

    entry = files[0]
    tensor = safetensors.torch.load_file(str(output_dir / entry.get("subfolder", "") / entry["filename"]))
    return bool(tensor["latent_tensor"].float().isfinite().all())


def run_mode(server: Server, family: str, mode: str, scale: str, timeout: float, output_dir: Path,
             seed: int) -> report.Row:
    prompt = graphs.build_prompt(family, mode, scale, seed=seed)
    row = report.Row(family, mode, graphs.FAMILIES[family].resolution[scale], graphs.steps_of(prompt, mode))
    server.post("/ad_gpu_check/reset", {})
    run = server.run_prompt(prompt, timeout)
    row.memory = {k: v for k, v in server.get("/ad_gpu_check/peak").items() if isinstance(v, (int, float))}
    row.ok, row.error, row.seconds = run.ok, run.error, run.seconds
    row.step_seconds = report.seconds_per_step(run.events, graphs.progress_node(mode))
    if run.ok and mode != "decoder":
        row.finite = latent_finite(output_dir, run.outputs)
    if run.ok and mode == "decoder" and not (run.outputs.get("26") or {}).get("images"):
        row.ok, row.error = False, "no decoded image from the fine-tuned VAE"
    return row


def judge(rows: list[report.Row]) -> None:
    """A non-finite AD result fails its row; non-finite plain sampling is the random weights' doing (noted), and
    then the family's AD results cannot be judged either."""
    plain = {row.family: row.finite for row in rows if row.mode == "plain"}
    for row in rows:
        if not row.ok or row.finite is not False:
            continue
        if row.mode in ("warmup", "plain"):
            row.note = "non-finite plain sampling: the random weights"
        elif plain.get(row.family) is False:
            row.note = "plain sampling is non-finite too: the random weights"
        else:
            row.ok, row.error = False, "the result has NaN or infinite values (plain sampling's is finite)"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    scale = "tiny" if args.tiny else "full"
    families, modes = args.families.split(","), args.modes.split(",")
    out = args.out or Path(tempfile.mkdtemp(prefix="ad-gpu-check-out-"))
    work = args.work or Path(tempfile.mkdtemp(prefix="ad-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    folder = models_dir(args, work, scale)
    timeout = args.prompt_timeout or (1800 if args.tiny else 300)
    budget = args.budget or (float("inf") if args.tiny else 480)
    print(f"GPU check: {scale} models in {folder}, output in {out}", flush=True)
    header = {"title": f"{scale} models", "models": str(folder)}
    server = Server(args.python, args.comfyui.resolve(), prepare_base(work / "base", folder)
                    + (["--cpu"] if args.cpu else []) + shlex.split(args.server_args), out / "server.log", args.cpu)
    rows: list[report.Row] = []
    problems: list[str] = []
    try:
        header["model build s"] = f"{build_models(args, folder, scale, families, out / 'build.log'):.0f}"
        header["server start s"] = f"{server.start(timeout=300):.0f}"
        header.update(server_facts(server))
        header["title"] = f"ComfyUI {header['ComfyUI']}, {header['devices']}, {scale} models"
        if "CaptureReferenceAttention" not in (server.get("/object_info/CaptureReferenceAttention") or {}):
            raise RuntimeError("the pack did not load:\n" + server.log_tail())
        if not args.cpu and "--disable-dynamic-vram" not in args.server_args and header["Dynamic VRAM"] != "on":
            problems.append("Dynamic VRAM is off although main.py's defaults turn it on on NVIDIA")
        for family in families:
            server.free_memory()
            for mode in ["warmup", *modes]:
                left = budget - (time.perf_counter() - started)
                if left <= 0:
                    rows.append(report.Row(family, mode, 0, 0, note=SKIPPED))
                    continue
                if server.process.poll() is not None:
                    rows.append(report.Row(family, mode, 0, 0, error="the server has exited"))
                    continue
                print(f"{family} {mode} ...", flush=True)
                row = run_mode(server, family, mode, scale, min(timeout, left + 30), work / "base" / "output",
                               seed=1 if mode == "warmup" else 0)
                if not row.ok and time.perf_counter() - started > budget:
                    row.note = SKIPPED + " (interrupted)"
                rows.append(row)
                judge(rows)
                print(f"  {report.summary(row)}", flush=True)
                header["elapsed s"] = f"{time.perf_counter() - started:.0f}"
                report.write(out, rows, header)
    except Exception as error:  # the check reports every failure in its table and exit code
        problems.append(f"{type(error).__name__}: {error}")
    finally:
        server.stop()
    header["elapsed s"] = f"{time.perf_counter() - started:.0f}"
    if problems:
        header["problems"] = " | ".join(problems)
    print(report.write(out, rows, header), flush=True)
    skipped = any(row.note.startswith(SKIPPED) for row in rows)
    failed = problems or any(not row.ok and not row.note.startswith(SKIPPED) for row in rows)
    print(f"GPU check {'FAILED' if failed else 'incomplete' if skipped else 'passed'}; report in {out}", flush=True)
    return 1 if failed else 2 if skipped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
