"""The prior VAE's colour isometry: the term that keeps flat colours' RGB distances in latent
space (so SDS sees a red object against the white background as clearly as a blue one)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from dreamfusion_trt.prior.model import color_isometry_loss, color_isometry_stats, tiny_config, train_prior


class LinearEncoder:
    """A stand-in VAE whose posterior mean is a fixed linear map of the pixel colour."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix  # [C, 3]

    def encode(self, x: torch.Tensor):  # x [B, 3, H, W] in [-1, 1]
        mean = torch.einsum("cj,bjhw->bchw", self.matrix, (x + 1) / 2)[..., ::4, ::4]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


def test_isometry_loss_is_zero_for_a_scaled_rotation_and_grows_when_red_is_squashed():
    q, _ = torch.linalg.qr(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))  # [4, 3] orthonormal columns
    iso = LinearEncoder(3.0 * q)
    gen = torch.Generator().manual_seed(1)
    assert float(color_isometry_loss(iso, 64, gen, torch.device("cpu"))) < 1e-8
    stats = color_isometry_stats(iso, torch.device("cpu"))
    assert stats["max_over_min"] == pytest.approx(1.0, abs=1e-4)
    assert stats["latent_over_rgb_distance_from_white"]["red"] == pytest.approx(3.0, rel=1e-4)
    # red's direction from white, (0.1, 0.88, 0.9), is mostly green + blue: squash those two
    squash = LinearEncoder(3.0 * q @ torch.diag(torch.tensor([1.0, 0.3, 0.3])))
    lossy = float(color_isometry_loss(squash, 64, torch.Generator().manual_seed(1), torch.device("cpu")))
    assert lossy > 0.05
    ratio = color_isometry_stats(squash, torch.device("cpu"))["latent_over_rgb_distance_from_white"]
    assert ratio["red"] < 0.5 * 3.0 and ratio["red"] < 0.5 * ratio["cyan"]  # cyan differs from white in red only


def test_the_term_trains_and_its_stats_are_recorded(tmp_path):
    cfg = replace(tiny_config(tmp_path / "prior"), color_isometry_weight=1.0, eval_per_caption=0)
    out, _ = train_prior(cfg)
    stats = json.loads((out / "prior_train.json").read_text())
    text = json.dumps(stats)
    assert "color_isometry" in text and "latent_over_rgb_distance_from_white" in text
    with pytest.raises(ValueError, match="color_isometry_weight must be >= 0"):
        train_prior(replace(cfg, color_isometry_weight=-1.0))
