"""bench.initial_occupancy: which share of a true object nerfacc's first grid refresh marks empty."""

import pytest
import torch

from dreamfusion_trt.bench import initial_occupancy as occ


def test_cells_and_binarisation_follow_nerfacc_s_rule():
    centres = occ.cell_centres(4, 0.6)
    assert centres.shape == (64, 3) and torch.allclose(centres[0], torch.tensor([-0.45, -0.45, -0.45]))
    assert torch.allclose(centres[1], torch.tensor([-0.45, -0.45, -0.15]))  # nerfacc's order: z fastest
    jittered = occ.cell_centres(4, 0.6, torch.Generator().manual_seed(0))
    assert ((jittered - centres).abs() <= 0.15 + 1e-6).all() and not torch.equal(jittered, centres)
    density = torch.tensor([0.0, 0.1, 1.0, 10.0])
    # threshold min(mean of density*step, occ_thre): with step 1 the mean (2.775) caps at 0.01
    assert occ.occupied_cells(density, 1.0, 0.01).tolist() == [False, True, True, True]
    # a small step: the mean of density*step (2.775e-4) is below occ_thre and becomes the threshold
    assert occ.occupied_cells(density, 1e-4, 0.01).tolist() == [False, False, False, True]


def test_a_cube_starts_partly_in_empty_cells_and_a_sphere_almost_not():
    result = occ.measure(["a red cube", "a red sphere"], seed=0, samples_per_cell=2)
    cube, sphere = result["objects"]["a red cube"], result["objects"]["a red sphere"]
    assert 0.0 < result["occupied_share_of_box"] < 1.0
    assert 0.3 < result["occupied_radius_max"] < result["bound"] * 3**0.5  # the blob's ball, not the whole box
    assert cube["share_in_initially_empty_cells"] > 0.15 > sphere["share_in_initially_empty_cells"]
    assert cube["iou_cap"] < sphere["iou_cap"] <= 1.0
    assert cube["iou_cap"] == pytest.approx(1 - cube["share_in_initially_empty_cells"])
