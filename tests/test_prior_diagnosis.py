"""The red-vs-blue diagnosis script's model-free parts: albedo logits, the object mask, and the
numbers it reads from a finished run folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dreamfusion_trt.bench.prior_diagnosis import albedo_logits, main, measure_run, object_mask
from dreamfusion_trt.checkpoint import Checkpoint, save_checkpoint
from dreamfusion_trt.config import RunConfig, from_dict
from dreamfusion_trt.scene import build_scene


def test_albedo_logits_invert_the_sigmoid():
    red = albedo_logits("a red torus")
    assert red["rgb"] == [0.9, 0.12, 0.1]
    assert [torch.sigmoid(torch.tensor(v)).item() for v in red["logits"]] == pytest.approx(red["rgb"], abs=1e-6)
    assert red["logits"][0] == pytest.approx(math.log(9.0)) and red["reachable"]


def test_object_mask_ignores_the_white_background():
    img = torch.ones(1, 3, 8, 8)
    img[0, :, 2:4, 2:5] = torch.tensor([0.9, 0.12, 0.1])[:, None, None]
    img[0, :, 6, 6] = 0.97  # within the level of white
    mask = object_mask(img)
    assert mask.shape == (1, 1, 8, 8) and int(mask.sum()) == 6


def test_a_run_folder_gives_its_thresholds_and_albedo(tmp_path):
    cfg = from_dict({"prompt": {"text": "a blue cube"}, "field": {"num_levels": 4, "log2_hashmap_size": 12,
                     "max_resolution": 64, "hidden_dim": 16, "bound": 0.6}}, RunConfig())  # fmt: skip
    torch.manual_seed(0)
    scene = build_scene(cfg)
    save_checkpoint(Checkpoint(step=1, config=cfg, model=scene.state_dict()), tmp_path)
    assert measure_run(tmp_path) is None  # not scored yet
    (tmp_path / "score.json").write_text(json.dumps({"object": "a blue cube", "iou": 0.4, "best_iou": 0.7}))
    row = measure_run(tmp_path)
    assert row["iou"] == 0.4 and row["best_iou"] == 0.7 and row["mesh_threshold"] == cfg.output.mesh_threshold
    assert len(row["albedo_mean_inside_surface"]) == 3 and 0 <= row["albedo_error_inside_surface"] <= math.sqrt(3)
    out = tmp_path / "diag.json"
    assert main(["--skip-model", "--shape", "cube", "--runs", str(tmp_path), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["runs"][0]["object"] == "a blue cube" and set(data["albedo"]) == {"a red cube", "a blue cube"}
