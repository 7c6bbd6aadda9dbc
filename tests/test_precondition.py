"""Colour preconditioning of the SDS gradient (guidance/precondition.py): identity forward, P in
the backward, P the identity for an isometric colour map, and its wiring into both phases."""

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.config import from_dict
from dreamfusion_trt.engines.eager import EagerNoisePredictor
from dreamfusion_trt.guidance.inputs import ColourMap, ColourPreconditioned, ImageSpace, VAEEncoding
from dreamfusion_trt.guidance.precondition import colour_preconditioner, precondition
from dreamfusion_trt.sdmodel import load_diffusion
from dreamfusion_trt.train.frozen import frozen_from_model

# The built-in prior's colour map (CPU fit, rounded): W^T W has eigenvalues ~0.13, 9.3 and 13.8.
PRIOR_W = torch.tensor([[-0.902, 0.636, -1.02], [-2.452, 1.786, -1.351], [1.964, 1.495, -1.797], [-0.436, 0.519, -0.338]])


def test_an_isometric_map_gives_the_identity():
    q, _ = torch.linalg.qr(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(colour_preconditioner(2.5 * q, 0.1), torch.eye(3), atol=1e-5, rtol=0)


def test_the_weak_colour_direction_is_evened_out_and_damping_bounds_it():
    m = (PRIOR_W.T @ PRIOR_W).double()
    weak = torch.linalg.eigh(m).eigenvectors[:, 0]  # green and blue together: red against white
    strong = torch.linalg.eigh(m).eigenvectors[:, 2]
    pull = lambda p, v: float(v @ m @ p.double() @ v)  # noqa: E731  latent change per unit latent gradient along v
    plain = torch.eye(3)
    assert pull(plain, strong) / pull(plain, weak) > 50  # without preconditioning
    for damping, most in ((0.1, 8.0), (0.01, 1.7)):
        p = colour_preconditioner(PRIOR_W, damping)
        torch.testing.assert_close(p, p.T)
        assert torch.linalg.eigvalsh(p.double()).min() > 0
        assert 1.0 <= pull(p, strong) / pull(p, weak) < most  # smaller damping, closer to equal pull
    with pytest.raises(ValueError, match="damping must be positive"):
        colour_preconditioner(PRIOR_W, 0.0)


def test_forward_is_the_identity_and_the_backward_applies_p_per_pixel():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 5, 4, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 3, 5, 4, generator=gen)
    p = colour_preconditioner(PRIOR_W, 0.1)
    out = precondition(images, p)
    assert torch.equal(out, images)
    (out * upstream).sum().backward()
    expected = torch.einsum("nchw,cd->ndhw", upstream, p)
    torch.testing.assert_close(images.grad, expected)
    with pytest.raises(ValueError, match=r"images must be \[n, 3, H, W\]"):
        precondition(torch.rand(2, 4, 5, 5), p)


@pytest.fixture(scope="module")
def model(tiny_sd_paths):
    return load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="float32")


def test_both_latent_space_phases_are_wrapped_and_image_space_is_not(model, tmp_path):
    base = {"model": {"engines_dir": str(tmp_path), "cache_dir": str(tmp_path)}, "camera": {"render_size": 16}}
    on = from_dict({**base, "sds": {"colour_preconditioning": True}})
    frozen = frozen_from_model(model, on, EagerNoisePredictor(model.unet))
    latent, rgb = frozen.inputs["latent"], frozen.inputs["rgb"]
    assert isinstance(latent, ColourPreconditioned) and isinstance(latent.inner, ColourMap)
    assert isinstance(rgb, ColourPreconditioned) and isinstance(rgb.inner, VAEEncoding)
    torch.testing.assert_close(latent.preconditioner, colour_preconditioner(frozen.latent_map.weight, 0.1))
    # The wrapped strategy computes the same latents; only the gradient into the render changes.
    plain = frozen_from_model(model, from_dict(base), EagerNoisePredictor(model.unet)).inputs["rgb"]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    torch.testing.assert_close(rgb(images), plain(images))
    off_image = frozen_from_model(model, from_dict({**base, "sds": {"colour_preconditioning": True, "rgb_mode": "image"},
                                                    "model": {**base["model"], "backend": "eager"}}),
                                  EagerNoisePredictor(model.unet))  # fmt: skip
    assert isinstance(off_image.inputs["rgb"], ImageSpace) and isinstance(off_image.inputs["latent"], ColourPreconditioned)
