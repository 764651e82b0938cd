"""The GPU check (scripts/gpu_check.py, docs/gpu-check.md) holds together without a GPU: its model files are
what ComfyUI detects as each family at full size, its writer writes valid safetensors, its prompts pass
ComfyUI's own validate_prompt with this pack loaded, its step timing survives ComfyUI's throttled progress
updates, and ComfyUI's modules import with PyAV stood in (the check does not carry it).

The check itself runs end to end on a CPU with `python scripts/gpu_check.py --cpu --tiny` (minutes: the
full-size T5-XXL it must build); these tests take seconds.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from gpucheck import graphs, models, report  # noqa: E402

COMFYUI = os.environ.get("COMFYUI_PATH")


def _has_execution() -> bool:
    if not COMFYUI or not (Path(COMFYUI) / "execution.py").is_file():
        return False
    try:
        import comfy.ldm.flux.model  # noqa: F401
        import execution  # noqa: F401
    except ImportError:
        return False
    return True


def _host_version() -> tuple[int, ...]:
    import comfyui_version

    return tuple(int(part) for part in comfyui_version.__version__.split(".")[:3])


requires_comfyui = pytest.mark.skipif(not _has_execution(), reason="needs a full ComfyUI tree (COMFYUI_PATH) whose "
                                      "execution.py imports with this Python")


def test_help_runs_without_comfyui():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--help"],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, COMFYUI_PATH=""))
    assert result.returncode == 0, result.stderr
    assert "--tiny" in result.stdout and "--budget" in result.stdout


def test_seconds_per_step_spans_first_to_last_update():
    # v0.33's ProgressBar sends the first and the last update and drops some in between.
    events = [(10.0, "executing", {"node": "20"}), (11.0, "progress", {"node": "20", "value": 1, "max": 6}),
              (11.5, "progress", {"node": "23", "value": 2, "max": 6}),
              (13.0, "progress", {"node": "20", "value": 3, "max": 6}),
              (16.0, "progress", {"node": "20", "value": 6, "max": 6})]
    assert report.seconds_per_step(events, "20") == pytest.approx(1.0)
    assert report.seconds_per_step(events[:2], "20") is None
    assert report.seconds_per_step(events, "24") is None


def test_report_ratios_are_against_the_familys_plain_sampling(tmp_path):
    rows = [report.Row("sd15", "plain", 512, 10, ok=True, step_seconds=0.5, memory={"torch_allocated": 2**30}),
            report.Row("sd15", "guided", 512, 10, ok=True, step_seconds=2.0, memory={"torch_allocated": 3 * 2**30}),
            report.Row("flux", "guided", 1024, 6, ok=False, error="boom")]
    text = report.write(tmp_path, rows, {"title": "t"})
    guided = next(line for line in text.splitlines() if line.startswith("| sd15 | guided"))
    assert "| 2.000 | 4.00 | 3.00 | 3.00 |" in guided
    assert "FAILED" in text and "boom" in text
    assert (tmp_path / "report.json").is_file()


def test_safetensors_writer_round_trips(tmp_path):
    from safetensors import safe_open

    spec = {"a.weight": torch.empty(64, 32, 3, 3, device="meta"), "a.bias": torch.empty(64, device="meta"),
            "norm.weight": torch.empty(32, device="meta"), "ids": torch.empty(1, 7, dtype=torch.int64, device="meta"),
            "real": torch.tensor([[1.5, -2.0]])}
    generator = torch.Generator().manual_seed(0)

    def make(name, template, probe=False):
        if probe:
            return template.dtype if template.device.type != "meta" or not template.dtype.is_floating_point \
                else torch.float8_e4m3fn
        return models.random_value(name, template, torch.float8_e4m3fn, generator, "cpu")

    path = tmp_path / "x.safetensors"
    size = models.write_safetensors(path, spec, make, {"ad_gpu_check_recipe": "abc"})
    assert size == path.stat().st_size
    with safe_open(str(path), "pt") as handle:
        values = {k: handle.get_tensor(k) for k in handle.keys()}
        assert handle.metadata()["ad_gpu_check_recipe"] == "abc"
    assert models.stored_recipe(path) == "abc"
    assert values["a.weight"].dtype == torch.float8_e4m3fn and values["a.weight"].shape == (64, 32, 3, 3)
    assert values["a.weight"].float().std().item() == pytest.approx((32 * 9) ** -0.5, rel=0.15)
    assert not values["a.bias"].float().any() and bool((values["norm.weight"].float() == 1).all())
    assert values["ids"].tolist() == [list(range(7))]
    assert values["real"].tolist() == [[1.5, -2.0]]


@requires_comfyui
@pytest.mark.parametrize("scale, expected", [("full", {"sd15": "SD15", "sdxl": "SDXL", "flux": "Flux"}),
                                             ("tiny", {"sd15": "SD15", "sdxl": "Segmind_Vega", "flux": "Flux"})])
def test_model_files_are_detected_as_their_family(scale, expected):
    """ComfyUI's detection names each file's family (FLUX.1-dev, with its guidance embedding), and the model it
    would build from the detected config has exactly the file's tensors; the text encoders are the ones
    DualCLIPLoader (type flux) expects."""
    import comfy.model_detection
    import comfy.ops
    import comfy.sd
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if scale == "tiny" and _host_version() < (0, 33):
        pytest.skip("the tiny FLUX.1 relies on v0.33's detection reading the width from img_in (older ComfyUI "
                    "fixes 3072); the check runs the ComfyUI v0.33.0 it carries")
    for kind, prefix in (("sd15", "model.diffusion_model."), ("sdxl", "model.diffusion_model."), ("flux", "")):
        spec, _ = models.spec_of(kind, scale)
        config = comfy.model_detection.model_config_from_unet(spec, prefix)
        assert type(config).__name__ == expected[kind], kind
        unet_config = {k: v for k, v in config.unet_config.items() if k not in ("image_model", "disable_unet_model_creation")}
        cls = Flux if kind == "flux" else UNetModel
        built = cls(**unet_config, device="meta", operations=comfy.ops.disable_weight_init)
        shapes = {prefix + k: tuple(v.shape) for k, v in built.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in spec.items() if k.startswith(prefix)}, kind
    assert models.spec_of("flux", scale)[1] == torch.float8_e4m3fn
    assert comfy.sd.detect_te_model(models.spec_of("clip_l", scale)[0]) == comfy.sd.TEModel.CLIP_L
    assert comfy.sd.detect_te_model(models.spec_of("t5xxl", scale)[0]) == comfy.sd.TEModel.T5_XXL


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    """ComfyUI's nodes with this pack and the check's probe loaded, and folders holding (empty) files under the
    check's model names."""
    import folder_paths
    import nodes

    work = tmp_path_factory.mktemp("gpu_check")
    for scale in ("full", "tiny"):
        for kind, folder in models.KINDS.items():
            target = work / "models" / folder
            target.mkdir(parents=True, exist_ok=True)
            (target / models.file_name(kind, scale)).touch()
            folder_paths.add_model_folder_path(folder, str(target), is_default=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(REPO)))
    assert asyncio.run(nodes.load_custom_node(str(REPO / "scripts" / "gpucheck" / "probe")))
    import execution

    return execution


@requires_comfyui
@pytest.mark.parametrize("scale", ["full", "tiny"])
@pytest.mark.parametrize("family", sorted(graphs.FAMILIES))
@pytest.mark.parametrize("mode", ["warmup", *graphs.MODES])
def test_prompts_pass_comfyuis_validation(validator, family, mode, scale):
    prompt = graphs.build_prompt(family, mode, scale)
    ok, error, outputs, node_errors = asyncio.run(validator.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert ok, (error, node_errors)
    assert graphs.progress_node(mode) in prompt
    assert graphs.steps_of(prompt, mode) >= 2  # two progress updates at least: seconds per step


@requires_comfyui
def test_comfyui_modules_import_with_pyav_stood_in():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import comfy_env; comfy_env.stand_in(['av']); "
            "comfy_env.boot(); import comfy_api.latest, comfy_api.latest._ui, comfy_extras.nodes_video; "
            "import av; assert type(av).__name__ == '_StandIn'")
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "tests")], capture_output=True, text=True,
                            timeout=300, cwd=COMFYUI)
    assert result.returncode == 0, result.stderr[-3000:]


@requires_comfyui
def test_pattern_node_makes_a_seeded_picture(validator):
    import nodes

    make = nodes.NODE_CLASS_MAPPINGS["ADGPUCheckPattern"]().make
    (image,) = make(96, 64, 0)
    assert image.shape == (1, 64, 96, 3) and 0 <= image.min() and image.max() <= 1
    assert image.std() > 0.1  # structure, not a flat colour
    assert torch.equal(make(96, 64, 0)[0], image) and not torch.equal(make(96, 64, 1)[0], image)
