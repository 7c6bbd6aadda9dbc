"""The coarse-to-fine hash grid (field.coarse_to_fine): the level weights by progress, the
weighted field against its twin (features are linear in the tables, so a level at weight w is
that level's tables times w), and the trainer's ramp per slot."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.config import FieldConfig, from_dict
from dreamfusion_trt.field.nerf import NeRFField, coarse_to_fine_weights
from dreamfusion_trt.train import frozen as frozen_mod

CFG = FieldConfig(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32, hidden_dim=16,
                  backend="torch", bound=1.0, blob_density=0.0, coarse_to_fine=0.5, coarse_levels=1)  # fmt: skip


def test_levels_switch_on_from_coarse_to_fine():
    assert coarse_to_fine_weights(4, 1, 0.0) == (1.0, 0.0, 0.0, 0.0)
    assert coarse_to_fine_weights(4, 1, 0.5) == pytest.approx((1.0, 1.0, 0.5, 0.0))
    assert coarse_to_fine_weights(4, 2, 0.25) == pytest.approx((1.0, 1.0, 0.5, 0.0))
    assert coarse_to_fine_weights(4, 1, 1.0) == coarse_to_fine_weights(4, 1, 7.0) == (1.0,) * 4
    assert coarse_to_fine_weights(4, 4, 0.0) == (1.0,) * 4  # every level coarse: no ramp


def _pair() -> tuple[NeRFField, NeRFField]:
    """A field with level weights (1, 1, 0.5, 0) for prompt 0 and all ones for prompt 1, and its
    unweighted twin whose level-2 tables are halved and level-3 tables zeroed for prompt 0."""
    torch.manual_seed(0)
    field = NeRFField(CFG, num_prompts=2)
    with torch.no_grad():
        field.encoding.tables.uniform_(-0.5, 0.5)
    twin = NeRFField(dataclasses.replace(CFG, coarse_to_fine=0.0), num_prompts=2)
    twin.load_state_dict(field.state_dict())
    with torch.no_grad():
        twin.encoding.tables[0, 2] *= 0.5
        twin.encoding.tables[0, 3] = 0.0
    field.set_level_weights([(1.0, 1.0, 0.5, 0.0), None])
    return field, twin


@pytest.mark.parametrize("normals", ["analytic", "autograd", "finite_difference"])
def test_weighted_levels_equal_scaled_tables_in_density_albedo_and_normals(normals):
    field, twin = _pair()
    field.cfg = twin.cfg = dataclasses.replace(CFG, normals=normals)
    twin.cfg = dataclasses.replace(twin.cfg, coarse_to_fine=0.0)
    x = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9
    a, b = field.query(x, with_normals=True), twin.query(x, with_normals=True)
    torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.albedo, b.albedo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.normal, b.normal, rtol=1e-4, atol=1e-5)
    # and the weights matter: prompt 0 differs from the unweighted field, prompt 1 does not
    plain = NeRFField(dataclasses.replace(CFG, coarse_to_fine=0.0), num_prompts=2)
    plain.load_state_dict(field.state_dict())
    c = plain.query(x, with_normals=False)
    assert (c.sigma[0] - a.sigma[0]).abs().max() > 1e-3
    torch.testing.assert_close(c.sigma[1], a.sigma[1])


def test_analytic_normals_follow_the_weighted_density():
    field, _ = _pair()
    x = torch.rand(2, 200, 3, generator=torch.Generator().manual_seed(2)) * 1.8 - 0.9
    analytic = field.density_gradient(x)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(field.density(xg).sum(), xg)
    torch.testing.assert_close(analytic, auto, rtol=1e-4, atol=1e-5)


def test_a_switched_off_level_gets_no_gradient():
    field, _ = _pair()
    x = torch.rand(2, 200, 3, generator=torch.Generator().manual_seed(3)) * 1.8 - 0.9
    out = field.query(x, with_normals=True)
    (out.sigma.sum() + out.normal.sum()).backward()
    g = field.encoding.tables.grad
    assert g[0, 3].abs().max() == 0.0  # weight 0
    assert g[0, 2].abs().max() > 0.0 and g[1, 3].abs().max() > 0.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="coarse_to_fine"):
        NeRFField(dataclasses.replace(CFG, coarse_to_fine=1.5))
    with pytest.raises(ValueError, match="coarse_levels"):
        NeRFField(dataclasses.replace(CFG, coarse_levels=5))
    with pytest.raises(ValueError, match="3 prompts, got 1"):
        NeRFField(CFG, num_prompts=3).set_level_weights([None])


def two_prompt_trainer(tmp_path, model_folder, step_graph=False, sections=None, **field):
    """A CPU trainer on the tiny SD with two prompts assigned: "a cat" for 4 iterations in slot 0
    and "a dog" for 8 in slot 1 (half of each in the latent phase); `field` overrides the tiny
    field's settings and `sections` ({section: {key: value}}) any other's; `step_graph` is the
    trainer's (its CUDA capture fails on a CPU)."""
    device = torch.device("cpu")
    data = {"model": {"model": str(model_folder), "cache_dir": str(tmp_path / "cache")},
            "field": {"num_levels": 4, "log2_hashmap_size": 12, "max_resolution": 64, "hidden_dim": 16, **field},
            "render": {"num_samples": 12, "albedo_iters": 1, "backend": "torch"}, "camera": {"render_size": 16},
            "train": {"latent_fraction": 0.5, "device": "cpu"}}  # fmt: skip
    for section, values in (sections or {}).items():
        data[section] = {**data.get(section, {}), **values}
    cfg = from_dict(data)
    cfgs = [from_dict({"prompt": {"text": t}, "train": {"iters": n, "seed": i}}, from_dict(data)) for i, (t, n) in enumerate([("a cat", 4), ("a dog", 8)])]
    frozen, embeddings = frozen_mod.load_frozen(cfg, device, [c.prompt for c in cfgs], max_prompts=2)
    trainer = frozen_mod.new_trainer(frozen, cfg, 2, device, step_graph=step_graph)
    for k, (c, e) in enumerate(zip(cfgs, embeddings)):
        trainer.assign(k, c, e)
    return trainer


def test_the_trainer_ramps_each_slot_by_its_own_progress(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder, coarse_to_fine=0.5, coarse_levels=1)
    field = trainer.renderer.field
    trainer.train_step()  # step 0: progress 1 / (0.5 * 4) = 0.5 and 1 / (0.5 * 8) = 0.25
    expected = torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.0, 0.75, 0.0, 0.0]]).repeat_interleave(field.encoding.level_dim, dim=1)
    torch.testing.assert_close(field.feature_weights, expected)
    trainer.train_step()  # step 1: slot 0's ramp is over (2 / 2), slot 1 at 2 / 4
    torch.testing.assert_close(field.feature_weights[0], torch.ones(field.encoding.output_dim))
    torch.testing.assert_close(field.feature_weights[1, ::2], torch.tensor([1.0, 1.0, 0.5, 0.0]))
    assert all(r.finite for r in trainer.poll())
