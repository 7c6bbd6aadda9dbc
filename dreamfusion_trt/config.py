"""Typed run configuration: one dataclass per component, composed into `RunConfig`.

Precedence is defaults < YAML file < command line. Every field is reachable on the command
line as ``--section.field`` (for example ``--sds.guidance_scale 50``); `add_config_arguments`
derives those flags from the dataclasses so `--help` always lists every option with its default.
A choice among variants is a `Literal`, never a pile of booleans.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_MODEL = "builtin"  # the package's own known-answer prior (dreamfusion_trt/prior/weights)

# Choices spelled once: code that lists them derives the tuple with `typing.get_args`.
BackendName = Literal["auto", "eager", "inductor", "aotinductor", "tensorrt"]  # frozen-network backends
NormalsMode = Literal["analytic", "finite_difference", "autograd"]
MeshLevelMode = Literal["fixed", "opacity"]  # how output.mesh_level picks the level a mesh is cut at


@dataclass
class ModelConfig:
    """Which frozen Stable Diffusion to distil from and how to run it."""

    model: str = DEFAULT_MODEL  # builtin (the package's known-answer prior), a hub id, a local diffusers folder, or a single .safetensors/.ckpt file
    revision: str | None = None  # hub revision (branch, tag or commit)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    local_files_only: bool = False  # never touch the network
    cache_dir: str = "~/.cache/dreamfusion_trt"  # text-embedding and engine caches
    backend: BackendName = "auto"  # noise predictor: auto = TensorRT or AOTInductor when built, else torch.compile on CUDA (3x eager at batch 2 on an H200), else eager
    engines_dir: str = "engines"  # where build_engines.py left engines (inductor/aotinductor/tensorrt)


@dataclass
class PromptConfig:
    """The text prompt and how it is varied with the camera."""

    text: str = ""
    negative: str = ""  # negative prompt; empty string = plain unconditional embedding
    view_dependent: bool = True  # append ", front view" / "side view" / "back view" / "overhead view"
    front_azimuth_deg: float = 60.0  # |azimuth| below half of this is the front, above 180 minus half is the back
    overhead_elevation_deg: float = 60.0  # elevation above this is overhead


@dataclass
class SDSConfig:
    """Score Distillation Sampling."""

    guidance_scale: float = 100.0
    high_noise_guidance_scale: float = 0.0  # guidance for timesteps above high_noise_t (0: guidance_scale at every t); strong guidance at high noise inflates objects (BENCHMARKS.md, fifth session)
    high_noise_t: float = 0.6  # fraction of the scheduler's timesteps above which high_noise_guidance_scale applies
    high_noise_share: float = 0.0  # share of steps whose t is drawn uniformly from (high_noise_t, high_noise_t_max] instead of the (annealed) [t_min, t_max]: high-noise steps all run long, beside the schedule; with high_noise_colour_only they are colour steps
    high_noise_t_max: float = 0.98
    high_noise_colour_only: bool = False  # above high_noise_t, SDS reaches the colour only: the render's weights, opacity and shading normals pass no gradient to the density (it moves only through the parameters the albedo shares with it), so high-noise steps (where the prior settles an object's colours) cannot grow its shape (where strong guidance inflates it); needs t_max above high_noise_t or a high_noise_share
    t_min: float = 0.02  # fraction of the scheduler's timesteps
    t_max: float = 0.98
    t_anneal: Literal["none", "linear", "sqrt"] = "none"  # shrink t_max towards t_max_final over training
    t_sequence: Literal["random", "stratified", "decreasing"] = "random"  # random: every step's timestep drawn independently; stratified: its share of the (annealed) range from a low-discrepancy sequence started by the prompt's seed (sequence.py), jointly with camera.sequence's views; decreasing: no draw, the top of the range at the first step falling linearly to its bottom at the last (a time-prioritised schedule, as DreamTime and HiFA anneal t; with t_anneal none it runs t_max -> t_min)
    t_max_final: float = 0.5
    weighting: Literal["one_minus_alpha", "uniform", "sqrt_one_minus_alpha"] = "one_minus_alpha"  # w(t)
    rgb_mode: Literal["latent", "image"] = "latent"  # RGB phase: SDS on latents (backprop through the VAE encoder) or image-space SDS (encoder and decoder inference-only, so they can be engines)
    colour_preconditioning: bool = False  # multiply each pixel's RGB gradient by a damped Gauss-Newton colour preconditioner from the VAE's colour -> latent map, so colour directions the latent barely sees (red against white, for the built-in prior) pull as hard as the others (guidance/precondition.py)
    colour_damping: float = 0.1  # the preconditioner's damping, relative to the map's mean eigenvalue; smaller = closer to the full inverse
    estimator: Literal["sds", "ism"] = "sds"  # sds: DreamFusion's w(t) (eps_hat(x_t) - eps) with fresh noise; ism: interval score matching (LucidDreamer, Liang et al. 2024): x_t comes from the render by deterministic DDIM inversion through x_s, s = t - ism_interval, and the target is the unconditional prediction at x_s instead of the drawn noise (latent space only). On the built-in prior at its guidance 7.5 it lost 0.110 IoU over 48 paired runs (H200, BENCHMARKS.md, nineteenth session)
    ism_interval: float = 0.05  # with estimator ism: t - s, as a fraction of the scheduler's timesteps
    ism_inversion_steps: int = 3  # with estimator ism: unconditional DDIM inversion steps from 0 to s (each one predictor call on the K renders), then one step from s to t


@dataclass
class FieldConfig:
    """Hash-grid NeRF: density and albedo, plus the background."""

    backend: Literal["auto", "torch", "triton"] = "auto"  # hash grid: auto = fused Triton kernels on CUDA when triton imports, else PyTorch
    bound: float = 1.0  # the scene lives in [-bound, bound]^3
    num_levels: int = 16
    level_dim: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 2048
    hidden_dim: int = 64
    num_layers: int = 3
    density_activation: Literal["exp", "softplus"] = "exp"
    blob_density: float = 10.0  # density added at the centre at init (DreamFusion's blob)
    blob_radius: float = 0.5
    blob_fade: float = 0.0  # share of a prompt's iterations over which the blob fades linearly to nothing (0: it stays all run, as in DreamFusion); a blob that stays biases the centre to be full, against a torus's hole
    albedo_noise: float = 0.0  # amplitude (in logits) of a fixed random smooth colour field added to the albedo, drawn per prompt from its seed and blind to the object: the faces start apart, so SDS can give each its own colour (0: off; the prior's six-colored cube, BENCHMARKS.md, fifteenth session)
    albedo_noise_frequency: float = 4.0  # with albedo_noise: the spread of its plane waves' wave numbers, radians per world unit
    albedo_noise_fade: float = 0.0  # with albedo_noise: share of a prompt's iterations over which its offset fades linearly to nothing (0: it stays all run)
    albedo_features: Literal["shared", "own"] = "shared"  # shared: density and albedo read one hash grid and one MLP (DreamFusion, threestudio); own: the albedo has a hash grid and MLP of its own, so colour gradients never move the density's parameters (geometry and appearance apart, as Fantasia3D keeps them); a second grid query per sample
    coarse_to_fine: float = 0.0  # share of a prompt's iterations over which the hash grid's levels switch on, coarse to fine (0: all levels from the first step)
    coarse_levels: int = 2  # with coarse_to_fine: levels on from the first step; the others ramp in one after another
    normals: NormalsMode = "analytic"  # density normals: analytic = the hash grid's own Jacobian in the same query (one grid pass per sample; finite differences take seven)
    fd_eps: float = 1e-2  # finite-difference step, in world units
    background: Literal["mlp", "solid", "random"] = "mlp"
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)  # for background=solid


@dataclass
class RenderConfig:
    """Ray marching and shading."""

    backend: Literal["auto", "nerfacc", "torch"] = "auto"  # auto: nerfacc on CUDA, torch on CPU
    num_samples: int = 96  # samples per ray for the torch renderer
    grid_resolution: int = 128  # nerfacc occupancy grid
    grid_update_every: int = 16
    grid_warmup: int = 0  # nerfacc: steps of each prompt before its grid's first refresh (the grid stays fully occupied, every cell of the box sampled); nerfacc's own schedule starts after them. 0 as before: at init only a ball of ~blob_radius is occupied (bench.initial_occupancy)
    occupancy_threshold: float = 0.01
    render_step_size: float = 0.0  # nerfacc march step; 0 = derive from bound and num_samples
    batched_marching: bool = True  # nerfacc: one march for all K prompts (their boxes side by side in one grid), a few host syncs per step instead of ~3 per prompt; false marches each prompt's grid alone (the twin)
    shading: Literal["random", "albedo", "lambertian", "textureless", "normal"] = "random"
    albedo_iters: int = 1000  # with shading=random: albedo only for the first N iterations
    textureless_ratio: float = 0.2  # with shading=random: share of textureless steps after that
    ambient_ratio: float = 0.1


@dataclass
class CameraConfig:
    """Random training cameras (DreamFusion's distribution) and validation orbits."""

    render_size: int = 64  # RGB phase render size; the latent phase renders at the model's latent size (64 for SD)
    radius_range: tuple[float, float] = (1.0, 1.5)
    elevation_range: tuple[float, float] = (-10.0, 90.0)  # degrees
    elevation_sampling: Literal["sphere", "angle"] = "sphere"  # sphere: uniform on the sphere's band (overhead views as rare as their solid angle); angle: uniform in degrees, as stable-dreamfusion and threestudio draw it (2.6x more views above 60 degrees over -10..90)
    angle_until: float = 0.0  # share of a run's steps whose elevations are drawn as `angle` before elevation_sampling takes over (overhead views early, while the coarse shape forms; 0 = off)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)  # degrees, 0 = front
    sequence: Literal["random", "stratified"] = "random"  # random: every step's azimuth and elevation drawn independently (DreamFusion); stratified: from a low-discrepancy sequence started by the prompt's seed (sequence.py), the same distribution covered evenly over every stretch of steps
    fovy_range: tuple[float, float] = (40.0, 70.0)  # degrees
    val_radius: float = 1.25
    val_elevation: float = 15.0
    val_fovy: float = 55.0
    light_distance_range: tuple[float, float] = (0.8, 1.5)  # point light, relative to camera radius


@dataclass
class RegularizerConfig:
    """Loss weights; 0 switches a term off."""

    orientation: float = 1e-2  # Ref-NeRF: penalise normals facing away from the camera
    entropy: float = 1e-3  # push ray opacity towards 0 or 1
    sparsity: float = 0.0  # mean ray opacity


@dataclass
class TrainConfig:
    """Optimisation, precision, checkpoints and logging."""

    iters: int = 10000
    latent_fraction: float = 0.3  # first fraction of iterations in latent space, then RGB through the VAE
    encode_size: int = 0  # RGB phase: renders are resized to this before the VAE encoder; 0 = the model's native size (512 for SD)
    rgb_encoder: Literal["auto", "vae", "distilled"] = "auto"  # RGB phase render -> latents: the full VAE encoder, or a small encoder distilled from it (fitted once per model and size, refused below its parity threshold); auto = distilled on CUDA when its parity passes, else the VAE
    compile_rgb_encoder: Literal["auto", "on", "off"] = "off"  # the distilled render encoder's forward and backward through torch.compile (an Inductor failure falls back to eager with one warning); auto = on CUDA. Off by default: on the H200 it left the K=1 RGB step at 31.3 ms (BENCHMARKS.md, fourth session) and costs a compile at start-up
    lr: float = 1e-3  # MLP learning rate; the hash grid uses grid_lr_scale times this
    grid_lr_scale: float = 10.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 autocast on CUDA, fp32 on CPU
    tf32: bool = True
    compile: bool = False  # torch.compile the field and renderer (CUDA only)
    cuda_graph: Literal["auto", "on", "off"] = "auto"  # replay the whole step (render, guidance, backward, Adam) as one CUDA graph per step shape, after a few eager steps; renders with the torch sampler (static shapes); auto = on CUDA for one prompt per step, whose steps are host-bound; off for data parallel
    compile_optimizer: Literal["auto", "on", "off"] = "auto"  # Adam's masked per-slot update through torch.compile (a few fused kernels instead of ~15 launches per parameter); auto = on CUDA
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume, somewhat slower
    device: str = "auto"
    ckpt_every: int = 1000
    log_every: int = 10
    tensorboard: bool = False
    trace_every: int = 0  # built-in prior only: every N steps of a prompt, its known-answer scores (field IoU, volume, opacity, the albedo's colour) as one row of <run>/trace.jsonl; 0 = off
    data_parallel: bool = False  # generate under torchrun: every rank renders its own cameras of the one prompt and all step on their mean gradient (N times the views per step); off: one process per prompt


@dataclass
class OutputConfig:
    """What a finished run writes."""

    out: str = "runs/default"
    mesh_formats: tuple[str, ...] = ("glb",)  # any of glb, obj, ply
    mesh_resolution: int = 128  # marching-cubes grid per axis
    mesh_threshold: float = 10.0  # density iso-level (with mesh_level: opacity, the centre of the levels searched)
    mesh_level: MeshLevelMode = "fixed"  # fixed: cut at mesh_threshold; opacity: per prompt, the level whose silhouettes agree best with the scene's renders (export/mesh_level.py)
    mesh_fill_cavities: bool = True  # fill empty pockets enclosed by the surface: a solid, not a shell
    video_frames: int = 120
    video_fps: int = 30
    video_size: int = 256
    grid_views: int = 8  # validation image grid
    background_writes: bool = True  # batch: a finished prompt's outputs are written on a worker thread (its own CUDA stream) while the others train; false writes them in the loop, as a twin for debugging


@dataclass
class RunConfig:
    model: ModelConfig = _field(default_factory=ModelConfig)
    prompt: PromptConfig = _field(default_factory=PromptConfig)
    sds: SDSConfig = _field(default_factory=SDSConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    render: RenderConfig = _field(default_factory=RenderConfig)
    camera: CameraConfig = _field(default_factory=CameraConfig)
    reg: RegularizerConfig = _field(default_factory=RegularizerConfig)
    train: TrainConfig = _field(default_factory=TrainConfig)
    output: OutputConfig = _field(default_factory=OutputConfig)


# What a run on a CPU uses unless the user says otherwise: the built-in prior's CPU sizes. The
# full-size field and renders take about 30 s an iteration on two cores (days for a default run).
CPU_PRESET: dict[str, dict[str, Any]] = {
    "field": {"num_levels": 8, "log2_hashmap_size": 16, "max_resolution": 256, "hidden_dim": 32, "num_layers": 2,
              "normals": "autograd"},
    "render": {"num_samples": 32, "albedo_iters": 200},
    "camera": {"render_size": 32},
    "train": {"iters": 400, "encode_size": 64},
    "output": {"mesh_resolution": 64, "video_size": 64, "video_frames": 24},
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# dict / YAML round trip


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (tuples become lists) for YAML and JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one value against its annotated type; raise ValueError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from exc
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Overlay a nested dict (from YAML or a checkpoint) on `base`; unknown keys are errors."""
    cfg = base if base is not None else RunConfig()
    sections = _field_types(RunConfig)
    for section, values in data.items():
        if section not in sections:
            raise ValueError(f"unknown config section {section!r} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
        sub = getattr(cfg, section)
        types = _field_types(type(sub))
        updates = {}
        for key, value in values.items():
            if key not in types:
                raise ValueError(f"unknown config key {section}.{key}")
            updates[key] = _coerce(value, types[key], f"{section}.{key}")
        setattr(cfg, section, dataclasses.replace(sub, **updates))
    return cfg


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: '{path}'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a mapping of sections")
    return from_dict(data, base)


# ---------------------------------------------------------------------------------------------
# command line


def _help_for(cls: type) -> dict[str, str]:
    """Pull the trailing `# comment` of each field out of the class source as its help text."""
    import inspect

    helps: dict[str, str] = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return helps
    for line in lines:
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
            name = stripped.split(":", 1)[0].strip()
            helps[name] = stripped.split("#", 1)[1].strip()
    return helps


def add_config_arguments(parser: argparse.ArgumentParser, variants: dict[str, dict[str, dict[str, Any]]] | None = None) -> None:
    """Add ``--section.field`` for every config field, default shown, value parsed later.
    `variants` ({label: nested overrides}) are shown beside the default where they change it,
    e.g. ``(default: 10000; built-in prior: 2000; on a CPU: 400)``."""
    defaults = RunConfig()
    for section, sec_type in _field_types(RunConfig).items():
        group = parser.add_argument_group(f"{section} options ({sec_type.__doc__.strip().splitlines()[0]})")
        helps = _help_for(sec_type)
        sub = getattr(defaults, section)
        for f in dataclasses.fields(sub):
            shown = [_shown(getattr(sub, f.name))]
            for label, data in (variants or {}).items():
                if f.name in data.get(section, {}):
                    shown.append(f"{label}: {_shown(data[section][f.name])}")
            text = helps.get(f.name, "")
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"cfg__{section}__{f.name}",
                default=None,
                metavar="VALUE",
                help=f"{text} (default: {'; '.join(shown)})" if text else f"(default: {'; '.join(shown)})",
            )


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Collect the ``--section.field`` values that were given, as a nested dict of strings."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            _, section, name = key.split("__", 2)
            out.setdefault(section, {})[name] = value
    return out
