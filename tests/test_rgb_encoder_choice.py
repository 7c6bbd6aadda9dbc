"""train.rgb_encoder: which strategy the RGB phase gets (the fit itself: test_render_encoder.py)."""

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.config import from_dict
from dreamfusion_trt.engines.eager import EagerNoisePredictor
from dreamfusion_trt.guidance import render_encoder
from dreamfusion_trt.guidance.inputs import DistilledEncoding, VAEEncoding
from dreamfusion_trt.sdmodel import load_diffusion
from dreamfusion_trt.train.frozen import frozen_from_model


@pytest.fixture(scope="module")
def model(tiny_sd_paths):
    return load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="float32")


def _cfg(tmp_path, choice):
    return from_dict({"model": {"engines_dir": str(tmp_path)}, "camera": {"render_size": 16}, "train": {"rgb_encoder": choice}})


def test_auto_on_a_cpu_keeps_the_full_vae(model, tmp_path, monkeypatch):
    monkeypatch.setattr(render_encoder, "load_or_fit", lambda *a, **k: pytest.fail("auto must not fit on a CPU"))
    frozen = frozen_from_model(model, _cfg(tmp_path, "auto"), EagerNoisePredictor(model.unet))
    assert isinstance(frozen.inputs["rgb"], VAEEncoding)


def test_distilled_is_used_when_it_passes_and_refused_with_the_reason_when_not(model, tmp_path, monkeypatch):
    rgb = frozen_from_model(model, _cfg(tmp_path, "vae"), EagerNoisePredictor(model.unet)).inputs["rgb"]
    c, h, _ = rgb.latent_shape
    arch = render_encoder.EncoderArch(render_size=16, encode_size=rgb.encode_size, latent_channels=c,
                                      vae_factor=rgb.encode_size // h, width=8, blocks=1)  # fmt: skip
    student = render_encoder.DistilledRenderEncoder(arch)
    calls = []

    def passing(vae, scaling, key, engines_dir, render_size, encode_size, **kwargs):
        calls.append((key, str(engines_dir), render_size, encode_size))
        return student, {"parity": {"grad_cos_mean": 0.97}}

    monkeypatch.setattr(render_encoder, "load_or_fit", passing)
    frozen = frozen_from_model(model, _cfg(tmp_path, "distilled"), EagerNoisePredictor(model.unet))
    strategy = frozen.inputs["rgb"]
    assert isinstance(strategy, DistilledEncoding) and calls == [(model.key, str(tmp_path), 16, rgb.encode_size)]
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    latents = strategy(images)
    assert latents.shape == (2, *rgb.latent_shape)
    latents.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # SDS reaches the render through it

    def refusing(*args, **kwargs):
        raise render_encoder.BelowThresholdError("gradient cosine 0.41 below 0.85 (simulated)")

    monkeypatch.setattr(render_encoder, "load_or_fit", refusing)
    with pytest.raises(ValueError, match="gradient cosine 0.41 below 0.85"):
        frozen_from_model(model, _cfg(tmp_path, "distilled"), EagerNoisePredictor(model.unet))


def test_the_benchmarks_stand_in_encoder_never_fits_and_says_so(model, tmp_path, monkeypatch, caplog):
    from dreamfusion_trt.train.frozen import STAND_IN_ENCODER_ENV

    monkeypatch.setenv(STAND_IN_ENCODER_ENV, "1")
    monkeypatch.setattr(render_encoder, "load_or_fit", lambda *a, **k: pytest.fail("a stand-in must not fit"))
    strategy = frozen_from_model(model, _cfg(tmp_path, "vae"), EagerNoisePredictor(model.unet)).inputs["rgb"]
    assert isinstance(strategy, DistilledEncoding)
    assert "stand-in render encoder with random weights" in caplog.text
    again = render_encoder.untrained_render_encoder(model.vae, 16, strategy.encoder.arch.encode_size, "cpu")
    images = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(strategy(images), again(images))  # seed 0: the same stand-in every run
