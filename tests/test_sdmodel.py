"""Loading frozen Stable Diffusion from a folder, a single file and the hub; the eager backends."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from tiny_sd import TEXT_DIM, tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.engines.base import ImageEncoder, LatentDecoder, NoisePredictor
from dreamfusion_trt.engines.eager import EagerImageEncoder, EagerLatentDecoder, EagerNoisePredictor
from dreamfusion_trt.sdmodel import DiffusionModel, load_diffusion, resolve_dtype


@pytest.fixture(scope="module")
def folder_model(tiny_sd_paths) -> DiffusionModel:
    return load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="auto")


def _unet_inputs(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    emb = torch.randn(batch, 77, TEXT_DIM, generator=gen)
    return x, t, emb


def test_folder_fields_and_frozen(folder_model):
    m = folder_model
    assert (m.latent_channels, m.text_dim, m.max_length) == (4, TEXT_DIM, 77)
    assert m.vae_scaling_factor == pytest.approx(0.18215)
    assert m.dtype == torch.float32 and m.device == torch.device("cpu")
    ac = m.alphas_cumprod
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    # SD's scaled-linear betas: first beta 0.00085, alphas_cumprod strictly decreasing.
    assert ac[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)
    assert bool((ac[1:] < ac[:-1]).all())
    for module in (m.text_encoder, m.unet, m.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert all(c.isalnum() or c in "._-" for c in m.key) and m.key.startswith("folder-")


def test_single_file_matches_folder(folder_model, tiny_sd_paths):
    x, t, emb = _unet_inputs(2)
    ref = EagerNoisePredictor(folder_model.unet)(x, t, emb)
    for path in (tiny_sd_paths.single_file, tiny_sd_paths.ckpt):
        m = load_diffusion(str(path), device="cpu", dtype="float32")
        for name in ("unet", "vae", "text_encoder"):
            a, b = getattr(folder_model, name).state_dict(), getattr(m, name).state_dict()
            assert a.keys() == b.keys(), name
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after loading {path.name}"
        # Bitwise-equal weights (checked above) and the same batch in the same process run the
        # same kernels; the tolerance only absorbs a kernel picked by the weights' memory layout.
        torch.testing.assert_close(EagerNoisePredictor(m.unet)(x, t, emb), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.alphas_cumprod, folder_model.alphas_cumprod)
        assert m.key != folder_model.key and m.key.startswith("tiny-")


def test_key_is_stable_and_tracks_weights(folder_model, tiny_sd_paths, tmp_path):
    again = load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="auto")
    assert again.key == folder_model.key
    copy = shutil.copytree(tiny_sd_paths.folder, tmp_path / "folder")
    assert load_diffusion(str(copy), device="cpu", dtype="auto").key == folder_model.key  # same bytes, same key

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(copy, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    unet.save_pretrained(copy / "unet")
    assert load_diffusion(str(copy), device="cpu", dtype="auto").key != folder_model.key


def test_free_text_encoder(tiny_sd_paths):
    m = load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="auto")
    m.free_text_encoder()
    assert m.text_encoder is None
    m.free_text_encoder()  # idempotent


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: '.*nope'"):
        load_diffusion(str(tmp_path / "nope"), device="cpu", dtype="auto")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_diffusion("models/sd/model.safetensors", device="cpu", dtype="auto")


def test_unknown_hub_id_offline(monkeypatch):
    with pytest.raises(ValueError, match=r"'someone/no-such-model' was not found locally and HF_HUB_OFFLINE"):
        load_diffusion("someone/no-such-model", device="cpu", dtype="auto")
    # local_files_only alone also keeps it off the network.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    with pytest.raises(ValueError, match="'someone/no-such-model' was not found locally"):
        load_diffusion("someone/no-such-model", device="cpu", dtype="auto", local_files_only=True)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        load_diffusion(str(tmp_path), device="cpu", dtype="auto")


@pytest.mark.parametrize("name", ["bad.safetensors", "bad.ckpt"])
def test_corrupt_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=f"'{path}' is not a readable checkpoint"):
        load_diffusion(str(path), device="cpu", dtype="auto")


def test_ckpt_is_never_unpickled_unsafely(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"model.diffusion_model.x": Payload()}}, protocol=2))
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_diffusion(str(path), device="cpu", dtype="auto")
    assert not marker.exists()


def test_checkpoint_without_unet_weights(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vae_only.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="vae_only.safetensors' is not an original-layout"):
        load_diffusion(str(path), device="cpu", dtype="auto")


def test_single_file_without_configs_offline(tiny_sd_paths, tmp_path):
    lone = shutil.copy(tiny_sd_paths.single_file, tmp_path / "lone.safetensors")
    # diffusers infers a hub repo from the weights; offline and uncached, that is a clear error.
    expected = r"single-file checkpoint '.*lone.safetensors' \(hub repo '.+'\) were not found locally"
    with pytest.raises(ValueError, match=expected):
        load_diffusion(str(lone), device="cpu", dtype="auto")
    # ... and an explicit config folder makes it load.
    m = load_diffusion(str(lone), device="cpu", dtype="auto", config=str(tiny_sd_paths.single_file.parent))
    assert m.latent_channels == 4


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="'float8'"):
        resolve_dtype("float8", "cpu")


# ---------------------------------------------------------------------------------------------
# eager backends


def test_eager_predictor(folder_model):
    pred = EagerNoisePredictor(folder_model.unet)
    assert isinstance(pred, NoisePredictor) and pred.name == "eager"
    x, t, emb = _unet_inputs(3)
    x.requires_grad_(True)
    eps = pred(x, t, emb)
    assert eps.shape == x.shape and eps.dtype == x.dtype and not eps.requires_grad
    # Batch of one equals the matching row of the batch. Not bit-exact: CPU convolution and GEMM
    # kernels pick their algorithm (and so the summation order) by batch size and thread count,
    # so float32 rows differ by a few 1e-6 on some machines (2.1e-6 seen on a 2-core EPYC). The
    # prediction is O(1); a row mixed up with another, or a wrong timestep or embedding, moves it
    # by order 0.1, so 1e-4 separates the two by orders of magnitude either way.
    torch.testing.assert_close(pred(x[1:2].detach(), t[1:2], emb[1:2]), eps[1:2], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"text_embeddings \[3, L, D\]"):
        pred(x, t, emb[:2])


def test_eager_encoder_has_gradient_decoder_not(folder_model):
    m = folder_model
    enc = EagerImageEncoder(m.vae, m.vae_scaling_factor)
    dec = EagerLatentDecoder(m.vae, m.vae_scaling_factor)
    assert isinstance(enc, ImageEncoder) and isinstance(dec, LatentDecoder)
    images = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    latents = enc(images)
    assert latents.shape == (2, 4, 8, 8)
    expected = m.vae.encode(images.detach()).latent_dist.mean * m.vae_scaling_factor
    torch.testing.assert_close(latents.detach(), expected)
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.vae.parameters())

    out = dec(latents.detach().requires_grad_(True))
    assert out.shape == (2, 3, 64, 64) and not out.requires_grad
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.gpu
def test_fp16_cuda_has_no_nan(tiny_sd_paths):
    m = load_diffusion(str(tiny_sd_paths.folder), device="cuda", dtype="auto")
    assert m.dtype == torch.float16
    x, t, emb = (v.cuda() for v in _unet_inputs(2))
    eps = EagerNoisePredictor(m.unet)(x, t, emb)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
