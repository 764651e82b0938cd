"""Every SD output stays what it was: Latent AD Optimize and AD-guided sampling on fixed tiny SD1.5 and
SDXL weights equal the outputs recorded in tests/fixtures/golden_sd.safetensors (see golden_sd.py)."""

from __future__ import annotations

import pytest
import torch
from golden_sd import CASES, FIXTURE, compute, host_label

# Another CPU rounds float32 differently and these chaotic runs amplify it (an AMD EPYC moved
# sd15_optimize_masked by 2.1e-4 of 16 and sdxl_guided_euler_checkpointed by 2.4e-3 of 15.7). Each case is
# compared within SENSITIVITY_FACTOR times its float32 sensitivity: the largest change that moving every
# weight by one float32 rounding step (random signs, ROUNDING_SEEDS draws) makes to it. Adam turns some of
# those changes into discrete jumps (measured: 2.6e-6 from one draw, 1.9e-2 from another), so one draw is
# not enough. RTOL is the floor: on the recording machine the match is exact.
ROUNDING = 2.0**-23
ROUNDING_SEEDS = 3
SENSITIVITY_FACTOR = 10.0
RTOL = 1e-6  # relative to the output's largest value


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
    rounded = [compute(family, ROUNDING, seed) for seed in range(ROUNDING_SEEDS)]
    assert outputs, "no cases"
    for name, value in outputs.items():
        assert name in golden, f"{name} was never recorded"
        expected = golden[name]
        assert value.shape == expected.shape, name
        assert bool(torch.isfinite(value).all()), name
        error = float((value - expected).abs().max())
        scale = float(expected.abs().max())
        sensitivity = max(float((other[name] - value).abs().max()) for other in rounded)
        assert sensitivity < 0.01 * scale, f"{name}: one rounding step of the weights moved it by {sensitivity:.3g}"
        tolerance = max(SENSITIVITY_FACTOR * sensitivity, RTOL * scale)
        assert error <= tolerance, (f"{name}: max difference {error:.3g} against a largest value of {scale:.3g}; "
                                    f"float32 sensitivity {sensitivity:.3g}")
    missing = {n for n in golden if n.startswith(family + "_")} - set(outputs)
    assert not missing, f"recorded outputs no case computes: {sorted(missing)}"
