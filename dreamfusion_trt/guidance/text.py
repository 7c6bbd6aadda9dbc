"""Prompts -> text embeddings: view-dependent prompt variants, validation, and an on-disk cache.

DreamFusion appends the camera's view to the prompt ("a hamburger, front view"), so each prompt
has one conditional embedding per view plus one unconditional (or negative-prompt) embedding.
Embeddings are cached as safetensors under ``<cache_dir>/text_embeddings/<model.key>/`` keyed by
a hash of the exact texts encoded, the token length and the dtype; a cache hit never touches the
tokenizer or text encoder, so the caller can free the encoder once every prompt is embedded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..config import PromptConfig
from ..sdmodel import DiffusionModel

logger = logging.getLogger(__name__)

VIEWS = ("front", "side", "back", "overhead")
NO_VIEW = "any"  # the single row of a prompt that is not view-dependent
_CACHE_VERSION = 1
_ENCODE_BATCH = 32  # texts per text-encoder call


def view_prompt(prompt: str, view: str) -> str:
    """"a hamburger" + "front" -> "a hamburger, front view"."""
    return f"{prompt}, {view} view"


def view_indices(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, cfg: PromptConfig) -> torch.Tensor:
    """Index into `VIEWS` per camera: [K] elevations and azimuths (degrees) -> LongTensor [K].

    Overhead when elevation > overhead_elevation_deg; otherwise front when |azimuth| is below
    half of front_azimuth_deg, back when it is above 180 minus that half, side in between
    (boundaries go to the side). All zeros when the prompt is not view-dependent.
    """
    if elevation_deg.shape != azimuth_deg.shape or elevation_deg.ndim != 1:
        shapes = f"{tuple(elevation_deg.shape)} and {tuple(azimuth_deg.shape)}"
        raise ValueError(f"expected elevation and azimuth of shape [K], got {shapes}")
    if not cfg.view_dependent:
        return torch.zeros(elevation_deg.shape, dtype=torch.long, device=elevation_deg.device)
    az = (torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0).abs()
    half = cfg.front_azimuth_deg / 2.0
    idx = torch.full(az.shape, VIEWS.index("side"), dtype=torch.long, device=az.device)
    idx = torch.where(az < half, VIEWS.index("front"), idx)
    idx = torch.where(az > 180.0 - half, VIEWS.index("back"), idx)
    return torch.where(elevation_deg > cfg.overhead_elevation_deg, VIEWS.index("overhead"), idx)


@dataclass
class PromptEmbeddings:
    cond: torch.Tensor  # [V, 77, D], one row per entry of `views`
    uncond: torch.Tensor  # [77, D], empty or negative prompt
    views: tuple[str, ...]  # VIEWS, or (NO_VIEW,) when not view-dependent
    prompt: str
    truncated: bool  # some text was longer than the encoder's token window


def stack_embeddings(embeddings: list[PromptEmbeddings]) -> tuple[torch.Tensor, torch.Tensor]:
    """K prompts -> cond [K, V, 77, D] and uncond [K, 77, D]; pick a view per prompt with
    ``cond[torch.arange(K), view_idx]``. All prompts must share the view setting."""
    if len({e.views for e in embeddings}) != 1:
        raise ValueError(f"prompts mix view settings: {sorted({e.views for e in embeddings})}")
    return torch.stack([e.cond for e in embeddings]), torch.stack([e.uncond for e in embeddings])


def encode_prompt(model: DiffusionModel, cfg: PromptConfig, cache_dir: str | Path) -> PromptEmbeddings:
    """Embeddings of one prompt, from the cache or the text encoder (then cached)."""
    return encode_prompts(model, [cfg], cache_dir)[0]


def encode_prompts(model: DiffusionModel, cfgs: list[PromptConfig], cache_dir: str | Path) -> list[PromptEmbeddings]:
    """Embeddings of many prompts: cached ones are read back, all the others' distinct texts
    go through the text encoder together in batches of up to 32."""
    jobs = [_Job.make(model, cfg, Path(cache_dir).expanduser()) for cfg in cfgs]
    out: list[PromptEmbeddings | None] = [job.load(model) for job in jobs]
    todo = [i for i, emb in enumerate(out) if emb is None]
    if todo:
        try:
            model.require_text_encoder()  # a deferred load happens here, for uncached prompts only
        except ValueError:
            raise ValueError(
                f"no cached embeddings for prompt {jobs[todo[0]].cfg.text.strip()!r} and the text encoder was freed; "
                "encode every prompt before free_text_encoder()"
            ) from None
        texts = list(dict.fromkeys(t for i in todo for t in (*jobs[i].cond_texts, jobs[i].uncond_text)))
        cut = {text: _truncated_part(model, text) for text in texts}
        table = dict(zip(texts, _encode(model, texts)))
        for i in todo:
            job = jobs[i]
            job_cut = {"cond": [cut[t] for t in job.cond_texts if cut[t]], "uncond": cut[job.uncond_text]}
            job.warn(model, job_cut)
            emb = PromptEmbeddings(
                cond=torch.stack([table[t] for t in job.cond_texts]),
                uncond=table[job.uncond_text].clone(),  # not a view pinning the whole batch
                views=job.views,
                prompt=job.cfg.text.strip(),
                truncated=bool(job_cut["cond"] or job_cut["uncond"]),
            )
            job.save(emb, job_cut)
            out[i] = emb
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------


@dataclass
class _Job:
    cfg: PromptConfig
    views: tuple[str, ...]
    cond_texts: tuple[str, ...]
    uncond_text: str
    path: Path

    @classmethod
    def make(cls, model: DiffusionModel, cfg: PromptConfig, cache_dir: Path) -> "_Job":
        prompt = cfg.text.strip()
        if not prompt:
            raise ValueError(f"prompt is empty ({cfg.text!r})")
        views = VIEWS if cfg.view_dependent else (NO_VIEW,)
        cond = tuple(view_prompt(prompt, v) for v in VIEWS) if cfg.view_dependent else (prompt,)
        uncond = cfg.negative.strip()
        ident = json.dumps(
            {
                "v": _CACHE_VERSION,
                "cond": cond,
                "uncond": uncond,
                "max_length": model.max_length,
                "dtype": str(model.dtype),
            }
        )
        digest = hashlib.sha256(ident.encode()).hexdigest()[:24]
        return cls(cfg, views, cond, uncond, cache_dir / "text_embeddings" / model.key / f"{digest}.safetensors")

    def load(self, model: DiffusionModel) -> PromptEmbeddings | None:
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device=str(model.device)) as f:
                meta = f.metadata() or {}
                cond, uncond = f.get_tensor("cond"), f.get_tensor("uncond")
            cut = json.loads(meta["cut"])
        except Exception as exc:  # noqa: BLE001 -- a damaged cache entry is re-encoded, not fatal
            logger.warning("ignoring unreadable text-embedding cache '%s': %s", self.path, exc)
            return None
        if cond.shape != (len(self.views), model.max_length, model.text_dim):
            logger.warning("ignoring text-embedding cache '%s' of shape %s", self.path, tuple(cond.shape))
            return None
        self.warn(model, cut)
        logger.debug("text embeddings for %r from %s", self.cfg.text, self.path)
        truncated = bool(cut["cond"] or cut["uncond"])
        prompt = self.cfg.text.strip()
        return PromptEmbeddings(cond.to(model.dtype), uncond.to(model.dtype), self.views, prompt, truncated)

    def warn(self, model: DiffusionModel, cut: dict) -> None:
        """One warning per truncated text kind, quoting what the encoder will not see."""
        window = f"longer than the text encoder's {model.max_length}-token window"
        if cut["cond"]:
            n, of = len(cut["cond"]), len(self.cond_texts)
            more = f" (cut in {n} of {of} view variants)" if of > 1 else ""
            prompt = self.cfg.text.strip()
            logger.warning("prompt %r is %s; this part was cut: %r%s", prompt, window, cut["cond"][0], more)
        if cut["uncond"]:
            logger.warning("negative prompt %r is %s; this part was cut: %r", self.uncond_text, window, cut["uncond"])

    def save(self, emb: PromptEmbeddings, cut: dict) -> None:
        from safetensors.torch import save_file

        tensors = {"cond": emb.cond.detach().cpu().contiguous(), "uncond": emb.uncond.detach().cpu().contiguous()}
        meta = {
            "prompt": emb.prompt,
            "views": json.dumps(emb.views),
            "uncond": self.uncond_text,
            "cut": json.dumps(cut),
        }
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)


def _truncated_part(model: DiffusionModel, text: str) -> str:
    """The text beyond the encoder's window (two of `max_length` tokens are start/end), or '';
    quoted from `text` itself through the tokenizer's character offsets."""
    enc = model.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False, return_offsets_mapping=True)
    room = model.max_length - 2
    return text[enc["offset_mapping"][room][0] :].strip() if len(enc["input_ids"]) > room else ""


def _encode(model: DiffusionModel, texts: list[str]) -> torch.Tensor:
    """texts -> last hidden states [N, max_length, D] in the model's dtype."""
    chunks = []
    with torch.no_grad():
        for i in range(0, len(texts), _ENCODE_BATCH):
            ids = model.tokenizer(
                texts[i : i + _ENCODE_BATCH],
                padding="max_length",
                max_length=model.max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            chunks.append(model.text_encoder(ids.to(model.device))[0].to(model.dtype))
    return torch.cat(chunks)
