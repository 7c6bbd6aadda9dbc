"""The red-vs-blue diagnosis script: its model-free parts (albedo logits, the object mask, the
numbers it reads from a finished run folder) and, on the built-in prior, the guidance inflation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dreamfusion_trt.bench.prior_diagnosis import _Prior, albedo_logits, main, measure_guidance_inflation, measure_run, object_mask
from dreamfusion_trt.checkpoint import Checkpoint, save_checkpoint
from dreamfusion_trt.config import RunConfig, from_dict
from dreamfusion_trt.prior import WEIGHTS_DIR
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
    # an untrained scene is its blob: what the network adds on top of it is its small init output
    centre = row["axis"][0]
    assert centre["z"] == 0.0 and centre["blob"] == pytest.approx(cfg.field.blob_density, rel=1e-4)
    assert centre["sigma"] == pytest.approx(math.exp(centre["blob"] + centre["raw"]), rel=1e-3) and abs(centre["raw"]) < 1.0
    assert len(centre["albedo"]) == 3 and all(0 <= c <= 1 for c in centre["albedo"])
    out = tmp_path / "diag.json"
    assert main(["--skip-model", "--shape", "cube", "--runs", str(tmp_path), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["runs"][0]["object"] == "a blue cube" and set(data["albedo"]) == {"a red cube", "a blue cube"}


def test_strong_guidance_inflates_the_prior_s_prediction_at_the_true_object():
    """The built-in prior's guided one-step prediction from a noised true render: at guidance 1 and
    low noise it is the true object (area ratio ~1); at the old preset's guidance 50 and t = 600
    it fills about twice the true silhouette (2.07 measured on a red cube), so SDS pushes the
    object to grow. Small sample: 2 renders, 2 draws."""
    prior = _Prior(WEIGHTS_DIR, torch.device("cpu"))
    out = measure_guidance_inflation(prior, "a red cube", (1.0, 50.0), (50, 600), n=2, draws=2, seed=0)
    assert 0.2 < out["true_area"] < 0.8 and out["vae_reconstruction_area_ratio"] == pytest.approx(1.0, abs=0.1)
    low, high = out["by_scale"]["1"], out["by_scale"]["50"]
    assert low["50"]["area_ratio"] == pytest.approx(1.0, abs=0.1) and low["50"]["non_white_outside"] < 0.02
    assert high["600"]["area_ratio"] > 1.4 and high["600"]["non_white_outside"] > 0.1
    assert high["600"]["area_ratio"] > low["600"]["area_ratio"] + 0.3


def test_the_filled_torus_fills_only_the_hole_and_the_prior_keeps_a_true_hole_open():
    """`sd_filled_torus` agrees with the torus outside its ring and is solid in the hole; at low
    noise the prior's prediction from the true torus keeps the hole open and the one from the
    filled torus keeps it filled (measured 0.94 against 0.00 at t = 50 over 16 blue renders).
    Small sample: 8 renders, 1 draw. The torus shape is restored afterwards."""
    from dreamfusion_trt.bench.prior_diagnosis import measure_hole, sd_filled_torus
    from dreamfusion_trt.prior import scenes

    x = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0], [0.6, 0.0, 0.0], [0.34, 0.0, 0.1]])
    filled, true = sd_filled_torus(x, 0.34, 0.14), scenes.sd_torus(x, 0.34, 0.14)
    assert filled[0] < 0 < true[0] and filled[1] < 0 < true[1]  # the hole is solid
    assert filled[2:].tolist() == pytest.approx(true[2:].tolist())  # the ring is the same
    before = scenes.SHAPES["torus"]
    prior = _Prior(WEIGHTS_DIR, torch.device("cpu"))
    out = measure_hole(prior, "a red torus", (1.0,), (50,), n=8, draws=1, seed=0)
    assert scenes.SHAPES["torus"] is before
    assert out["hole_pixels_per_render"] > 5 and out["renders_with_a_hole"] >= 2
    row = out["by_scale"]["1"]["50"]
    assert row["hole_open_from_true"] > 0.7 and row["hole_open_from_filled"] < 0.3


def test_the_janus_measure_paints_only_the_other_faces_and_low_noise_keeps_what_it_sees():
    """`measure_janus` renders the six-colored cube and the same cube painted one colour from the
    same cameras: they differ on the other faces' pixels only, and the registry is restored after.
    At guidance 1 and t = 50 the prior's prediction keeps what it is given: the true cube's
    faces stay right and the one-colour cube stays one colour. Small sample: 4 renders, 1 draw."""
    from dreamfusion_trt.bench.prior_diagnosis import measure_janus
    from dreamfusion_trt.prior import scenes

    before = scenes.KNOWN_OBJECTS[scenes.SIX_COLORED_CAPTION]
    prior = _Prior(WEIGHTS_DIR, torch.device("cpu"))
    out = measure_janus(prior, (1.0,), (50,), n=4, draws=1, seed=0)
    assert scenes.KNOWN_OBJECTS[scenes.SIX_COLORED_CAPTION] is before
    assert 100 < out["differing_pixels_per_render"] < 0.5 * 64 * 64
    row = out["by_scale"]["1"]["50"]
    for caption in ("view", "plain", "view_over_plain"):
        assert row[f"{caption}_faces_right_from_true"] > 0.9 and row[f"{caption}_faces_right_from_one_colour"] < 0.2
    # at guidance 1 the base drops out: guided from the bare caption or from nothing, the view caption's own prediction
    for name in ("true", "one_colour"):
        assert row[f"view_over_plain_faces_right_from_{name}_by_view"] == row[f"view_faces_right_from_{name}_by_view"]


def test_the_janus_oracle_fits_the_true_cube_and_reads_six_face_colours():
    """`measure_janus_oracle`: the field fitted to the true six-colored cube overlaps it (IoU well
    above the blob's), each of the six faces gets a mean albedo and its nearest colour, and a few
    colour-only SDS steps run on it, each followed by a fitting step that holds the shape. Small
    sample: 40 fitting steps, 2 SDS steps."""
    from dreamfusion_trt.bench.prior_diagnosis import measure_janus_oracle
    from dreamfusion_trt.prior.scenes import FACES

    out = measure_janus_oracle(2, True, seed=0, fit_steps=40, hold=1, flags={"sds": {"guidance_scale": 30.0}})
    assert out["iou_before"] > 0.5 and out["iou_after"] > out["iou_before"] - 0.05
    assert out["hold"] == 1 and out["steps"] == 2 and out["guidance_scale"] == 30.0  # the run flags reached the trainer's config
    for key in ("colours_before", "colours_after"):
        assert sorted(out[key]["faces"]) == sorted(FACES) and 0 <= out[key]["right"] <= 6
        assert out[key]["right"] == sum(v["nearest"] == v["true"] for v in out[key]["faces"].values())


def test_the_shape_oracle_starts_at_the_true_object_and_scores_the_truth_s_own_level():
    """`measure_shape_oracle`: the truth's own density at the mesh threshold is a halo around the
    true solid (volume above 1, IoU with itself 1); the fitted field starts close to that level
    set; the run's flags reach the trainer; the trajectory has the start and each checkpoint.
    Small sample: 60 fitting steps, 2 SDS steps."""
    from dreamfusion_trt.bench.prior_diagnosis import measure_shape_oracle

    out = measure_shape_oracle("a red sphere", 2, True, seed=0, fit_steps=60, flags={"reg": {"orientation": 0.0}}, checkpoints=2)
    truth = out["truth_at_mesh_threshold"]
    assert truth["iou_true_level"] == 1.0 and truth["volume_ratio"] > 1.0 and truth["iou"] < 1.0
    assert [r["step"] for r in out["trajectory"]] == [0, 1, 2]
    start = out["trajectory"][0]
    assert start["iou_true_level"] > 0.7 and abs(start["volume_ratio"] - truth["volume_ratio"]) < 0.5
    assert out["flags"] == {"reg": {"orientation": 0.0}} and out["caption"] == "a red sphere"
    assert "faces_right" not in start


def test_perp_neg_removes_only_the_part_of_a_negative_direction_perpendicular_to_the_caption_s():
    """`_Prior.sds_grad` with Perp-Neg negatives, on a stand-in noise predictor whose prediction
    is its text embedding: a negative along the caption's own direction changes nothing; one
    perpendicular to it is subtracted with its weight; weight 0 is plain CFG."""
    prior = _Prior.__new__(_Prior)  # no model: only sds_grad's arithmetic is under test
    prior.alphas = torch.linspace(0.999, 0.01, 1000)
    prior.eps = lambda x, t, emb: emb.reshape(len(emb), 4, 1, 1)
    z, noise = torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    uncond = torch.zeros(1, 1, 4)
    cond = torch.tensor([[[1.0, 0, 0, 0]], [[0, 2.0, 0, 0]]])
    plain = prior.sds_grad(z, 500, noise, cond, uncond, 7.5)
    along = 3 * cond
    perpendicular = torch.tensor([[[0, 0, 1.0, 0]], [[0, 0, 0, 1.0]]])
    weights = torch.tensor([[2.0, 2.0]])
    assert torch.allclose(prior.sds_grad(z, 500, noise, cond, uncond, 7.5, along[None], weights), plain)
    assert torch.allclose(prior.sds_grad(z, 500, noise, cond, uncond, 7.5, perpendicular[None], torch.zeros(1, 2)), plain)
    got = prior.sds_grad(z, 500, noise, cond, uncond, 7.5, perpendicular[None], weights)
    a = prior.alphas[500]
    want = (1 - a) * 7.5 * (cond - 2.0 * perpendicular).reshape(2, 4, 1, 1)
    assert torch.allclose(got, want)


def test_the_random_colour_field_is_seeded_smooth_and_not_one_colour():
    """`_random_colours` (the Janus oracle's object-blind start): the same seed gives the same
    field, another seed another; colours stay in (0, 1), differ across the box, and change
    little between points 0.001 apart."""
    from dreamfusion_trt.bench.prior_diagnosis import _random_colours

    x = torch.rand(2000, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    a, b = _random_colours(3.0, 0, torch.device("cpu")), _random_colours(3.0, 1, torch.device("cpu"))
    assert torch.equal(a(x), _random_colours(3.0, 0, torch.device("cpu"))(x)) and not torch.allclose(a(x), b(x))
    c = a(x)
    assert (c > 0).all() and (c < 1).all() and c.std(0).min() > 0.1
    assert (a(x + 1e-3) - c).abs().max() < 0.05


def test_a_softer_density_edge_renders_a_larger_silhouette_and_is_cut_lower():
    from dreamfusion_trt.bench.prior_diagnosis import measure_silhouette_halo

    res = measure_silhouette_halo([0.003, 0.03], size=16, samples=64)
    assert set(res["by_shape"]) == {"cube", "sphere", "cone", "torus", "cylinder"} and res["views"] == 12
    for shape, rows in res["by_shape"].items():
        sharp, soft = rows["0.003"], rows["0.03"]
        assert soft["silhouette_area_ratio"] > sharp["silhouette_area_ratio"] > 0.85, shape
        assert sharp["silhouette_iou"] > soft["silhouette_iou"], shape
        assert soft["opacity_level"] < sharp["opacity_level"], shape


def test_a_density_moved_inside_the_surface_renders_its_silhouette_nearer_the_true_one():
    """At width 0.01 the silhouette is 14-25 % too large in area; centring the density 0.03
    inside the surface brings it within a few per cent (64 x 64: 0.98-1.04)."""
    from dreamfusion_trt.bench.prior_diagnosis import measure_silhouette_halo

    res = measure_silhouette_halo([0.01], size=32, samples=128, offsets=[0.0, 0.03])
    for shape, rows in res["by_shape"].items():
        assert set(rows) == {"0.01", "0.01@0.03"}, shape
        plain, moved = rows["0.01"]["silhouette_area_ratio"], rows["0.01@0.03"]["silhouette_area_ratio"]
        assert plain > 1.08 and abs(moved - 1.0) < abs(plain - 1.0) - 0.05, (shape, plain, moved)


def test_the_pixel_ceiling_grows_the_true_solid_by_whole_pixels_and_reads_a_run_s_volume_as_its_size_error(tmp_path):
    from dreamfusion_trt.bench.prior_diagnosis import measure_pixel_ceiling
    from dreamfusion_trt.prior.score import pixel_footprint

    pixel = pixel_footprint(2.0, 45.0, 64)
    assert pixel == pytest.approx(2 * 2 * math.tan(math.radians(22.5)) / 64)
    r, d = 0.45, 0.5 * pixel  # the sphere of scenes.SHAPES
    want = (r / (r + d)) ** 3  # a sphere inside a larger concentric one
    # a sphere run 1.5 pixels too big (by volume), with its IoU; a row without volumes is skipped
    grown = ((r + 1.5 * pixel) / r) ** 3
    rows = [{"object": "a green sphere", "seed": 1, "iou": 0.7, "mesh_volume_fraction": 0.1 * grown, "true_volume_fraction": 0.1},
            {"object": "a red cube", "seed": 1, "iou": 0.7}]  # fmt: skip
    result = tmp_path / "bench.json"
    result.write_text(json.dumps({"settings": {"on": {"rows": rows}}}))
    out = measure_pixel_ceiling([-1.0, 0.5, 1.0], pixel, [str(result)], resolution=96)
    sphere = out["by_shape"]["sphere"]
    assert sphere["0.5"]["iou"] == pytest.approx(want, abs=0.01)
    assert sphere["0.5"]["volume_ratio"] == pytest.approx(1 / want, rel=0.02)
    assert sphere["-1"]["iou"] == pytest.approx(((r - pixel) / r) ** 3, abs=0.01)
    for shape in out["by_shape"].values():  # growing by more costs more, for every shape
        assert shape["1"]["iou"] < shape["0.5"]["iou"] < 1.0
    assert out["by_shape"]["torus"]["1"]["iou"] < out["by_shape"]["sphere"]["1"]["iou"]  # the thin tube pays most
    (run,) = out["runs"]
    assert run["offset_px"] == pytest.approx(1.5, abs=0.1)
    assert run["size_only_iou"] == pytest.approx(1 / grown, abs=0.01)
    assert run["volume_ratio"] == pytest.approx(grown)


def test_the_radial_error_of_an_untrained_blob_is_its_radius_against_the_object_s(tmp_path):
    """An untrained scene is its density blob, a ball: against a sphere it is off by the same
    amount along every ray; against a cube it is off far more towards the corners and edges
    than towards the faces' centres."""
    from dreamfusion_trt.bench.prior_diagnosis import measure_radial_error
    from dreamfusion_trt.prior.score import fibonacci_directions

    dirs = fibonacci_directions(500)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(500, dtype=torch.float64))
    assert dirs.mean(0).abs().max() < 0.01  # spread over the whole sphere
    pixel = 0.0259
    results = {}
    for caption in ("a blue sphere", "a blue cube", "a blue torus"):
        folder = tmp_path / caption.replace(" ", "-")
        cfg = from_dict({"prompt": {"text": caption}, "field": {"num_levels": 4, "log2_hashmap_size": 12,
                         "max_resolution": 64, "hidden_dim": 16, "bound": 0.6}}, RunConfig())  # fmt: skip
        torch.manual_seed(0)
        save_checkpoint(Checkpoint(step=1, config=cfg, model=build_scene(cfg).state_dict()), folder)
        (folder / "score.json").write_text(json.dumps({"object": caption, "iou": 0.5}))
        results[caption] = measure_radial_error(folder, pixel, directions=500)
    assert results["a blue torus"] is None  # not star-shaped from its centre
    # the blob's level-10 radius, sigma = exp(blob_density (1 - r / blob_radius)) = 10, up to the untrained network's output
    r_blob = cfg.field.blob_radius * (1 - math.log(cfg.output.mesh_threshold) / cfg.field.blob_density)
    sphere = results["a blue sphere"]
    assert sphere["sharp"] is None and sphere["smooth"]["rays"] == 500
    assert sphere["all"]["median_px"] == pytest.approx((r_blob - 0.45) / pixel, abs=0.5)
    assert sphere["all"]["q75_px"] - sphere["all"]["q25_px"] < 0.5
    cube = results["a blue cube"]
    assert cube["sharp"]["rays"] + cube["smooth"]["rays"] == 500 and cube["sharp"]["rays"] > 0
    assert cube["sharp"]["median_px"] < cube["smooth"]["median_px"] - 2  # the ball cuts the corners
    face_centre = (r_blob - 0.4) / pixel  # the rays through the faces' centres are the least off
    assert face_centre - 3 < cube["smooth"]["q75_px"] < face_centre + 0.5
