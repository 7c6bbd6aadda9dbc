"""`bench.random_model`: the random-weights folder that end-to-end timings of `generate` load
through the real loading code."""

import pytest
import torch

from dreamfusion_trt.bench.random_model import main, write_random_sd
from dreamfusion_trt.config import PromptConfig
from dreamfusion_trt.guidance.text import encode_prompts
from dreamfusion_trt.sdmodel import load_diffusion


def test_the_folder_loads_and_encodes_prompts(tmp_path):
    folder = write_random_sd(tmp_path / "m", "tiny", torch.float32)
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert not list(tmp_path.glob(".m.partial-*"))
    model = load_diffusion(str(folder), device="cpu", dtype=torch.float32)
    assert model.max_length == 77 and model.text_dim == 32 and model.latent_channels == 4
    (emb,) = encode_prompts(model, [PromptConfig(text="a hamburger")], tmp_path / "cache")
    assert emb.cond.shape[-2:] == (77, 32) and torch.isfinite(emb.cond).all()
    # the prompt's end token is the tokenizer's, so the pooled position is inside the prompt
    ids = model.tokenizer("a hamburger", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert int(model.text_encoder.config.eos_token_id) in ids[0].tolist()


def test_an_existing_folder_is_refused(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["--arch", "tiny", "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err
