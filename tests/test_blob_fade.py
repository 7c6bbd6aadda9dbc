"""The fading density blob (field.blob_fade): a blob at share s equals the plain field's blob
scaled by s (its twin: `blob_density * s`), per prompt, in density and every normal mode; its
share is scene state (checkpoints carry it); the trainer fades each slot by its own progress."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.config import FieldConfig
from dreamfusion_trt.field.nerf import NeRFField
from dreamfusion_trt.train.slots import extract_slot, insert_slot
from test_coarse_to_fine import two_prompt_trainer

CFG = FieldConfig(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32, hidden_dim=16,
                  backend="torch", bound=1.0, blob_density=6.0, blob_radius=0.6, blob_fade=0.5)  # fmt: skip


def _field(scales: list[float]) -> NeRFField:
    torch.manual_seed(0)
    field = NeRFField(CFG, num_prompts=len(scales))
    with torch.no_grad():
        field.encoding.tables.uniform_(-0.5, 0.5)
    field.set_blob_scales(scales)
    return field


def _twin(field: NeRFField, k: int, share: float, normals: str) -> NeRFField:
    """Prompt k of `field` as a one-prompt field whose blob never fades and is `share` as dense."""
    twin = NeRFField(dataclasses.replace(CFG, blob_fade=0.0, blob_density=CFG.blob_density * share, normals=normals))
    state = extract_slot(field.state_dict(), k, field.num_prompts)
    state.pop("blob_scale")
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("normals", ["analytic", "autograd", "finite_difference"])
def test_a_faded_blob_equals_a_fainter_one_per_prompt(normals):
    field = _field([1.0, 0.25, 0.0])
    field.cfg = dataclasses.replace(CFG, normals=normals)
    x = torch.rand(3, 300, 3, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9
    out = field.query(x, with_normals=True)
    for k, share in enumerate((1.0, 0.25, 0.0)):
        ref = _twin(field, k, share, normals).query(x[k : k + 1], with_normals=True)
        torch.testing.assert_close(out.sigma[k : k + 1], ref.sigma, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.albedo[k : k + 1], ref.albedo, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.normal[k : k + 1], ref.normal, rtol=1e-4, atol=1e-5)
    # and the share matters: the centre is far denser with the whole blob
    centre = torch.zeros(3, 1, 3)
    sigma = field.density(centre)[:, 0]
    assert sigma[0] > 100 * sigma[2] and sigma[0] > sigma[1] > sigma[2]


def test_analytic_normals_follow_the_faded_density():
    field = _field([0.5, 0.0])
    x = torch.rand(2, 200, 3, generator=torch.Generator().manual_seed(2)) * 1.8 - 0.9
    analytic = field.density_gradient(x)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(field.density(xg).sum(), xg)
    torch.testing.assert_close(analytic, auto, rtol=1e-4, atol=1e-5)


def test_the_share_left_is_scene_state_that_checkpoints_carry():
    field = _field([0.3, 0.7])
    state = extract_slot(field.state_dict(), 1, 2)
    assert float(state["blob_scale"]) == pytest.approx(0.7)
    fresh = NeRFField(CFG, num_prompts=2)
    insert_slot(fresh.state_dict(), 0, state)
    assert fresh.blob_scale.tolist() == pytest.approx([0.7, 1.0])
    assert "blob_scale" not in NeRFField(dataclasses.replace(CFG, blob_fade=0.0)).state_dict()  # no fade: no new state
    # A prompt loaded into a slot overwrites its share; the next step's share still lands.
    fresh.set_blob_scales([0.5, 0.5])
    insert_slot(fresh.state_dict(), 0, extract_slot(NeRFField(CFG, num_prompts=1).state_dict(), 0, 1))
    assert fresh.blob_scale.tolist() == pytest.approx([1.0, 0.5])
    fresh.set_blob_scales([0.5, 0.5])
    assert fresh.blob_scale.tolist() == pytest.approx([0.5, 0.5])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="blob_fade"):
        NeRFField(dataclasses.replace(CFG, blob_fade=1.5))
    with pytest.raises(ValueError, match="2 prompts, got 1"):
        NeRFField(CFG, num_prompts=2).set_blob_scales([1.0])
    with pytest.raises(ValueError, match="blob_fade > 0"):
        NeRFField(dataclasses.replace(CFG, blob_fade=0.0)).set_blob_scales([1.0])


def test_the_trainer_fades_each_slot_by_its_own_progress(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder, blob_fade=0.5)
    field = trainer.renderer.field
    trainer.train_step()  # step 0: 1 - 1 / (0.5 * 4) and 1 - 1 / (0.5 * 8)
    torch.testing.assert_close(field.blob_scale, torch.tensor([0.5, 0.75]))
    trainer.train_step()  # step 1: slot 0's blob is gone (2 / 2), slot 1 at 2 / 4
    torch.testing.assert_close(field.blob_scale, torch.tensor([0.0, 0.5]))
    assert all(r.finite for r in trainer.poll())
    model = trainer.slot_checkpoint(0).model  # what its outputs and a resumed run are made from
    assert [float(v) for n, v in model.items() if n.endswith("blob_scale")] == [0.0]
