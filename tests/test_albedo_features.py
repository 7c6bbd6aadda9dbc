"""The albedo's own features (field.albedo_features own): the density is the twin of a shared
field whose MLP has the same density weights; colour and density share no parameter, so a loss
on one never moves the other's; every normal mode still gives the same normals and the same
albedo as a plain query; the trainer steps, slots and checkpoints the extra grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.config import FieldConfig, from_dict
from dreamfusion_trt.field.nerf import NeRFField
from dreamfusion_trt.train.slots import extract_slot, insert_slot
from test_coarse_to_fine import two_prompt_trainer

CFG = FieldConfig(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32, hidden_dim=16,
                  backend="torch", bound=1.0, blob_density=6.0, blob_radius=0.6, albedo_features="own")  # fmt: skip


def _field(cfg: FieldConfig = CFG, k: int = 2) -> NeRFField:
    torch.manual_seed(0)
    field = NeRFField(cfg, num_prompts=k)
    with torch.no_grad():
        field.encoding.tables.uniform_(-0.5, 0.5)
        if field.albedo_encoding is not None:
            field.albedo_encoding.tables.uniform_(-0.5, 0.5)
    return field


def _points(k: int = 2, n: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.rand(k, n, 3, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


def test_its_density_is_the_shared_fields_with_the_same_density_weights():
    own = _field()
    shared = NeRFField(dataclasses.replace(CFG, albedo_features="shared"), num_prompts=2)
    with torch.no_grad():
        shared.encoding.tables.copy_(own.encoding.tables)
        for a, b in zip(shared.mlp.layers, own.mlp.layers):
            if a.weight.shape == b.weight.shape:
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            else:  # the last layer: column 0 is the raw density
                a.weight[..., :1].copy_(b.weight)
                a.bias[..., :1].copy_(b.bias)
    x = _points()
    torch.testing.assert_close(own.density(x), shared.density(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own.density_gradient(x), shared.density_gradient(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(own(x)[1], shared(x)[1])  # the albedo comes from elsewhere
    assert "albedo_encoding.tables" in own.state_dict() and "albedo_encoding.tables" not in shared.state_dict()


def test_colour_and_density_share_no_parameter():
    field = _field()
    x = _points()
    sigma, albedo = field(x)
    density_params = list(field.encoding.parameters()) + list(field.mlp.parameters())
    albedo_params = list(field.albedo_encoding.parameters()) + list(field.albedo_mlp.parameters())
    grads = torch.autograd.grad(albedo.sum(), density_params + albedo_params, allow_unused=True)
    assert all(g is None or not g.any() for g in grads[: len(density_params)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(density_params) :])
    grads = torch.autograd.grad(sigma.sum(), density_params + albedo_params, allow_unused=True)
    assert all(g is None for g in grads[len(density_params) :])
    # in the shared field the same albedo loss does reach the density's grid
    shared = _field(dataclasses.replace(CFG, albedo_features="shared"))
    (g,) = torch.autograd.grad(shared(x)[1].sum(), [shared.encoding.tables])
    assert g.abs().sum() > 0


@pytest.mark.parametrize("normals", ["analytic", "autograd", "finite_difference"])
def test_every_normal_mode_gives_the_plain_querys_albedo_and_the_same_normals(normals):
    field = _field(dataclasses.replace(CFG, normals=normals, fd_eps=1e-3))
    x = _points()
    out = field.query(x, with_normals=True)
    sigma, albedo = field(x)
    torch.testing.assert_close(out.sigma, sigma, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.albedo, albedo, rtol=1e-6, atol=1e-6)
    exact = _field(dataclasses.replace(CFG, normals="autograd")).normals(x)
    if normals == "finite_difference":  # central differences of a piecewise-trilinear field: close, not equal
        assert float(torch.nn.functional.cosine_similarity(out.normal.detach(), exact, dim=-1).median()) > 0.99
    else:
        torch.testing.assert_close(out.normal, exact, rtol=1e-4, atol=1e-5)


def test_a_bad_choice_is_refused():
    with pytest.raises(ValueError, match="albedo_features"):
        NeRFField(dataclasses.replace(CFG, albedo_features="separate"))
    with pytest.raises(ValueError):
        from_dict({"field": {"albedo_features": "separate"}})


def test_the_trainer_steps_slots_and_checkpoints_the_albedos_grid(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder, albedo_features="own")
    field = trainer.renderer.field
    before = field.albedo_encoding.tables.detach().clone()
    names = {id(p): n for n, p in trainer.renderer.named_parameters()}
    grid_group = trainer.optimizer.groups[1]  # the hash grids' larger learning rate
    assert any(names[id(p)].endswith("albedo_encoding.tables") for p in grid_group.params)
    for _ in range(2):
        trainer.train_step()
    assert all(r.finite for r in trainer.poll())
    assert not torch.equal(field.albedo_encoding.tables, before)  # SDS reached the albedo's own grid
    model = trainer.slot_checkpoint(1).model
    assert model["field.albedo_encoding.tables"].shape[0] == 1
    fresh = NeRFField(field.cfg, num_prompts=2)
    state = fresh.state_dict()
    insert_slot(state, 0, {k.removeprefix("field."): v for k, v in model.items() if k.startswith("field.")})
    torch.testing.assert_close(fresh.albedo_encoding.tables[0], field.albedo_encoding.tables[1])
    assert extract_slot(fresh.state_dict(), 0, 2).keys() == NeRFField(field.cfg).state_dict().keys()
