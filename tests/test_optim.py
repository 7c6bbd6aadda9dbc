"""SlotAdam and SlotGradScaler: every slot behaves like `torch.optim.Adam` on that prompt alone."""

import pytest
import torch

from dreamfusion_trt.train.optim import SlotAdam, SlotGradScaler, SlotParamGroup

K = 3
BETAS, EPS = (0.9, 0.99), 1e-15


def _stacked(seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.nn.Parameter(torch.randn(K, 5, 2, generator=gen))  # a hash table [K, T, F]
    weight = torch.nn.Parameter(torch.randn(K, 4, 3, generator=gen))  # an MLP layer [K, in, out]
    owned = torch.nn.Parameter(torch.randn(K, 6, generator=gen))  # a third stacked parameter [K, F]
    return table, weight, owned


def _slot_adam(table, weight, owned):
    groups = [
        SlotParamGroup([weight], lr=1e-2),
        SlotParamGroup([table, owned], lr=1e-1),
    ]
    return SlotAdam(groups, K, betas=BETAS, eps=EPS)


def _alone(table, weight, owned, k):
    """Slot k's parameters as a one-prompt model with its own torch Adam."""
    t = torch.nn.Parameter(table.detach()[k].clone())
    w = torch.nn.Parameter(weight.detach()[k].clone())
    o = torch.nn.Parameter(owned.detach()[k].clone())
    opt = torch.optim.Adam([{"params": [w], "lr": 1e-2}, {"params": [t, o], "lr": 1e-1}], betas=BETAS, eps=EPS)
    return (t, w, o), opt


def _grads(step, k):
    gen = torch.Generator().manual_seed(1000 * step + k)
    return torch.randn(5, 2, generator=gen), torch.randn(4, 3, generator=gen), torch.randn(6, generator=gen)


def _set_grads(table, weight, owned, step, nan_slot=None):
    table.grad = torch.stack([_grads(step, k)[0] for k in range(K)])
    weight.grad = torch.stack([_grads(step, k)[1] for k in range(K)])
    owned.grad = torch.stack([_grads(step, k)[2] for k in range(K)])
    if nan_slot is not None:
        table.grad[nan_slot, 0, 0] = float("nan")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_each_slot_matches_torch_adam_alone():
    table, weight, owned = _stacked()
    opt = _slot_adam(table, weight, owned)
    alone = [_alone(table, weight, owned, k) for k in range(K)]
    for step in range(6):
        _set_grads(table, weight, owned, step)
        opt.step(torch.ones(K, dtype=torch.bool))
        for k, ((t, w, o), adam) in enumerate(alone):
            t.grad, w.grad, o.grad = (g.clone() for g in _grads(step, k))
            adam.step()
    for k, ((t, w, o), _) in enumerate(alone):
        _close(table.detach()[k], t.detach())
        _close(weight.detach()[k], w.detach())
        _close(owned[k].detach(), o.detach())
    assert opt.step_count.tolist() == [6.0] * K


def test_inactive_and_non_finite_slots_are_untouched_and_do_not_disturb_the_others():
    table, weight, owned = _stacked()
    opt = _slot_adam(table, weight, owned)
    alone0 = _alone(table, weight, owned, 0)
    before = [x.detach().clone() for x in (table, weight, owned[1], owned[2])]
    active = torch.tensor([True, False, True])
    for step in range(4):
        _set_grads(table, weight, owned, step, nan_slot=2)
        updated, norm = opt.step(active)
        assert updated.tolist() == [True, False, False]
        assert torch.isfinite(norm[:2]).all() and not torch.isfinite(norm[2])
        (t, w, o), adam = alone0
        t.grad, w.grad, o.grad = (g.clone() for g in _grads(step, 0))
        adam.step()
    for k in (1, 2):  # inactive, and non-finite: parameters, moments and step count unchanged
        torch.testing.assert_close(table.detach()[k], before[0][k], rtol=0, atol=0)
        torch.testing.assert_close(weight.detach()[k], before[1][k], rtol=0, atol=0)
        torch.testing.assert_close(owned[k].detach(), before[1 + k], rtol=0, atol=0)
        assert all(float(m[k].abs().sum()) == 0 for m in opt.exp_avg[:2])
    assert opt.step_count.tolist() == [4.0, 0.0, 0.0]
    (t, w, o), _ = alone0
    _close(table.detach()[0], t.detach())
    _close(owned[0].detach(), o.detach())


def test_per_slot_gradient_clipping_matches_clip_grad_norm_alone():
    table, weight, owned = _stacked()
    opt = _slot_adam(table, weight, owned)
    alone = [_alone(table, weight, owned, k) for k in range(K)]
    for step in range(3):
        _set_grads(table, weight, owned, step)
        table.grad[1] *= 100.0  # only slot 1 is far above the limit
        _, norm = opt.step(torch.ones(K, dtype=torch.bool), max_grad_norm=2.0)
        for k, (params, adam) in enumerate(alone):
            grads = _grads(step, k)
            params[0].grad = grads[0] * (100.0 if k == 1 else 1.0)
            params[1].grad, params[2].grad = grads[1].clone(), grads[2].clone()
            total = torch.nn.utils.clip_grad_norm_(params, 2.0)
            torch.testing.assert_close(norm[k], total, rtol=1e-5, atol=0)
            adam.step()
    for k, ((t, w, o), _) in enumerate(alone):
        _close(table.detach()[k], t.detach())
        _close(weight.detach()[k], w.detach())


def test_loss_scale_is_undone_per_slot():
    table, weight, owned = _stacked()
    opt = _slot_adam(table, weight, owned)
    ref_t, ref_w, ref_o = _stacked()
    ref = _slot_adam(ref_t, ref_w, ref_o)
    scale = torch.tensor([1.0, 1024.0, 65536.0])
    _set_grads(table, weight, owned, 0)
    table.grad *= scale.view(K, 1, 1)
    weight.grad *= scale.view(K, 1, 1)
    owned.grad *= scale.view(K, 1)
    opt.step(torch.ones(K, dtype=torch.bool), inv_scale=scale.reciprocal())
    _set_grads(ref_t, ref_w, ref_o, 0)
    ref.step(torch.ones(K, dtype=torch.bool))
    _close(table.detach(), ref_t.detach())
    _close(weight.detach(), ref_w.detach())


def test_reset_slot_restarts_bias_correction_like_a_fresh_adam():
    table, weight, owned = _stacked()
    opt = _slot_adam(table, weight, owned)
    for step in range(3):
        _set_grads(table, weight, owned, step)
        opt.step(torch.ones(K, dtype=torch.bool))
    opt.reset_slot(1)
    assert opt.step_count.tolist() == [3.0, 0.0, 3.0]
    assert float(opt.exp_avg[1][1].abs().sum()) == 0 and float(opt.exp_avg[1][0].abs().sum()) > 0
    fresh = _alone(table, weight, owned, 1)  # a new prompt starting from slot 1's current values
    _set_grads(table, weight, owned, 7)
    opt.step(torch.ones(K, dtype=torch.bool))
    (t, w, o), adam = fresh
    t.grad, w.grad, o.grad = (g.clone() for g in _grads(7, 1))
    adam.step()
    _close(table.detach()[1], t.detach())
    _close(owned[1].detach(), o.detach())


def test_slot_state_round_trips_through_torch_adam_format():
    table, weight, owned = _stacked()
    opt = _slot_adam(table, weight, owned)
    for step in range(3):
        _set_grads(table, weight, owned, step)
        opt.step(torch.ones(K, dtype=torch.bool))
    state = opt.slot_state_dict(2)
    assert [g["params"] for g in state["param_groups"]] == [[0], [1, 2]]
    assert state["state"][1]["exp_avg"].shape == (1, 5, 2) and state["state"][2]["exp_avg"].shape == (1, 6)
    # torch Adam continues from the exported state exactly as the slot does
    (t, w, o), adam = _alone(table, weight, owned, 2)
    adam.load_state_dict(
        {"state": {i: {"step": s["step"], "exp_avg": s["exp_avg"].reshape(p.shape).clone(),
                       "exp_avg_sq": s["exp_avg_sq"].reshape(p.shape).clone()} for (i, s), p in zip(state["state"].items(), (w, t, o))},
         "param_groups": [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]}
    )  # fmt: skip
    _set_grads(table, weight, owned, 5)
    opt.step(torch.ones(K, dtype=torch.bool))
    t.grad, w.grad, o.grad = (g.clone() for g in _grads(5, 2))
    adam.step()
    _close(table.detach()[2], t.detach())
    # and the state loads into another slot
    exported = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in opt.slot_state_dict(2)["state"].items()},
                "param_groups": state["param_groups"]}  # fmt: skip
    opt.load_slot_state_dict(0, exported)
    torch.testing.assert_close(opt.exp_avg[1][0], opt.exp_avg[1][2], rtol=0, atol=0)
    torch.testing.assert_close(opt.exp_avg_sq[2][0], opt.exp_avg_sq[2][2], rtol=0, atol=0)
    assert opt.step_count.tolist() == [4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="holds 2 parameters, a slot of this scene has 3"):
        opt.load_slot_state_dict(1, {"state": {}, "param_groups": [{"params": [0, 1]}]})


def test_grad_scaler_backs_off_only_the_overflowing_slot():
    scaler = SlotGradScaler(K, torch.device("cpu"), enabled=True, init_scale=8.0, growth_interval=2)
    active = torch.tensor([True, True, False])
    scaler.update(active, updated=torch.tensor([True, False, False]))
    assert scaler.scale().tolist() == [8.0, 4.0, 8.0]
    scaler.update(active, updated=torch.tensor([True, True, False]))
    assert scaler.scale().tolist() == [16.0, 4.0, 8.0]  # slot 0 grew after 2 clean steps
    assert scaler.slot_state_dict(1)["scale"] == 4.0 and scaler.slot_state_dict(0)["_growth_tracker"] == 0
    scaler.load_slot_state_dict(2, {"scale": 2.0, "_growth_tracker": 1})
    assert scaler.scale().tolist() == [16.0, 4.0, 2.0]
    assert SlotGradScaler(K, torch.device("cpu"), enabled=False).scale() is None


def test_rejects_parameters_without_the_slot_dimension():
    with pytest.raises(ValueError, match="leading dimension of 3"):
        SlotAdam([SlotParamGroup([torch.nn.Parameter(torch.zeros(2, 4))], lr=1e-3)], K)


def test_compiled_update_matches_the_eager_twin():
    """`SlotAdam(compiled=True)` (the update through torch.compile, the CUDA default) against the
    eager function it compiles: same flags bit for bit, same parameters and moments to float
    rounding, with loss scaling, clipping, an inactive slot and a non-finite slot."""
    runs = []
    for compiled in (False, True):
        table, weight, owned = _stacked()
        groups = [SlotParamGroup([weight], lr=1e-2), SlotParamGroup([table, owned], lr=1e-1)]
        opt = SlotAdam(groups, K, betas=BETAS, eps=EPS, compiled=compiled)
        flags = []
        for step in range(5):
            _set_grads(table, weight, owned, step, nan_slot=2 if step == 3 else None)
            owned.grad = None if step == 1 else owned.grad  # a parameter without a gradient this step
            active = torch.tensor([True, step != 2, True])
            inv_scale = torch.full((K,), 0.5) if step % 2 else None
            for p in (table, weight, owned):
                if p.grad is not None and inv_scale is not None:
                    p.grad.mul_(2.0)
            updated, norm = opt.step(active, inv_scale, max_grad_norm=3.0 if step >= 2 else 0.0)
            flags.append((updated.clone(), norm.clone()))
        runs.append(((table, weight, owned), opt, flags))
    (eager_params, eager_opt, eager_flags), (comp_params, comp_opt, comp_flags) = runs
    assert comp_opt._compiled is not None and eager_opt._compiled is None
    for (u0, n0), (u1, n1) in zip(eager_flags, comp_flags):
        assert torch.equal(u0, u1)
        torch.testing.assert_close(n1, n0, equal_nan=True)
    assert not bool(eager_flags[3][0][2]) and not bool(eager_flags[2][0][1])  # the non-finite and inactive slots skipped
    for a, b in zip(eager_params, comp_params):
        torch.testing.assert_close(b, a)
    for a, b in zip([eager_opt.step_count, *eager_opt.exp_avg, *eager_opt.exp_avg_sq],
                    [comp_opt.step_count, *comp_opt.exp_avg, *comp_opt.exp_avg_sq]):  # fmt: skip
        torch.testing.assert_close(b, a)
