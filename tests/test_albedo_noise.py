"""The object-blind colour start (field.albedo_noise): off, the field and its state are exactly
as before; on, the albedo logits carry a fixed random smooth field of plane waves per prompt
(its twin: the same sum written out here), drawn from the prompt's seed after its parameters,
the same in every normal mode, and part of the scene's state (checkpoints and slots carry it).
With field.albedo_noise_fade the offset at share s is s times the unfaded one (its twin: the
same seed without the fade), per prompt; the share is scene state and the trainer fades each
slot by its own progress, replayed steps as the eager ones."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.checkpoint import load_checkpoint
from dreamfusion_trt.config import FieldConfig, RunConfig
from dreamfusion_trt.field.nerf import ALBEDO_NOISE_WAVES, NeRFField
from dreamfusion_trt.guidance.text import PromptEmbeddings
from dreamfusion_trt.train.slots import extract_slot, fresh_slot_state, insert_slot
from dreamfusion_trt.train.step_graph import BufferReplay, StepGraphs
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


# -- field.albedo_noise_fade: the offset at share s is s times the unfaded one ------------------

FADE = dataclasses.replace(CFG, albedo_noise_fade=0.5)


def _fading_pair(scales: list[float]) -> tuple[NeRFField, NeRFField, NeRFField]:
    """(no noise, unfaded noise, fading noise at `scales`), each drawn from seed 0."""
    fields = []
    for cfg in (dataclasses.replace(CFG, albedo_noise=0.0), CFG, FADE):
        torch.manual_seed(0)
        fields.append(NeRFField(cfg, len(scales)))
    fields[2].set_albedo_noise_scales(scales)
    return fields[0], fields[1], fields[2]


def _logits(albedo: torch.Tensor) -> torch.Tensor:
    return torch.logit(albedo.double().clamp(1e-12, 1 - 1e-12))


@pytest.mark.parametrize("normals", ["analytic", "autograd", "finite_difference"])
def test_a_faded_offset_is_the_unfaded_one_times_its_share_per_prompt(normals):
    scales = [1.0, 0.25, 0.0]
    off, on, fading = _fading_pair(scales)
    s_on, s_fading = on.state_dict(), fading.state_dict()
    assert set(s_fading) - set(s_on) == {"albedo_noise_scale"}  # the buffer draws nothing: same params, same waves
    assert all(torch.equal(s_on[k], s_fading[k]) for k in s_on)
    for f in (off, on, fading):
        f.cfg = dataclasses.replace(f.cfg, normals=normals)
    x = torch.rand(3, 300, 3, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.6
    plain, full = (_logits(f.query(x, with_normals=True).albedo) for f in (off, on))
    out = fading.query(x, with_normals=True)
    share = torch.tensor(scales, dtype=torch.float64)[:, None, None]
    assert torch.allclose(_logits(out.albedo), plain + share * (full - plain), atol=1e-4)
    assert torch.allclose(out.sigma, off.query(x, with_normals=True).sigma)  # the shape is untouched
    assert torch.allclose(out.normal, off.query(x, with_normals=True).normal)
    # a slice of the prompts takes its own prompts' shares
    _, albedo = fading(x[1:], prompts=slice(1, 3))
    assert torch.allclose(albedo, out.albedo[1:], atol=1e-6)


def test_the_share_left_is_scene_state_only_when_the_fade_is_on():
    _, on, fading = _fading_pair([0.3, 0.7])
    assert "albedo_noise_scale" not in on.state_dict()  # no fade: no new state
    assert "albedo_noise_scale" not in NeRFField(dataclasses.replace(FADE, albedo_noise=0.0)).state_dict()  # no noise to fade
    state = extract_slot(fading.state_dict(), 1, 2)
    assert float(state["albedo_noise_scale"]) == pytest.approx(0.7)
    fresh = NeRFField(FADE, num_prompts=2)
    insert_slot(fresh.state_dict(), 0, state)
    assert fresh.albedo_noise_scale.tolist() == pytest.approx([0.7, 1.0])
    fresh.set_albedo_noise_scales([-1.0, 2.0])  # clamped to [0, 1]
    assert fresh.albedo_noise_scale.tolist() == [0.0, 1.0]


def test_bad_fade_settings_are_refused():
    with pytest.raises(ValueError, match=r"field.albedo_noise_fade must be a share of the iterations in \[0, 1\], got 1.5"):
        NeRFField(dataclasses.replace(FADE, albedo_noise_fade=1.5))
    with pytest.raises(ValueError, match="albedo_noise_fade"):
        NeRFField(dataclasses.replace(FADE, albedo_noise_fade=-0.1))
    with pytest.raises(ValueError, match="2 prompts, got 1"):
        NeRFField(FADE, num_prompts=2).set_albedo_noise_scales([1.0])
    with pytest.raises(ValueError, match="albedo_noise_fade > 0"):
        NeRFField(CFG).set_albedo_noise_scales([1.0])
    with pytest.raises(ValueError, match="albedo_noise > 0"):
        NeRFField(dataclasses.replace(FADE, albedo_noise=0.0)).set_albedo_noise_scales([1.0])


def test_the_trainer_fades_each_slot_s_offset_by_its_own_progress_and_checkpoints_carry_it(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder, albedo_noise=2.0, albedo_noise_fade=0.5)
    field = trainer.renderer.field
    assert not hasattr(field, "blob_scale")  # the blob's fade stays off
    trainer.train_step()  # step 0: 1 - 1 / (0.5 * 4) and 1 - 1 / (0.5 * 8)
    torch.testing.assert_close(field.albedo_noise_scale, torch.tensor([0.5, 0.75]))
    trainer.train_step()  # step 1: slot 0's offset is gone (2 / 2), slot 1 at 2 / 4
    torch.testing.assert_close(field.albedo_noise_scale, torch.tensor([0.0, 0.5]))
    trainer.train_step()  # step 2: slot 0 stays at nothing, slot 1 at 3 / 4
    torch.testing.assert_close(field.albedo_noise_scale, torch.tensor([0.0, 0.25]))
    assert all(r.finite for r in trainer.poll())
    # Saved and loaded back through the real code: the slot resumes where its fade was.
    cfg = trainer.slots[0].cfg
    back = load_checkpoint(trainer.save_slot(0, tmp_path / "ckpt"))
    assert float(back.model["field.albedo_noise_scale"]) == 0.0
    field.set_albedo_noise_scales([1.0, 1.0])
    trainer.release(0)
    v = len(trainer.views)
    emb = PromptEmbeddings(cond=trainer.cond_table[:v].cpu(), uncond=trainer.uncond[0].cpu(), views=trainer.views,
                           prompt=cfg.prompt.text, truncated=False)  # fmt: skip
    trainer.assign(0, cfg, emb, checkpoint=back)
    assert field.albedo_noise_scale.tolist() == [0.0, 1.0]


def test_replayed_steps_fade_the_offset_as_the_eager_steps_do(tmp_path, tiny_sd_paths):  # noqa: F811
    """The share is a buffer written outside the step (as blob_scale): a replayed step reads
    this step's share, so the replayed trainer matches its eager twin exactly."""
    fade = {"albedo_noise": 2.0, "albedo_noise_fade": 0.5}
    eager = two_prompt_trainer(tmp_path / "eager", tiny_sd_paths.folder, step_graph=True, **fade)
    eager.step_graphs = None
    graphed = two_prompt_trainer(tmp_path / "graphed", tiny_sd_paths.folder, step_graph=True, **fade)
    graphed.step_graphs = StepGraphs(BufferReplay(), warmup=1)
    eager.phase_override = graphed.phase_override = "latent"  # one key: replays from the second step on
    for _ in range(3):
        eager.train_step()
        graphed.train_step()
        torch.testing.assert_close(graphed.metrics, eager.metrics, rtol=0, atol=0)
    assert graphed.step_graphs.replays >= 1
    torch.testing.assert_close(graphed.renderer.field.albedo_noise_scale, eager.renderer.field.albedo_noise_scale)
    for (name, p), q in zip(eager.renderer.named_parameters(), graphed.renderer.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
