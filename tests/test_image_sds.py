"""Image-space SDS (engine-only VAE): its gradient is the analytic one, and a perfect noise
predictor denoises back to the encoded latents."""

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.engines.eager import EagerImageEncoder, EagerLatentDecoder, EagerNoisePredictor
from dreamfusion_trt.guidance.image_sds import image_sds
from dreamfusion_trt.sdmodel import load_diffusion


@pytest.fixture(scope="module")
def model(tiny_sd_paths):
    return load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="float32")


class _NoisePassThrough:
    """A 'perfect' noise predictor that returns the noise it was told about."""

    name = "oracle"

    def __init__(self, noise):
        self.noise = noise

    def __call__(self, noisy_latents, t, text_embeddings):
        return torch.cat([self.noise, self.noise]).to(noisy_latents.dtype)


def test_image_sds_gradient_is_the_analytic_one(model):
    gen = torch.Generator().manual_seed(0)
    k = 2
    images = (torch.rand(k, 3, 64, 64, generator=gen) * 2 - 1).requires_grad_(True)
    t = torch.tensor([100, 700])
    noise = torch.randn(k, 4, 8, 8, generator=gen)
    cond, uncond = torch.randn(2, k, 77, 32, generator=gen)
    weight = 1 - model.alphas_cumprod[t]
    encoder = EagerImageEncoder(model.vae, model.vae_scaling_factor)
    decoder = EagerLatentDecoder(model.vae, model.vae_scaling_factor)
    out = image_sds(images, t, noise, cond, uncond, encoder=encoder, predictor=EagerNoisePredictor(model.unet),
                    decoder=decoder, alphas_cumprod=model.alphas_cumprod, weight=weight, guidance_scale=7.5)  # fmt: skip
    out.per_prompt.sum().backward()
    expected = weight.view(k, 1, 1, 1) * (images.detach() - out.target)
    torch.testing.assert_close(images.grad, expected, rtol=1e-5, atol=1e-7)
    assert not out.target.requires_grad
    # the target is the decoded x0 estimate, computed here by hand
    with torch.no_grad():
        z = encoder(images)
        a = model.alphas_cumprod[t].view(k, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        eps = EagerNoisePredictor(model.unet)(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        e_u, e_c = eps.chunk(2)
        z0 = (x_t - (1 - a).sqrt() * (e_u + 7.5 * (e_c - e_u))) / a.sqrt()
    torch.testing.assert_close(out.denoised, z0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.target, decoder(z0), rtol=1e-4, atol=1e-5)


def test_image_sds_with_a_perfect_predictor_denoises_to_the_encoded_latents(model):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    encoder = EagerImageEncoder(model.vae, model.vae_scaling_factor)
    out = image_sds(images, torch.tensor([500]), noise, torch.zeros(1, 77, 32), torch.zeros(1, 77, 32),
                    encoder=encoder, predictor=_NoisePassThrough(noise),
                    decoder=EagerLatentDecoder(model.vae, model.vae_scaling_factor),
                    alphas_cumprod=model.alphas_cumprod, weight=torch.ones(1), guidance_scale=100.0)  # fmt: skip
    torch.testing.assert_close(out.denoised, out.latents, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="noise must have the latents' shape"):
        image_sds(images, torch.tensor([500]), noise[:, :3], torch.zeros(1, 77, 32), torch.zeros(1, 77, 32),
                  encoder=encoder, predictor=_NoisePassThrough(noise), decoder=encoder,
                  alphas_cumprod=model.alphas_cumprod, weight=torch.ones(1), guidance_scale=1.0)  # fmt: skip
