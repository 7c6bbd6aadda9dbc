"""The object-blind colour start (field.albedo_noise): off, the field and its state are exactly
as before; on, the albedo logits carry a fixed random smooth field of plane waves per prompt
(its twin: the same sum written out here), drawn from the prompt's seed after its parameters,
the same in every normal mode, and part of the scene's state (checkpoints and slots carry it)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.config import FieldConfig, RunConfig
from dreamfusion_trt.field.nerf import ALBEDO_NOISE_WAVES, NeRFField
from dreamfusion_trt.train.slots import extract_slot, fresh_slot_state, insert_slot
from test_coarse_to_fine import two_prompt_trainer

CFG = FieldConfig(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32, hidden_dim=16,
                  backend="torch", bound=0.6, albedo_noise=2.0)  # fmt: skip


def _pair(num_prompts: int = 2) -> tuple[NeRFField, NeRFField]:
    torch.manual_seed(0)
    off = NeRFField(dataclasses.replace(CFG, albedo_noise=0.0), num_prompts)
    torch.manual_seed(0)
    on = NeRFField(CFG, num_prompts)
    return off, on


def test_off_leaves_the_field_and_its_state_as_before_and_on_adds_only_the_waves():
    off, on = _pair()
    s_off, s_on = off.state_dict(), on.state_dict()
    assert set(s_on) - set(s_off) == {"albedo_waves", "albedo_phase"} and set(s_off) <= set(s_on)
    assert all(torch.equal(s_off[k], s_on[k]) for k in s_off)  # the parameters are drawn first, unchanged
    x = torch.rand(2, 500, 3) * 1.2 - 0.6
    assert torch.equal(off.density(x), on.density(x))


@pytest.mark.parametrize("normals", ["analytic", "autograd", "finite_difference"])
def test_the_albedo_is_the_plain_field_s_with_the_written_out_wave_sum_in_its_logits(normals):
    off, on = _pair()
    off.cfg = dataclasses.replace(off.cfg, normals=normals)
    on.cfg = dataclasses.replace(on.cfg, normals=normals)
    x = torch.rand(2, 300, 3) * 1.2 - 0.6
    waves, phase = on.albedo_waves, on.albedo_phase  # [K, 3, W, 3], [K, 3, W]
    twin = torch.zeros(2, 300, 3)
    for k in range(2):
        for c in range(3):
            for w in range(ALBEDO_NOISE_WAVES):
                twin[k, :, c] += torch.sin(x[k] @ waves[k, c, w] + phase[k, c, w])
    twin *= CFG.albedo_noise * math.sqrt(2.0 / ALBEDO_NOISE_WAVES)
    plain = torch.logit(off.query(x, with_normals=True).albedo.double().clamp(1e-12, 1 - 1e-12))
    out = on.query(x, with_normals=True)
    assert torch.allclose(torch.logit(out.albedo.double().clamp(1e-12, 1 - 1e-12)), plain + twin.double(), atol=1e-4)
    assert torch.allclose(out.normal, off.query(x, with_normals=True).normal)  # the shape is untouched
    assert out.albedo.std(dim=1).min() > 0.15  # colours differ across the box from the first step
    assert not torch.allclose(out.albedo[0], out.albedo[1])  # each prompt has its own field


def test_the_waves_follow_the_prompt_s_seed_and_travel_with_its_slot():
    cfg = RunConfig()
    cfg.field = CFG
    a, b, again = (fresh_slot_state(cfg, s) for s in (0, 1, 0))
    assert torch.equal(a["field.albedo_waves"], again["field.albedo_waves"])
    assert not torch.equal(a["field.albedo_waves"], b["field.albedo_waves"])
    _, scene = _pair()
    target = {f"field.{k}": v for k, v in scene.state_dict().items()}
    one = {k: v for k, v in a.items() if k.startswith("field.")}
    insert_slot(target, 1, one)
    assert torch.equal(scene.albedo_waves[1], a["field.albedo_waves"][0])
    assert torch.equal(extract_slot(target, 1, 2)["field.albedo_phase"], a["field.albedo_phase"])


def test_a_negative_amplitude_is_one_clear_error():
    with pytest.raises(ValueError, match="albedo_noise"):
        NeRFField(dataclasses.replace(CFG, albedo_noise=-1.0))


def test_each_slot_trains_against_its_own_seed_s_waves_and_they_stay_fixed(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder, albedo_noise=2.0)
    field = trainer.renderer.field
    before = field.albedo_waves.clone()
    for k in range(2):  # slot k holds seed k's draw, as a run of that prompt alone would
        assert torch.equal(before[k], fresh_slot_state(trainer.slots[k].cfg, k)["field.albedo_waves"][0])
    trainer.train_step()
    trainer.train_step()
    assert torch.equal(field.albedo_waves, before)  # a buffer, not a parameter: training leaves it
    assert all(r.finite for r in trainer.poll())
