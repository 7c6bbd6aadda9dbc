"""Start-up caches: the colour -> latent map fitted once per model, and Inductor's compile cache
kept in the run's cache folder (issue 11 item 2). The seconds they save are measured on the GPU
(BENCHMARKS.md); here: what is cached, under which key, and that a bad cache is not trusted."""

import os

import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.engines import compile_cache
from dreamfusion_trt.engines.compile_cache import compile_cache_folder, device_slug, use_compile_cache
from dreamfusion_trt.guidance.latents import fit_rgb_to_latent, latent_map_cache_path, load_or_fit_rgb_to_latent


class CountingEncoder:
    """A fixed linear 'VAE encoder' (8x downsampling) that counts its calls."""

    def __init__(self):
        self.calls = 0
        self.w = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, 0.9], [-0.7, 0.2, 0.0], [0.1, 0.1, 0.1]])

    def __call__(self, images):  # [n, 3, 64, 64] in [-1, 1] -> [n, 4, 8, 8]
        self.calls += 1
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return torch.einsum("cj,njhw->nchw", self.w.to(images.dtype), pooled) + 0.25


def test_the_colour_map_is_fitted_once_per_model_and_read_back_equal(tmp_path, caplog):
    enc = CountingEncoder()
    first = load_or_fit_rgb_to_latent(enc, "model-abc", tmp_path, "cpu", torch.float32)
    fitted_calls = enc.calls
    assert fitted_calls > 0
    path = latent_map_cache_path(tmp_path, "model-abc", "cpu", torch.float32)
    assert path.is_file() and not list(path.parent.glob("*.tmp*"))
    caplog.set_level("INFO")
    again = load_or_fit_rgb_to_latent(enc, "model-abc", tmp_path, "cpu", torch.float32)
    assert enc.calls == fitted_calls  # no encoder call the second time
    assert "from the cache" in caplog.text
    for name in ("weight", "bias", "r2"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    # the fit it stands for: the encoder's own linear map, recovered
    assert torch.allclose(first.weight, enc.w * 2, atol=1e-4) and float(first.r2) > 0.999
    # another model, dtype or device type is another file
    assert latent_map_cache_path(tmp_path, "model-xyz", "cpu", torch.float32) != path
    assert latent_map_cache_path(tmp_path, "model-abc", "cpu", torch.float16) != path


def test_an_unreadable_colour_map_cache_is_fitted_again(tmp_path, caplog):
    enc = CountingEncoder()
    path = latent_map_cache_path(tmp_path, "m", "cpu", torch.float32)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    latent_map = load_or_fit_rgb_to_latent(enc, "m", tmp_path, "cpu", torch.float32)
    assert enc.calls > 0 and "unreadable" in caplog.text
    reference = fit_rgb_to_latent(CountingEncoder(), "cpu", torch.float32)
    assert torch.allclose(latent_map.weight, reference.weight, atol=1e-5)
    # the rewritten file now reads back as the map just fitted
    assert load_or_fit_rgb_to_latent(CountingEncoder(), "m", tmp_path, "cpu", torch.float32).weight.equal(latent_map.weight)


def test_no_cache_folder_means_no_file(tmp_path):
    load_or_fit_rgb_to_latent(CountingEncoder(), "m", None, "cpu", torch.float32)
    assert not any(tmp_path.iterdir())


def test_the_compile_cache_goes_to_the_run_cache_keyed_by_torch_and_device(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.delenv("_DREAMFUSION_TRT_COMPILE_CACHE", raising=False)
    folder = use_compile_cache(tmp_path, "cpu")
    assert folder == compile_cache_folder(tmp_path, "cpu") and folder.is_dir()
    assert folder.parent == tmp_path / "compile" and folder.name.startswith("torch-") and folder.name.endswith("-cpu")
    assert torch.__version__.split("+")[0] in folder.name
    assert os.environ[compile_cache.ENV] == str(folder)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(folder)  # what Inductor itself now uses
    # a second run root switches again (ours, not the user's)
    other = use_compile_cache(tmp_path / "b", "cpu")
    assert os.environ[compile_cache.ENV] == str(other) != str(folder)
    assert device_slug("cpu") == "cpu"


def test_a_cache_folder_the_user_chose_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    monkeypatch.delenv("_DREAMFUSION_TRT_COMPILE_CACHE", raising=False)
    assert use_compile_cache(tmp_path / "run", "cpu") == tmp_path / "mine"
    assert os.environ[compile_cache.ENV] == str(tmp_path / "mine")
    # Inductor's own default (written into the environment when it first asks) is not a choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compile_cache.ENV, default_cache_dir())
    assert use_compile_cache(tmp_path / "run", "cpu") == compile_cache_folder(tmp_path / "run", "cpu")


def test_build_engines_with_inductor_compiles_the_unet_into_the_cache(tmp_path, tiny_sd_paths, monkeypatch):
    """`build-engines --backends inductor` compiles the UNet at the batch sizes asked for, with the
    compile cache in --cache-dir (the compile itself is stubbed: our calling code only)."""
    from dreamfusion_trt import cli
    from dreamfusion_trt.engines import backends, build

    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.delenv("_DREAMFUSION_TRT_COMPILE_CACHE", raising=False)
    calls = {}
    monkeypatch.setattr(backends, "load_network", lambda network, model, backend, engines_dir, batch_sizes, **kw:
                        calls.setdefault("load", (network, backend, batch_sizes, os.environ[compile_cache.ENV])))  # fmt: skip
    real_build = build.build_engines

    def spy_build(*args, **kwargs):
        calls["build"] = kwargs["backends"]
        return real_build(*args, **kwargs)

    monkeypatch.setattr(build, "build_engines", spy_build)
    code = cli.main(["build-engines", "--model", str(tiny_sd_paths.folder), "--out", str(tmp_path / "engines"),
                     "--backends", "inductor", "--batch-sizes", "4,2", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert calls["build"] == []  # nothing for the artifact builder
    network, backend, sizes, cache = calls["load"]
    assert (network, backend, sizes) == ("unet", "inductor", (2, 4))
    assert cache == str(compile_cache_folder(tmp_path / "cache", "cpu"))
