"""View-dependent prompts and cached text embeddings, against a tiny real CLIP text model."""

import logging

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.config import PromptConfig
from dreamfusion_trt.guidance.text import (
    NO_VIEW,
    VIEWS,
    encode_prompt,
    encode_prompts,
    stack_embeddings,
    view_indices,
    view_prompt,
)
from dreamfusion_trt.sdmodel import load_diffusion

# Embeddings computed in a batch of one and in a larger batch (4 views, or several prompts) go
# through float32 CPU GEMMs whose blocking and summation order depend on the batch size and the
# thread count, so they agree to ~1e-6 on one machine and a few times that on another. The
# outputs are layer-normed, O(1): 1e-4 is far above that noise and far below any real mistake
# (a wrong prompt, padding mask or position gives differences of order 0.1).
ACROSS_BATCHES = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def model(tiny_sd_paths):
    """A fresh model per test: tests free or wrap its text encoder."""
    return load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="auto")


class CountingEncoder:
    """Wraps the text encoder and records the batch size of every call."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.calls: list[int] = []

    def __call__(self, input_ids):
        self.calls.append(input_ids.shape[0])
        return self.encoder(input_ids)


def direct_embedding(model, text: str) -> torch.Tensor:
    ids = model.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.text_encoder(ids).last_hidden_state[0]


def test_view_prompt():
    assert view_prompt("a hamburger", "front") == "a hamburger, front view"
    assert VIEWS == ("front", "side", "back", "overhead")


def test_view_indices_regions_and_boundaries():
    cfg = PromptConfig(text="x", front_azimuth_deg=60.0, overhead_elevation_deg=60.0)
    cases = [  # (elevation, azimuth, view)
        (0.0, 0.0, "front"),
        (10.0, -29.9, "front"),
        (10.0, 30.0, "side"),  # |azimuth| == half the front sector is already side
        (10.0, 90.0, "side"),
        (10.0, -150.0, "side"),  # == 180 - half is still side
        (10.0, 150.1, "back"),
        (10.0, 180.0, "back"),
        (10.0, 350.0, "front"),  # wraps to -10
        (60.0, 0.0, "front"),  # == overhead threshold is not overhead
        (60.1, 180.0, "overhead"),
        (90.0, 90.0, "overhead"),
    ]
    elev = torch.tensor([c[0] for c in cases])
    azim = torch.tensor([c[1] for c in cases])
    idx = view_indices(elev, azim, cfg)
    assert idx.dtype == torch.long
    assert [VIEWS[i] for i in idx.tolist()] == [c[2] for c in cases]
    flat = view_indices(elev, azim, PromptConfig(text="x", view_dependent=False))
    assert flat.tolist() == [0] * len(cases)
    # A wider front sector moves the boundaries.
    wide_cfg = PromptConfig(text="x", front_azimuth_deg=100.0)
    wide = view_indices(torch.tensor([0.0, 0.0]), torch.tensor([40.0, 131.0]), wide_cfg)
    assert [VIEWS[i] for i in wide.tolist()] == ["front", "back"]
    with pytest.raises(ValueError, match="shape"):
        view_indices(elev, azim[:3], cfg)


def test_encode_prompt_values(model, tmp_path):
    emb = encode_prompt(model, PromptConfig(text="  a hamburger ", negative="blurry"), tmp_path)
    assert emb.cond.shape == (4, 77, 32) and emb.uncond.shape == (77, 32)
    assert emb.views == VIEWS and emb.prompt == "a hamburger" and not emb.truncated
    for row, view in enumerate(VIEWS):
        torch.testing.assert_close(emb.cond[row], direct_embedding(model, f"a hamburger, {view} view"), **ACROSS_BATCHES)
    torch.testing.assert_close(emb.uncond, direct_embedding(model, "blurry"), **ACROSS_BATCHES)
    assert not torch.allclose(emb.cond[0], emb.cond[1])

    plain = encode_prompt(model, PromptConfig(text="a dog", view_dependent=False), tmp_path)
    assert plain.views == (NO_VIEW,) and plain.cond.shape == (1, 77, 32)
    torch.testing.assert_close(plain.cond[0], direct_embedding(model, "a dog"), **ACROSS_BATCHES)
    torch.testing.assert_close(plain.uncond, direct_embedding(model, ""), **ACROSS_BATCHES)


def test_cache_hit_needs_no_text_encoder(model, tmp_path):
    cfg = PromptConfig(text="a red chair")
    first = encode_prompt(model, cfg, tmp_path)
    files = list((tmp_path / "text_embeddings" / model.key).glob("*.safetensors"))
    assert len(files) == 1
    model.free_text_encoder()
    second = encode_prompt(model, cfg, tmp_path)
    assert torch.equal(second.cond, first.cond) and torch.equal(second.uncond, first.uncond)
    assert second.views == first.views and second.prompt == first.prompt
    with pytest.raises(ValueError, match="'a blue chair' and the text encoder was freed"):
        encode_prompt(model, PromptConfig(text="a blue chair"), tmp_path)


def test_a_lazy_text_encoder_is_read_only_for_uncached_prompts(model, tiny_sd_paths, tmp_path, monkeypatch):
    """`lazy_text_encoder`: the model loads without its text encoder (its config gives the
    token window and width), a cached prompt never reads it, the first uncached prompt does,
    and its embeddings are the eagerly loaded model's."""
    from dreamfusion_trt import sdmodel

    reads = []
    real = sdmodel._load_part
    monkeypatch.setattr(sdmodel, "_load_part", lambda name, load, where: (reads.append(name), real(name, load, where))[1])
    lazy = load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="auto", lazy_text_encoder=True)
    assert "text_encoder" not in reads and "text_encoder_config" in reads
    assert lazy.text_encoder is None and lazy.text_encoder_loader is not None
    assert (lazy.key, lazy.max_length, lazy.text_dim) == (model.key, model.max_length, model.text_dim)
    cached = encode_prompt(model, PromptConfig(text="a red chair"), tmp_path)  # the eager model fills the cache
    again = encode_prompt(lazy, PromptConfig(text="a red chair"), tmp_path)
    assert torch.equal(again.cond, cached.cond) and lazy.text_encoder is None and "text_encoder" not in reads
    fresh = encode_prompt(lazy, PromptConfig(text="a blue chair"), tmp_path / "other")
    assert reads.count("text_encoder") == 1 and lazy.text_encoder is not None and not lazy.text_encoder.training
    assert not any(p.requires_grad for p in lazy.text_encoder.parameters())
    twin = encode_prompt(model, PromptConfig(text="a blue chair"), tmp_path / "eager")
    assert torch.equal(fresh.cond, twin.cond) and torch.equal(fresh.uncond, twin.uncond)
    lazy.free_text_encoder()
    with pytest.raises(ValueError, match="text encoder was freed"):
        lazy.require_text_encoder()
    never = load_diffusion(str(tiny_sd_paths.folder), device="cpu", dtype="auto", lazy_text_encoder=True)
    never.free_text_encoder()  # freed before it was ever read: nothing is read
    assert reads.count("text_encoder") == 1 and never.text_encoder_loader is None
    with pytest.raises(ValueError, match="'a green chair' and the text encoder was freed"):
        encode_prompt(never, PromptConfig(text="a green chair"), tmp_path)


def test_cache_key_follows_negative_and_views(model, tmp_path):
    counter = CountingEncoder(model.text_encoder)
    model.text_encoder = counter
    a = encode_prompt(model, PromptConfig(text="a cat"), tmp_path)
    b = encode_prompt(model, PromptConfig(text="a cat", negative="ugly"), tmp_path)
    c = encode_prompt(model, PromptConfig(text="a cat", view_dependent=False), tmp_path)
    encode_prompt(model, PromptConfig(text="a cat", negative="ugly"), tmp_path)  # hit
    assert len(counter.calls) == 3
    assert len(list((tmp_path / "text_embeddings" / model.key).glob("*.safetensors"))) == 3
    assert torch.equal(a.cond, b.cond) and not torch.allclose(a.uncond, b.uncond)
    assert c.cond.shape[0] == 1


def test_truncation_warning_quotes_the_cut(model, tmp_path, caplog):
    long = "a photo of " + "a red chair " * 30 + "and a squirrel"
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt.guidance.text"):
        emb = encode_prompt(model, PromptConfig(text=long), tmp_path)
    assert emb.truncated
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "this part was cut" in messages[0] and "squirrel, front view'" in messages[0]
    assert "4 of 4 view variants" in messages[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt.guidance.text"):
        short = encode_prompt(model, PromptConfig(text="a squirrel", negative=long), tmp_path)
    assert short.truncated and len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("negative prompt")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt.guidance.text"):
        assert not encode_prompt(model, PromptConfig(text="a squirrel"), tmp_path).truncated
    assert not caplog.records


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_prompt(model, tmp_path, text):
    with pytest.raises(ValueError, match="prompt is empty"):
        encode_prompt(model, PromptConfig(text=text), tmp_path)


def test_encode_prompts_batches_and_matches_single(model, tmp_path):
    cfgs = [PromptConfig(text="a dog"), PromptConfig(text="a cat"), PromptConfig(text="a red chair", negative="blurry")]
    singles = [encode_prompt(model, cfg, tmp_path / "single") for cfg in cfgs]
    counter = CountingEncoder(model.text_encoder)
    model.text_encoder = counter
    batch = encode_prompts(model, cfgs, tmp_path / "batch")
    assert counter.calls == [3 * 4 + 2]  # 12 view prompts + "" + "blurry", one call
    for s, b in zip(singles, batch):
        torch.testing.assert_close(b.cond, s.cond, **ACROSS_BATCHES)
        torch.testing.assert_close(b.uncond, s.uncond, **ACROSS_BATCHES)
    # Cached and uncached prompts mixed: only the new one is encoded.
    again = encode_prompts(model, [cfgs[0], PromptConfig(text="a blue chair"), cfgs[2]], tmp_path / "batch")
    assert counter.calls == [14, 5]
    assert torch.equal(again[0].cond, batch[0].cond)
    cond, uncond = stack_embeddings(again)
    assert cond.shape == (3, 4, 77, 32) and uncond.shape == (3, 77, 32)
    picked = cond[torch.arange(3), torch.tensor([2, 0, 3])]
    assert torch.equal(picked[0], again[0].cond[2]) and torch.equal(picked[2], again[2].cond[3])


def test_damaged_cache_entry_is_reencoded(model, tmp_path, caplog):
    cfg = PromptConfig(text="a hamburger")
    first = encode_prompt(model, cfg, tmp_path)
    (entry,) = (tmp_path / "text_embeddings" / model.key).glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        again = encode_prompt(model, cfg, tmp_path)
    assert "unreadable text-embedding cache" in caplog.text
    torch.testing.assert_close(again.cond, first.cond)
