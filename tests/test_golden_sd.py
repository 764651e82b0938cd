"""Every SD output stays what it was: Latent AD Optimize and AD-guided sampling on fixed tiny SD1.5 and
SDXL weights equal the outputs recorded in tests/fixtures/golden_sd.safetensors (see golden_sd.py)."""

from __future__ import annotations

import pytest
import torch
from golden_sd import CASES, FIXTURE, compute, host_label

RTOL = 1e-6  # relative to the output's largest value; on the recording machine the match is exact


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    """This host's recorded outputs by case name."""
    from safetensors.torch import load_file

    prefix = host_label() + "/"
    recorded = {k[len(prefix):]: v for k, v in load_file(str(FIXTURE)).items() if k.startswith(prefix)}
    if not recorded:
        pytest.skip(f"no golden outputs recorded for {prefix[:-1]}; record them with tests/golden_sd.py on known-good code")
    return recorded


@pytest.mark.parametrize("family", list(CASES))
def test_outputs_equal_the_recorded_ones(pack, golden, family):
    outputs = compute(family)
    assert outputs, "no cases"
    for name, value in outputs.items():
        assert name in golden, f"{name} was never recorded"
        expected = golden[name]
        assert value.shape == expected.shape, name
        assert bool(torch.isfinite(value).all()), name
        error = float((value - expected).abs().max())
        scale = float(expected.abs().max())
        assert error <= RTOL * scale, f"{name}: max difference {error:.3g} against a largest value of {scale:.3g}"
    missing = {n for n in golden if n.startswith(family + "_")} - set(outputs)
    assert not missing, f"recorded outputs no case computes: {sorted(missing)}"
