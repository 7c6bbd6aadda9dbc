"""Tiny but real Stable Diffusion components for CPU tests.

Everything is built from scratch (no hub access): a 2-level cross-attention UNet, a 4-level
AutoencoderKL (so images are 8x the latent size, as in SD), a two-layer CLIP text model and a
byte-level BPE tokenizer whose vocabulary this module writes. The components are saved through
the real diffusers/transformers code paths, in two layouts:

- `make_tiny_sd_folder(path)`: a diffusers folder (`StableDiffusionPipeline.save_pretrained`);
- `make_tiny_single_file(path)`: one original-LDM-layout checkpoint (`.safetensors` or `.ckpt`)
  with the same weights, plus the diffusers configs (model_index.json, component configs,
  tokenizer, scheduler; no weights) in the same folder, which is how `load_diffusion` finds the
  configs of a single-file checkpoint offline.

The diffusers -> LDM key mapping below is written for these components' block layout (it is the
inverse of what diffusers' single-file loader undoes), so loading the single file through
`StableDiffusionPipeline.from_single_file` and comparing with the folder tests that loader path.

Fixtures: import `tiny_sd_paths` into a test module (``from tiny_sd import tiny_sd_paths``) or
move it to conftest.py; it builds both layouts once per session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Words the tests' prompts use; each gets a whole-word BPE token (anything else still
# tokenizes, byte by byte).
WORDS = (
    "a", "an", "of", "photo", "hamburger", "delicious", "dog", "cat", "red", "blue", "chair",
    "front", "side", "back", "overhead", "view", "blurry", "low", "quality", "ugly", "squirrel",
)  # fmt: skip

TEXT_DIM = 32
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE alphabet: printable Latin-1 bytes map to themselves, the others to
    code points from 256 upwards, so every byte is one visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tiny_vocab(folder: Path) -> Path:
    """Write vocab.json and merges.txt of a CLIP-style BPE: the 256 byte symbols, their
    end-of-word forms, one merge chain per word of `WORDS`, then the two special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        cur = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + "</w>" if i == len(word) - 1 else ch
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            if cur not in tokens:
                tokens.append(cur)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Add small noise to every parameter so no two tensors are equal (zero-initialised biases
    would otherwise hide a swapped key in the LDM mapping)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def build_tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of tiny components with deterministic weights."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_vocab(Path(tmp)), model_max_length=MAX_LENGTH)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=TEXT_DIM,
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for i, module in enumerate((unet, vae, text_encoder)):
        _perturb_(module, seed * 10 + i)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_sd_folder(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny pipeline as a diffusers folder at `path`; returns `path`."""
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# diffusers -> original LDM key layout

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, prefixes: dict[str, str], resnet_prefixes: set[str], resnet_names: dict[str, str]) -> str:
    """Swap the longest matching diffusers prefix for its LDM prefix; inside resnets also rename
    the layer."""
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if best is None:
        raise KeyError(f"no LDM name for {key!r}")
    rest = key[len(best) :]
    if best in resnet_prefixes:
        layer, _, leaf = rest.rpartition(".")
        rest = f"{resnet_names.get(layer, layer)}.{leaf}"
    return prefixes[best] + rest


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> `model.diffusion_model.*` (input/middle/output blocks)."""
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    pre = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    resnets = {"mid_block.resnets.0.", "mid_block.resnets.1."}
    for b in range(levels):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            pre[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{i}.0."
            pre[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{i}.1."
            resnets.add(f"down_blocks.{b}.resnets.{j}.")
        if b < levels - 1:
            pre[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{1 + b * (per + 1) + per}.0.op."
        has_attn = "CrossAttn" in config["up_block_types"][b]
        for j in range(per + 1):
            i = b * (per + 1) + j
            pre[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{i}.0."
            pre[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{i}.1."
            resnets.add(f"up_blocks.{b}.resnets.{j}.")
        if b < levels - 1:
            last = b * (per + 1) + per  # the upsampler follows the last resnet (and its attention)
            pre[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{last}.{2 if has_attn else 1}.conv."
    return {"model.diffusion_model." + _rename(k, pre, resnets, _UNET_RESNET): v for k, v in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> `first_stage_model.*` (encoder.down / decoder.up, reversed)."""
    levels = len(config["block_out_channels"])
    pre = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    resnets = set()
    for part in ("encoder", "decoder"):
        pre |= {f"{part}.conv_in.": f"{part}.conv_in.", f"{part}.conv_out.": f"{part}.conv_out.",
                f"{part}.conv_norm_out.": f"{part}.norm_out.",
                f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1."}  # fmt: skip
        for k in range(2):
            pre[f"{part}.mid_block.resnets.{k}."] = f"{part}.mid.block_{k + 1}."
            resnets.add(f"{part}.mid_block.resnets.{k}.")
    for i in range(levels):
        for j in range(config["layers_per_block"]):
            pre[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            resnets.add(f"encoder.down_blocks.{i}.resnets.{j}.")
        pre[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        for j in range(config["layers_per_block"] + 1):
            pre[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
            resnets.add(f"decoder.up_blocks.{i}.resnets.{j}.")
        pre[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - i}.upsample.conv."
    out = {}
    for key, value in state.items():
        new = _rename(key, pre, resnets, {"conv_shortcut": "nin_shortcut"})
        if ".mid.attn_1." in new:
            layer, _, leaf = new.rpartition(".")
            head, _, name = layer.partition(".mid.attn_1.")
            new = f"{head}.mid.attn_1.{_VAE_ATTN[name]}.{leaf}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> SD1-style `cond_stage_model.transformer.text_model.*`."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def make_tiny_single_file(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline's weights as one LDM-layout checkpoint at `path` (`.safetensors`,
    or `.ckpt` saved with torch.save under a "state_dict" key), and its diffusers configs
    (no weights) beside it in the same folder. Returns `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(seed)
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
        **clip_to_ldm(pipe.text_encoder.state_dict()),
    }
    state = {k: v.contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        raise ValueError(f"single-file checkpoint must end in .safetensors or .ckpt, got '{path}'")
    pipe.save_config(folder)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_config(folder / "scheduler")
    return path


@dataclass(frozen=True)
class TinySDPaths:
    folder: Path  # diffusers folder
    single_file: Path  # tiny.safetensors (configs beside it)
    ckpt: Path  # tiny.ckpt, same weights


def build_tiny_sd(root: str | Path) -> TinySDPaths:
    root = Path(root)
    return TinySDPaths(
        folder=make_tiny_sd_folder(root / "folder"),
        single_file=make_tiny_single_file(root / "single" / "tiny.safetensors"),
        ckpt=make_tiny_single_file(root / "ckpt" / "tiny.ckpt"),
    )


@pytest.fixture(scope="session")
def tiny_sd_paths(tmp_path_factory) -> TinySDPaths:
    """Both layouts of the same tiny weights, built once per session."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
