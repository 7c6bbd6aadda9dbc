"""One table of backends behind the `engines.base` protocols, and `load_network`, the one way in.

``load_network(network, model, backend, ...)`` returns an object satisfying the network's
protocol (unet: NoisePredictor, vae_encoder: ImageEncoder, vae_decoder: LatentDecoder):

- ``"eager"``: the plain PyTorch twins of `eager.py` (the only ones that backpropagate);
- ``"inductor"``: `torch.compile` in-process, warmed up at the sizes asked for and compiling any
  other batch in its range on first use;
- ``"aotinductor"`` / ``"tensorrt"``: a built file found through `artifacts.find_artifact`;
- ``"auto"``: TensorRT when it imports and a matching engine exists, else a matching AOTInductor
  package, else inductor on CUDA, else eager; the choice and the reasons are logged.

Every compiled backend is one `EngineAdapter` around a runner (a callable taking the spec's
inputs positionally and returning the first output): it converts what the caller passes (long
timesteps, fp32 latents, a tensor on another device) to what the spec says, without a copy when
nothing needs converting, checks the shapes, runs without autograd and casts the result back
to the caller's dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, get_args

import torch

from ..config import BackendName
from .artifacts import RuntimeEnv, current_env, find_artifact
from .spec import NetworkSpec, batch_range, make_spec

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = get_args(BackendName)
# The networks the protocols cover; the text encoder runs eager once per prompt (guidance/text.py).
LOADABLE_NETWORKS: tuple[str, ...] = ("unet", "vae_encoder", "vae_decoder")
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "aotinductor")  # built files, fastest first
# The smallest batch a network is ever called with: the UNet always sees [uncond; cond] pairs.
_SMALLEST_BATCH = {"unet": 2}

Runner = Callable[..., torch.Tensor]


class EngineAdapter:
    """A runner of `spec` behind the protocol of `spec.network`.

    unet: ``(noisy_latents [B, C, h, w], t [B], text_embeddings [B, L, D]) -> eps [B, C, h, w]``;
    vae_encoder: ``images [B, 3, H, W] -> latents [B, C, h, w]``; vae_decoder: the reverse. The
    result is in the first input's dtype. A TensorRT runner returns a buffer the engine owns and
    overwrites on its next call (clone what you keep); `close` releases it.
    """

    def __init__(self, name: str, run: Runner, spec: NetworkSpec, device: torch.device | str, engine: Any = None) -> None:
        self.name = name
        self.spec = spec
        self.device = torch.device(device)
        self.engine = engine  # what `close` releases (a TensorRTEngine), if anything
        self._run = run

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.spec.check_inputs(inputs)  # count and shapes, before anything is converted
        args = [x.to(device=self.device, dtype=t.dtype, non_blocking=True).contiguous() for x, t in zip(inputs, self.spec.inputs)]
        # The network runs in its own dtype, as it was built or compiled: the trainer's autocast
        # must not reach it (a compiled graph guards on the autocast state, so a call under
        # autocast recompiled the whole UNet on the first training step: ~60 s on an H200).
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            out = self._run(*args)
        return out if out.dtype == inputs[0].dtype else out.to(inputs[0].dtype)

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()


@dataclass(frozen=True)
class LoadOptions:
    engines_dir: Path
    batch_sizes: tuple[int, ...]  # the network's own batches
    env: RuntimeEnv | None  # None: the running one, read when a loader needs it
    compile_mode: str  # inductor
    cuda_graph: bool  # tensorrt
    shared_memory: Any  # tensorrt: a SharedDeviceMemory, or None
    precompiled_dir: Path | None = None  # inductor: where compiled artifacts are kept (None: compile in-process only)

    def runtime_env(self, model: Any) -> RuntimeEnv:
        return self.env if self.env is not None else current_env(model.device)


def _eager(network: str, model: Any, opts: LoadOptions) -> Any:
    from .eager import EagerImageEncoder, EagerLatentDecoder, EagerNoisePredictor

    if network == "unet":
        return EagerNoisePredictor(model.unet)
    cls = EagerImageEncoder if network == "vae_encoder" else EagerLatentDecoder
    return cls(model.vae, model.vae_scaling_factor)


def _inductor(network: str, model: Any, opts: LoadOptions) -> EngineAdapter:
    """Compiled for every batch from the network's smallest up to the largest asked for, warmed
    up at the sizes asked for: a run whose last prompts fill fewer slots calls it with smaller
    batches, which compile on first use instead of being refused."""
    from .inductor import compile_network
    from .precompiled import precompile_enabled, precompiled_network
    from .wrappers import module_device, wrap_network

    low = min(_SMALLEST_BATCH.get(network, 1), *opts.batch_sizes)
    spec = make_spec(model, network, (low, *opts.batch_sizes))
    module = wrap_network(model, network)
    if opts.precompiled_dir is not None and precompile_enabled():
        run = precompiled_network(module, spec, opts.precompiled_dir, mode=opts.compile_mode,  # type: ignore[arg-type]
                                  batch_sizes=opts.batch_sizes)  # fmt: skip
    else:
        run = compile_network(module, spec, mode=opts.compile_mode, batch_sizes=opts.batch_sizes)  # type: ignore[arg-type]
    return EngineAdapter("inductor", run, spec, module_device(module))


def _aotinductor(network: str, model: Any, opts: LoadOptions) -> EngineAdapter:
    from .inductor import aoti_load

    path, spec = find_artifact(model, "aotinductor", network, opts.engines_dir, opts.batch_sizes, opts.runtime_env(model))
    return EngineAdapter("aotinductor", aoti_load(path, model.device), spec, model.device)


def _tensorrt(network: str, model: Any, opts: LoadOptions) -> EngineAdapter:
    from .tensorrt import TensorRTEngine, import_tensorrt

    import_tensorrt()  # ValueError with the install line
    if torch.device(model.device).type != "cuda":
        raise ValueError(f"backend 'tensorrt' needs the model on a CUDA device, it is on '{model.device}'")
    path, spec = find_artifact(model, "tensorrt", network, opts.engines_dir, opts.batch_sizes, opts.runtime_env(model))
    engine = TensorRTEngine(path, spec, device=model.device, shared_memory=opts.shared_memory, cuda_graph=opts.cuda_graph)
    return EngineAdapter("tensorrt", lambda *xs: engine(*xs)[0], spec, engine.device, engine=engine)


LOADERS: dict[str, Callable[[str, Any, LoadOptions], Any]] = {
    "eager": _eager,
    "inductor": _inductor,
    "aotinductor": _aotinductor,
    "tensorrt": _tensorrt,
}
assert set(LOADERS) | {"auto"} == set(BACKENDS), "every BackendName but auto has one loader"


def load_network(
    network: str,
    model: Any,
    backend: str,
    engines_dir: str | Path = "engines",
    batch_sizes: Sequence[int] = (2,),
    *,
    env: RuntimeEnv | None = None,
    compile_mode: str = "auto",
    cuda_graph: bool = False,
    shared_memory: Any = None,
    precompiled_dir: str | Path | None = None,
) -> Any:
    """`network` of a loaded `DiffusionModel` run by `backend`, behind its protocol.

    `batch_sizes` are the network's own batches (UNet: CFG doubling included); a built file must
    cover them. `compile_mode` applies to inductor ("auto": CUDA graphs on a GPU, the measured
    fastest on the H200 benchmark; plain compile on a CPU); `cuda_graph` and `shared_memory` (a
    `tensorrt.SharedDeviceMemory`) to TensorRT. With `precompiled_dir`, inductor keeps each
    warmed batch's compiled artifact there and loads it in later processes without tracing
    (`engines.precompiled`). ValueError for an unknown backend or network or
    a file that does not fit, FileNotFoundError when nothing was built."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if network not in LOADABLE_NETWORKS:
        raise ValueError(f"no backend runs network {network!r} (expected one of {', '.join(LOADABLE_NETWORKS)})")
    batch_range(batch_sizes)  # validates
    opts = LoadOptions(Path(engines_dir), tuple(sorted(set(batch_sizes))), env, compile_mode, cuda_graph, shared_memory,
                       Path(precompiled_dir) if precompiled_dir is not None else None)  # fmt: skip
    if backend != "auto":
        return LOADERS[backend](network, model, opts)
    reasons = []
    for name in AUTO_ORDER:
        try:
            chosen = LOADERS[name](network, model, opts)
        except (ValueError, FileNotFoundError) as exc:
            reasons.append(f"{name}: {exc}")
            continue
        log.info("backend auto -> %s for %s (%s)", name, network, "; ".join(reasons) or "first choice")
        return chosen
    name = "inductor" if torch.device(model.device).type == "cuda" else "eager"
    if name == "eager":
        reasons.append("inductor: compiles slowly and gains little without CUDA")
    log.info("backend auto -> %s for %s (%s)", name, network, "; ".join(reasons))
    return LOADERS[name](network, model, opts)
