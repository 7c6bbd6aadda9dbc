"""Low-discrepancy views and timesteps (camera.sequence, sds.t_sequence stratified): Roberts'
sequence itself, its even cover against independent draws, the shares placed in the cameras'
and timesteps' ranges without touching the generators' other draws, and the trainer's plan
following each slot's own sequence through checkpoints and retries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.cameras import sample_random_cameras
from dreamfusion_trt.config import CameraConfig, SDSConfig, from_dict
from dreamfusion_trt.guidance.sds import SDSGuidance
from dreamfusion_trt.sequence import DIMS, roberts_alpha, sequence_offset, sequence_point
from test_coarse_to_fine import two_prompt_trainer


def test_roberts_increments_solve_their_equation():
    assert roberts_alpha(1)[0] == pytest.approx(((5**0.5) - 1) / 2, abs=1e-15)  # the golden ratio's
    for d in (1, 2, 3, 5):
        alpha = roberts_alpha(d)
        g = 1.0 / alpha[0]
        assert g ** (d + 1) == pytest.approx(g + 1.0, abs=1e-12)
        assert alpha == pytest.approx(tuple(g**-i for i in range(1, d + 1)))
    with pytest.raises(ValueError, match="at least one dimension"):
        roberts_alpha(0)


def test_points_step_by_alpha_from_the_seeds_offset():
    off = sequence_offset(7)
    assert off == sequence_offset(7) and off != sequence_offset(8)  # deterministic, and nearby seeds differ
    assert all(0.0 <= v < 1.0 for v in off) and len(off) == DIMS
    assert sequence_point(0, off) == pytest.approx(off)
    p = sequence_point(10**9, off)  # a long run keeps its precision
    expected = [math.fmod(o + math.fmod(10**9 * a, 1.0), 1.0) for o, a in zip(off, roberts_alpha(DIMS))]
    assert p == pytest.approx(expected, abs=1e-9) and all(0.0 <= v < 1.0 for v in p)
    with pytest.raises(ValueError, match=">= 0"):
        sequence_point(-1, off)
    with pytest.raises(ValueError, match="3-dimensional offset"):
        sequence_point(0, (0.1, 0.2))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_every_stretch_of_steps_covers_views_and_timesteps_evenly(seed):
    """200 steps: every one of 25 view cells (azimuth x elevation share) gets 4-12 points (8
    expected; independent draws of the same seed leave some cells at 2 or fewer), and every
    stretch of 40 steps puts 6-10 timesteps in each fifth of the range (8 expected)."""
    off = sequence_offset(seed)
    pts = np.array([sequence_point(i, off) for i in range(200)])
    cells, _, _ = np.histogram2d(pts[:, 0], pts[:, 1], bins=5, range=[[0, 1], [0, 1]])
    assert 4 <= cells.min() and cells.max() <= 12
    iid = torch.rand(200, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    iid_cells, _, _ = np.histogram2d(iid[:, 0], iid[:, 1], bins=5, range=[[0, 1], [0, 1]])
    assert iid_cells.max() - iid_cells.min() > cells.max() - cells.min()
    for start in range(0, 200, 40):
        counts, _ = np.histogram(pts[start : start + 40, 2], bins=5, range=(0, 1))
        assert 6 <= counts.min() and counts.max() <= 10


@pytest.mark.parametrize("sampling", ["sphere", "angle"])
def test_camera_shares_place_azimuth_and_elevation_and_leave_the_other_draws(sampling):
    cfg = CameraConfig(elevation_range=(-10.0, 90.0), azimuth_range=(-180.0, 180.0), elevation_sampling=sampling)
    shares = torch.tensor([[0.0, 0.0], [0.5, 1.0 - 1e-12], [0.75, 0.5]], dtype=torch.float64)
    placed = sample_random_cameras(3, cfg, torch.Generator().manual_seed(4), shares)
    drawn = sample_random_cameras(3, cfg, torch.Generator().manual_seed(4))
    torch.testing.assert_close(placed.azimuth_deg, torch.tensor([-180.0, 0.0, 90.0]))
    lo, hi = -10.0, 90.0
    middle = (lo + hi) / 2 if sampling == "angle" else math.degrees(math.asin((math.sin(math.radians(lo)) + 1.0) / 2))
    torch.testing.assert_close(placed.elevation_deg, torch.tensor([lo, hi, middle]), atol=1e-4, rtol=0)
    for name in ("radius", "fovy_deg"):
        assert torch.equal(getattr(placed, name), getattr(drawn, name))
    assert not torch.equal(placed.azimuth_deg, drawn.azimuth_deg)
    # the camera looks at the origin from where its shares put it
    pos = placed.position.double()
    assert float(pos[1, 1].abs()) < 1e-5 and float(pos[1, 0]) > 0  # azimuth 0 is on +x
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        sample_random_cameras(3, cfg, torch.Generator(), shares[:2])


def _guidance() -> SDSGuidance:
    """Only the schedule's arithmetic is used: no predictor."""
    cfg = SDSConfig(t_min=0.02, t_max=0.6, t_anneal="linear", t_max_final=0.3)
    return SDSGuidance(None, torch.linspace(0.999, 0.01, 1000), cfg)


def test_a_timestep_share_places_t_in_the_annealed_range_and_keeps_the_noise():
    g = _guidance()
    lo, hi = g.t_range(0.5)
    assert (lo, hi) == (20, 450)
    for share, expected in ((0.0, lo), (0.5, lo + 215), (1.0 - 1e-12, hi)):
        gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        t = g.sample_t(0.5, gen, torch.device("cpu"), share=share)
        g.sample_t(0.5, ref, torch.device("cpu"))
        assert int(t) == expected
        assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=ref))  # same draws after
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        g.sample_t(0.5, torch.Generator(), torch.device("cpu"), share=1.0)


def _stratified_trainer(tmp_path, folder):
    return two_prompt_trainer(tmp_path, folder, sections={"camera": {"sequence": "stratified"}, "sds": {"t_sequence": "stratified"}})


def test_the_plan_follows_each_slots_sequence(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = _stratified_trainer(tmp_path, tiny_sd_paths.folder)
    plain = two_prompt_trainer(tmp_path, tiny_sd_paths.folder)
    for step in range(3):
        plan, base = trainer.plan(), plain.plan()
        for k, slot in enumerate(trainer.slots):
            assert slot.sequence_seed == k  # the two prompts' seeds
            u_az, u_el, u_t = sequence_point(step, sequence_offset(k))
            assert float(plan.cameras.azimuth_deg[k]) == pytest.approx(-180.0 + 360.0 * u_az, abs=1e-3)
            lo, hi = trainer.guidance.t_range(step / slot.iters)
            assert int(plan.t[k]) == lo + min(int(u_t * (hi - lo + 1)), hi - lo)
            assert float(plan.cameras.radius[k]) == float(base.cameras.radius[k])  # the other draws as before
            torch.testing.assert_close(plan.noise[k], base.noise[k], rtol=0, atol=0)
        for t in (trainer, plain):
            for slot in t.slots:
                slot.step += 1


def test_checkpoints_and_retries_carry_the_sequence(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = _stratified_trainer(tmp_path, tiny_sd_paths.folder)
    trainer.train_step()
    ckpt = trainer.slot_checkpoint(1)
    assert ckpt.state["sequence_seed"] == 1
    cfg, embedding = trainer.slots[1].cfg, _embedding_of(trainer, 1)
    after = trainer.plan()
    resumed = _stratified_trainer(tmp_path, tiny_sd_paths.folder)
    resumed.assign(1, cfg, embedding, checkpoint=ckpt)
    again = resumed.plan()
    assert resumed.slots[1].step == 1
    assert float(again.cameras.azimuth_deg[1]) == float(after.cameras.azimuth_deg[1])
    assert int(again.t[1]) == int(after.t[1])
    retried = resumed.assign(1, cfg, embedding, checkpoint=ckpt, reseed=1234)
    assert retried.sequence_seed == 1234 and resumed.slot_checkpoint(1).state["sequence_seed"] == 1234
    assert float(resumed.plan().cameras.azimuth_deg[1]) != float(after.cameras.azimuth_deg[1])


def _embedding_of(trainer, k):
    from dreamfusion_trt.guidance.text import PromptEmbeddings

    v = len(trainer.views)
    return PromptEmbeddings(cond=trainer.cond_table[k * v : (k + 1) * v].clone(), uncond=trainer.uncond[k].clone(),
                            views=trainer.views, prompt=trainer.slots[k].cfg.prompt.text, truncated=False)  # fmt: skip


def test_the_options_are_in_the_config_and_refuse_other_values():
    cfg = from_dict({"camera": {"sequence": "stratified"}, "sds": {"t_sequence": "stratified"}})
    assert cfg.camera.sequence == "stratified" and cfg.sds.t_sequence == "stratified"
    assert from_dict({}).camera.sequence == "random" and from_dict({}).sds.t_sequence == "random"
    with pytest.raises(ValueError):
        from_dict({"camera": {"sequence": "sobol"}})


def test_a_decreasing_schedule_runs_from_the_top_of_the_range_to_its_bottom(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder, sections={"sds": {"t_sequence": "decreasing", "t_max": 0.9,
                                                                                    "t_anneal": "none"}})  # fmt: skip
    seen = []
    for _ in range(8):
        plan = trainer.plan()
        seen.append(int(plan.t[1]))  # slot 1: 8 iterations
        for slot in trainer.slots:
            slot.step += 1
    lo, hi = trainer.guidance.t_range(0.0)
    assert seen[0] == lo + int((7 / 8) * (hi - lo + 1)) and seen[-1] == lo
    assert all(a > b for a, b in zip(seen, seen[1:]))  # falls every step, no draw
