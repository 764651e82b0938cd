from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_env import boot  # noqa: E402

boot()

from pack_loader import load_pack  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is faster than two, and CI has two cores


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models are dominated by per-op overhead, so one thread is
    several times faster than two on a loaded 2-core CI machine (measured), and results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory):
    """Path of the SD15-detectable random checkpoint and its LoRA."""
    from checkpoints import write_sd15_checkpoint, write_sd15_lora

    folder = tmp_path_factory.mktemp("ckpt")
    return write_sd15_checkpoint(folder / "tiny_sd15.safetensors"), write_sd15_lora(folder / "tiny_sd15_lora.safetensors")
