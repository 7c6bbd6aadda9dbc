"""One spec per frozen network: tensor names, dtypes and min/opt/max shapes, spelled once.

Everything that needs a shape derives it from a `NetworkSpec`: ONNX dynamic axes
(`dynamic_axes`), `torch.export` dynamic shapes (`export_dynamic_shapes`), TensorRT
optimization profiles (`profile`), engine output buffers (`allocate_outputs`), sample inputs for
tracing, warm-up and parity checks (`sample_inputs`), and the manifest's description
(`describe`). A shape entry is either an int or the name of a dynamic axis; the only dynamic axis
today is the batch ``"B"``, with its range chosen from the batch sizes in use. TensorRT gets one
optimization profile per batch size in use (`profiles`), so each size runs kernels timed at it.

Batches are what each network sees: the UNet's batch already contains the classifier-free
guidance doubling (K prompts -> B = 2K), while the VAE and the text encoder see K images or
prompts (`network_batch_sizes` converts). Latent height and width come from the UNet config
(``sample_size``, 64 for SD 1.5/2.1-base); image sizes are that times the VAE's downsampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

Network = Literal["unet", "vae_encoder", "vae_decoder", "text_encoder"]
NETWORKS: tuple[str, ...] = typing.get_args(Network)
BATCH = "B"

_PRECISION_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.int32: "int32",
    torch.int64: "int64",
}


def precision_of(tag: str) -> torch.dtype | None:
    """The dtype of a precision tag (fp16, bf16, fp32), None for anything else."""
    return {v: k for k, v in _PRECISION_TAGS.items()}.get(tag)


def precision_tag(dtype: torch.dtype) -> str:
    """Short precision name used in file names and the manifest: fp16, bf16 or fp32."""
    if dtype not in _PRECISION_TAGS:
        raise ValueError(f"unsupported engine precision {dtype!r} (expected float16, bfloat16 or float32)")
    return _PRECISION_TAGS[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class AxisRange:
    """Sizes a dynamic axis takes: TensorRT's min/opt/max."""

    min: int
    opt: int
    max: int

    def contains(self, size: int) -> bool:
        return self.min <= size <= self.max


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]  # ints, or the name of a dynamic axis of the owning NetworkSpec
    sample_range: tuple[int, int] | None = None  # sample_inputs draws integers in [lo, hi); None: N(0, 1)


@dataclass(frozen=True)
class NetworkSpec:
    network: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: tuple[tuple[str, AxisRange], ...]  # dynamic axes by name, e.g. (("B", AxisRange(2, 32, 32)),)
    precision: torch.dtype  # dtype the graph computes in (fp32 islands aside, see wrappers.py)
    sizes: tuple[int, ...] = ()  # batch sizes in use, ascending, inside the batch range; () = (batch.max,)

    # ---- shapes ---------------------------------------------------------------------------

    @property
    def batch(self) -> AxisRange:
        return dict(self.axes)[BATCH]

    @property
    def tensors(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in (*self.inputs, *self.outputs)}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes in use, ascending: one TensorRT optimization profile each."""
        return self.sizes or (self.batch.max,)

    def with_batch(self, batch: AxisRange, sizes: Sequence[int] = ()) -> "NetworkSpec":
        """The same spec over another batch range (an engine's, read from the manifest)."""
        sizes = tuple(sorted(set(sizes)))
        if sizes and not all(batch.contains(s) for s in sizes):
            raise ValueError(f"{self.network}: batch sizes {sizes} are not all inside [{batch.min}, {batch.max}]")
        return dataclasses.replace(self, axes=tuple((a, batch if a == BATCH else r) for a, r in self.axes), sizes=sizes)

    def check_batch(self, batch: int) -> int:
        """`batch` if the spec's batch range holds it, else ValueError naming the range."""
        rng = self.batch
        if isinstance(batch, bool) or not isinstance(batch, int) or not rng.contains(batch):
            raise ValueError(
                f"{self.network}: batch size {batch!r} is outside the engine's range "
                f"[{rng.min}, {rng.max}] (rebuild the engines with --batch-sizes covering it)"
            )
        return batch

    def shape(self, name: str, **sizes: int) -> tuple[int, ...]:
        """Concrete shape of tensor `name` for the given axis sizes (default: each axis' opt)."""
        axes = dict(self.axes)
        for axis, size in sizes.items():
            if axis not in axes:
                raise ValueError(f"{self.network}: unknown axis {axis!r} (axes: {', '.join(axes)})")
            if axis == BATCH:
                self.check_batch(size)
            elif not axes[axis].contains(size):
                raise ValueError(f"{self.network}: axis {axis}={size} is outside [{axes[axis].min}, {axes[axis].max}]")
        value = {a: sizes.get(a, r.opt) for a, r in axes.items()}
        return tuple(d if isinstance(d, int) else value[d] for d in self.tensors[name].shape)

    def _shape_at(self, name: str, which: str, batch: int | None = None) -> tuple[int, ...]:
        value = {a: getattr(r, which) for a, r in self.axes}
        if batch is not None:
            value[BATCH] = batch
        return tuple(d if isinstance(d, int) else value[d] for d in self.tensors[name].shape)

    # ---- derived views -----------------------------------------------------------------

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`torch.onnx.export(dynamic_axes=...)`: {tensor: {axis index: axis name}}."""
        out: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                out[t.name] = named
        return out

    def export_dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """`torch.export.export(dynamic_shapes=...)` for the inputs, in order; the axis objects
        are shared so torch.export knows every "B" is the same size."""
        dims = {a: torch.export.Dim(a, min=r.min, max=r.max) for a, r in self.axes if r.min < r.max}  # static otherwise
        return tuple({i: dims[d] for i, d in enumerate(t.shape) if d in dims} for t in self.inputs)

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimization profile: {input: (min shape, opt shape, max shape)}."""
        return {t.name: (self._shape_at(t.name, "min"), self._shape_at(t.name, "opt"), self._shape_at(t.name, "max")) for t in self.inputs}

    def profiles(self) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
        """One TensorRT optimization profile per batch size in use, ascending. Profile i covers
        the batches above size i-1 up to size i and is tuned (opt = max) at size i, so every size
        in use runs kernels timed at exactly that size (min = opt = max where sizes are adjacent);
        together they cover the whole batch range, each batch in exactly one profile."""
        out, low = [], self.batch.min
        for size in self.batch_sizes:
            out.append({t.name: (self._shape_at(t.name, "min", low), self._shape_at(t.name, "opt", size),
                                 self._shape_at(t.name, "max", size)) for t in self.inputs})  # fmt: skip
            low = size + 1
        return out

    def allocate_outputs(self, batch: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Uninitialised output buffers for `batch`, in the spec's dtypes."""
        self.check_batch(batch)
        return {t.name: torch.empty(self.shape(t.name, B=batch), dtype=t.dtype, device=device) for t in self.outputs}

    def sample_inputs(
        self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Random inputs in input order: N(0, 1) floats, integers in `sample_range` (timesteps,
        token ids). `generator` lives on the CPU so results do not depend on the device."""
        self.check_batch(batch)
        out = {}
        for t in self.inputs:
            shape = self.shape(t.name, B=batch)
            if t.sample_range is not None:
                x = torch.randint(t.sample_range[0], t.sample_range[1], shape, generator=generator)
            else:
                x = torch.randn(shape, generator=generator)
            out[t.name] = x.to(device=device, dtype=t.dtype)
        return out

    def check_inputs(self, tensors: Sequence[torch.Tensor]) -> int:
        """Validate positional inputs against the spec; returns the batch size."""
        if len(tensors) != len(self.inputs):
            raise ValueError(f"{self.network}: expected {len(self.inputs)} inputs ({', '.join(self.input_names)}), got {len(tensors)}")
        batch = int(tensors[0].shape[0]) if tensors[0].ndim else -1
        self.check_batch(batch)
        for t, x in zip(self.inputs, tensors):
            want = self.shape(t.name, B=batch)
            if tuple(x.shape) != want:
                raise ValueError(f"{self.network}: input {t.name!r} must have shape {list(want)}, got {list(x.shape)}")
        return batch

    def describe(self) -> dict[str, Any]:
        """Plain-data description for the manifest."""
        io = lambda ts: {t.name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for t in ts}  # noqa: E731
        return {
            "network": self.network,
            "precision": precision_tag(self.precision),
            "inputs": io(self.inputs),
            "outputs": io(self.outputs),
            "axes": {a: {"min": r.min, "opt": r.opt, "max": r.max} for a, r in self.axes},
            "batch_sizes": list(self.batch_sizes),
        }

    def io_fingerprint(self) -> str:
        """Hash of names, dtypes and shapes without the batch range: an ONNX graph with dynamic
        batch serves any range, an engine does not (its name carries `profile_tag`)."""
        d = self.describe()
        d.pop("axes")
        d.pop("batch_sizes")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def profile_tag(self) -> str:
        """The batch range in file names, ``b<min>-<opt>-<max>`` (AOTInductor packages)."""
        r = self.batch
        return f"b{r.min}-{r.opt}-{r.max}"

    def sizes_tag(self) -> str:
        """The optimization profiles in TensorRT plan names: ``p<size>-<size>...``."""
        return "p" + "-".join(map(str, self.batch_sizes))


# ---------------------------------------------------------------------------------------------
# construction


def batch_range(batch_sizes: Sequence[int]) -> AxisRange:
    """min/opt/max over the batch sizes in use; opt is the largest (where time is spent)."""
    sizes = list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes is empty: give at least one batch size")
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch sizes must be positive integers, got {b!r} in {tuple(sizes)!r}")
    return AxisRange(min(sizes), max(sizes), max(sizes))


def network_batch_sizes(network: str, unet_batch_sizes: Sequence[int]) -> tuple[int, ...]:
    """Batch sizes `network` sees when the UNet runs `unet_batch_sizes` (CFG doubling included):
    the UNet gets them as given; the VAE and the text encoder get the K = B/2 prompts, and 1."""
    batch_range(unet_batch_sizes)  # validates
    if network == "unet":
        return tuple(sorted(set(unet_batch_sizes)))
    _check_network(network)
    return tuple(sorted({1, *(max(1, b // 2) for b in unet_batch_sizes)}))


def _check_network(network: str) -> None:
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r} (expected one of {', '.join(NETWORKS)})")


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def vae_scale_factor(vae: Any) -> int:
    """Image pixels per latent pixel: 2 per VAE level below the first (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def make_spec(
    model: Any,
    network: str,
    batch_sizes: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    latent_size: int | tuple[int, int] | None = None,
) -> NetworkSpec:
    """Spec of one network of a loaded `DiffusionModel` for the batch sizes it will see.

    `batch_sizes` are that network's own batches (see `network_batch_sizes`); `dtype` defaults
    to the model's; `latent_size` (h, w) defaults to the UNet config's ``sample_size``.
    """
    _check_network(network)
    dtype = dtype or model.dtype
    precision_tag(dtype)
    axes = ((BATCH, batch_range(batch_sizes)),)
    sizes = tuple(sorted(set(batch_sizes)))
    h, w = _hw(latent_size if latent_size is not None else model.unet.config.sample_size)
    c = int(model.latent_channels)
    if network == "unet":
        num_timesteps = int(model.alphas_cumprod.shape[0])
        inputs = (
            TensorSpec("sample", dtype, (BATCH, c, h, w)),  # noisy latents
            TensorSpec("timestep", torch.float32, (BATCH,), sample_range=(0, num_timesteps)),
            TensorSpec("encoder_hidden_states", dtype, (BATCH, int(model.max_length), int(model.text_dim))),
        )
        outputs = (TensorSpec("noise_pred", dtype, (BATCH, int(model.unet.config.out_channels), h, w)),)
    elif network in ("vae_encoder", "vae_decoder"):
        s = vae_scale_factor(model.vae)
        cfg = model.vae.config
        if network == "vae_encoder":
            inputs = (TensorSpec("images", dtype, (BATCH, int(cfg.in_channels), h * s, w * s)),)  # in [-1, 1]
            outputs = (TensorSpec("latents", dtype, (BATCH, c, h, w)),)  # scaled posterior mean
        else:
            inputs = (TensorSpec("latents", dtype, (BATCH, c, h, w)),)  # scaled
            outputs = (TensorSpec("images", dtype, (BATCH, int(cfg.out_channels), h * s, w * s)),)
    else:
        try:
            text_encoder = model.require_text_encoder()  # loads a deferred one
        except ValueError:
            raise ValueError("text_encoder spec: the model's text encoder was freed (free_text_encoder())") from None
        vocab = int(text_encoder.config.vocab_size)
        inputs = (TensorSpec("input_ids", torch.int64, (BATCH, int(model.max_length)), sample_range=(0, vocab)),)
        outputs = (TensorSpec("last_hidden_state", dtype, (BATCH, int(model.max_length), int(model.text_dim))),)
    return NetworkSpec(network=network, inputs=inputs, outputs=outputs, axes=axes, precision=dtype, sizes=sizes)
