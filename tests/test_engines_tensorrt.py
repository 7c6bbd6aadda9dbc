"""TensorRT engines of the tiny SD networks against the eager twins (fp16, on a GPU).

Skipped where `import tensorrt` fails or there is no CUDA GPU; run on the lent GPU with
``pip install --extra-index-url https://pypi.nvidia.com tensorrt``.
"""

from dataclasses import replace

import pytest
import torch
from tiny_sd import make_tiny_sd_folder

try:
    import tensorrt  # noqa: F401

    _TRT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the machine
    _TRT_ERROR = exc

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(_TRT_ERROR is not None, reason=f"tensorrt not importable: {_TRT_ERROR}"),
]

from dreamfusion_trt.engines.artifacts import current_env, find_artifact  # noqa: E402
from dreamfusion_trt.engines.backends import load_network  # noqa: E402
from dreamfusion_trt.engines.build import build_engines  # noqa: E402
from dreamfusion_trt.engines.eager import (  # noqa: E402
    EagerImageEncoder,
    EagerLatentDecoder,
    EagerNoisePredictor,
)
from dreamfusion_trt.engines.tensorrt import SharedDeviceMemory, TensorRTEngine  # noqa: E402
from dreamfusion_trt.sdmodel import load_diffusion  # noqa: E402


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model in fp16 on the GPU and a folder with its engines (UNet batches 2..8)."""
    root = tmp_path_factory.mktemp("trt")
    model = load_diffusion(str(make_tiny_sd_folder(root / "tiny")), device="cuda", dtype="float16")
    report = build_engines(model, root / "engines", batch_sizes=[2, 8], networks=["unet", "vae_encoder", "vae_decoder"],
                           backends=["tensorrt"])  # fmt: skip
    assert {i.status for i in report.items} == {"built"}, report.summary()
    return model, root / "engines"


def _unet_inputs(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=gen).cuda().half(),
        torch.randint(0, 1000, (batch,), generator=gen).cuda(),
        torch.randn(batch, 77, 32, generator=gen).cuda().half(),
    )


def test_unet_engine_matches_eager(built):
    model, engines = built
    predictor = load_network("unet", model, "tensorrt", engines, batch_sizes=(2, 8))
    eager = EagerNoisePredictor(model.unet)
    for batch in (2, 6, 8):
        x, t, e = _unet_inputs(batch, seed=batch)
        got = predictor(x, t, e).clone()
        assert not got.isnan().any()
        assert _cosine(got, eager(x, t, e)) >= 0.999


def test_outputs_are_engine_owned_and_inputs_zero_copy(built):
    model, engines = built
    predictor = load_network("unet", model, "tensorrt", engines, batch_sizes=(2, 8))
    x, t, e = _unet_inputs(4)
    first = predictor(x, t, e)
    first_copy = first.clone()
    second = predictor(*_unet_inputs(4, seed=1))
    assert second.data_ptr() == first.data_ptr()  # the same engine-owned buffer, overwritten
    assert not torch.equal(first, first_copy)
    # fp32 latents are converted, and the result comes back in fp32
    assert predictor(x.float(), t, e).dtype == torch.float32


def test_cuda_graph_and_shared_memory(built):
    model, engines = built
    env = current_env("cuda")
    path, spec = find_artifact(model, "tensorrt", "unet", engines, [2, 8], env)
    plain = TensorRTEngine(path, spec)
    shared = SharedDeviceMemory("cuda")
    graphed = TensorRTEngine(path, spec, shared_memory=shared, cuda_graph=True)
    dec_path, dec_spec = find_artifact(model, "tensorrt", "vae_decoder", engines, [1, 4], env)
    decoder = TensorRTEngine(dec_path, dec_spec, shared_memory=shared)
    assert shared.buffer is None and shared.size == max(graphed.device_memory_size, decoder.device_memory_size)
    for seed in range(3):  # replays see new inputs; batch 6 is padded into the batch-8 profile's graph
        for batch in (8, 2, 6):
            x, t, e = _unet_inputs(batch, seed=seed)
            args = (x, t.float(), e)
            ref = plain(*args)[0].clone()
            got = graphed(*args)[0]
            assert got.shape == ref.shape and _cosine(got, ref) >= 0.9999
        z = torch.randn(4, 4, 8, 8, device="cuda", dtype=torch.float16)
        assert decoder(z)[0].shape == (4, 3, 64, 64)
    assert shared.buffer.numel() == shared.size  # allocated once, at the largest size
    torch.cuda.synchronize()


def test_vae_engines_match_eager(built):
    model, engines = built
    images = torch.rand(3, 3, 64, 64, device="cuda", dtype=torch.float16) * 2 - 1
    enc = load_network("vae_encoder", model, "tensorrt", engines, batch_sizes=(1, 3))
    assert _cosine(enc(images), EagerImageEncoder(model.vae, model.vae_scaling_factor)(images).detach()) >= 0.999
    dec = load_network("vae_decoder", model, "tensorrt", engines, batch_sizes=(1, 3))
    z = torch.randn(3, 4, 8, 8, device="cuda", dtype=torch.float16)
    assert _cosine(dec(z), EagerLatentDecoder(model.vae, model.vae_scaling_factor)(z)) >= 0.999


def test_rebuild_is_a_no_op_and_other_gpus_are_refused(built):
    model, engines = built
    again = build_engines(model, engines, batch_sizes=[2, 8], networks=["unet"], backends=["tensorrt"])
    assert [(i.backend, i.status) for i in again.items] == [("onnx", "up to date"), ("tensorrt", "up to date")]
    other = replace(current_env("cuda"), gpu="Some Other GPU")
    with pytest.raises(ValueError, match="gpu differs"):
        load_network("unet", model, "tensorrt", engines, batch_sizes=(2,), env=other)
    assert load_network("unet", model, "auto", engines, batch_sizes=(2,)).name == "tensorrt"
