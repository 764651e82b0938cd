"""Flux latent math: AdaIN on packed channels (the Flux family's `adain_view`/`adain_dims` through the
pack's `adain`, as guidance/guided_update.py applies it), as the reference code applies it to its packed
(B, tokens, 64) latent, and flow-matching noising as ComfyUI's CONST does it."""

from __future__ import annotations

import pytest
import torch


def _pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, 16, H, W) → (B, H/2·W/2, 64): tokens of 2×2 patches, channel = (c, row, column)."""
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)


def _unpack(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, c, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(shape)


def _reference_adain(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference code's AdaIN on packed latents: per sample over tokens, target over
    batch and tokens, unbiased std."""
    mean, std = source.mean(dim=1, keepdim=True), source.std(dim=1, keepdim=True)
    target_mean, target_std = target.mean(dim=(0, 1), keepdim=True), target.std(dim=(0, 1), keepdim=True)
    return (source - mean) / (std + eps) * target_std + target_mean


def packed_adain(latent: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The guided update's AdaIN on a Flux latent."""
    from attention_distillation_pack.attention.flux_family import FLUX
    from attention_distillation_pack.guidance.losses import adain

    view = adain(FLUX.adain_view(latent), FLUX.adain_view(reference.to(latent)), dims=FLUX.adain_dims)
    return view.reshape(latent.shape)


def _latents():
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 16, 8, 6, generator=generator, dtype=torch.float64)
    # the four positions of each 2×2 patch get different offsets and scales
    offsets = torch.tensor([[0.0, 1.0], [-2.0, 3.0]], dtype=torch.float64).repeat(4, 3)
    reference = torch.randn(3, 16, 6, 10, generator=generator, dtype=torch.float64) * 2.0 + 0.5
    reference = reference + torch.tensor([[1.5, -1.0], [0.0, 2.5]], dtype=torch.float64).repeat(3, 5)
    return latent * 1.5 + offsets, reference


def test_packed_adain_equals_the_reference_on_the_packed_latent(pack):
    latent, reference = _latents()
    expected = _unpack(_reference_adain(_pack(latent), _pack(reference)), latent.shape)
    torch.testing.assert_close(packed_adain(latent, reference), expected, rtol=1e-12, atol=1e-12)


def test_packed_adain_takes_statistics_per_packed_channel(pack):
    from attention_distillation_pack.guidance.losses import adain

    latent, reference = _latents()
    result = _pack(packed_adain(latent, reference))
    target = _pack(reference)
    torch.testing.assert_close(result.mean(dim=1), target.mean(dim=(0, 1)).expand(2, -1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.std(dim=1), target.std(dim=(0, 1)).expand(2, -1), rtol=1e-5, atol=1e-6)
    # 16 statistics per sample (the SD AdaIN) are not the same thing here
    assert (packed_adain(latent, reference) - adain(latent, reference)).abs().max() > 0.5


def test_packed_adain_refuses_odd_sizes(pack):
    with pytest.raises(ValueError, match="even height and width"):
        packed_adain(torch.zeros(1, 16, 7, 6), torch.zeros(1, 16, 6, 6))


def test_flow_noised_is_comfyui_const_noise_scaling(pack):
    import comfy.model_sampling
    from attention_distillation_pack.attention.flux_family import flow_noised

    generator = torch.Generator().manual_seed(1)
    latent, noise = torch.randn(2, 16, 4, 4, generator=generator), torch.randn(2, 16, 4, 4, generator=generator)
    for sigma in (0.0, 0.3, 1.0):
        expected = comfy.model_sampling.CONST().noise_scaling(torch.tensor([sigma]), noise, latent)
        torch.testing.assert_close(flow_noised(latent, noise, sigma), expected)
    assert torch.equal(flow_noised(latent, noise, 0.0), latent)
