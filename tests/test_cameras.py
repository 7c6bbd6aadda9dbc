import math

import pytest
import torch

from dreamfusion_trt.cameras import cameras_at, get_rays, look_at_origin, orbit_cameras, sample_random_cameras
from dreamfusion_trt.config import CameraConfig


def test_random_cameras_follow_the_config_and_the_seed():
    cfg = CameraConfig()
    cams = sample_random_cameras(512, cfg, torch.Generator().manual_seed(3))
    assert cams.c2w.shape == (512, 4, 4)
    assert cams.radius.min() >= 1.0 and cams.radius.max() <= 1.5
    assert cams.elevation_deg.min() >= -10.0 - 1e-4 and cams.elevation_deg.max() <= 90.0 + 1e-4
    assert cams.azimuth_deg.min() > -180.0 - 1e-4 and cams.azimuth_deg.max() <= 180.0 + 1e-4
    assert torch.allclose(cams.position.norm(dim=-1), cams.radius, atol=1e-5)
    again = sample_random_cameras(512, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(cams.c2w, again.c2w) and torch.equal(cams.light_dir, again.light_dir)
    assert torch.allclose(cams.light_dir.norm(dim=-1), torch.ones(512), atol=1e-5)


def test_pose_is_a_rotation_looking_at_the_origin():
    elev = torch.tensor([0.0, 30.0, 89.9, 90.0, -10.0])
    azim = torch.tensor([0.0, 45.0, -120.0, 10.0, 180.0])
    c2w = look_at_origin(elev, azim, torch.full((5,), 1.3))
    rot = c2w[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(5), atol=1e-5)
    forward = -rot[:, :, 2]
    to_origin = -c2w[:, :3, 3] / c2w[:, :3, 3].norm(dim=-1, keepdim=True)
    assert torch.allclose(forward, to_origin, atol=1e-5)


def test_front_camera_sits_on_plus_x_and_centre_ray_hits_the_origin():
    cams = orbit_cameras(4, elevation_deg=0.0, radius=2.0, fovy_deg=60.0)
    assert torch.allclose(cams.position[0], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(cams.position[1], torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)  # azimuth 90 is +y
    o, d = get_rays(cams, 2, 2)  # the four pixel centres sit symmetrically around the axis
    centre = d.mean(dim=1)
    centre = centre / centre.norm(dim=-1, keepdim=True)
    assert torch.allclose(centre, -cams.position / 2.0, atol=1e-5)
    assert torch.allclose(d.norm(dim=-1), torch.ones(4, 4), atol=1e-6)


def test_field_of_view_spans_the_image():
    cams = orbit_cameras(1, elevation_deg=0.0, radius=1.0, fovy_deg=90.0)
    _, d = get_rays(cams, 64, 64)
    top, bottom = d[0, 32], d[0, 64 * 63 + 32]  # middle column, first and last row
    angle = math.degrees(math.acos(float(torch.dot(top, bottom))))
    assert abs(angle - 90.0 * 63 / 64) < 1.0  # pixel centres, not edges
    assert top[2] > 0 > bottom[2]  # image row 0 looks up (+z)


def test_elevation_sampling_sphere_follows_solid_angle_and_angle_is_uniform_in_degrees():
    n = 20000
    sphere = sample_random_cameras(n, CameraConfig(), torch.Generator().manual_seed(0)).elevation_deg
    angle_cfg = CameraConfig(elevation_sampling="angle")
    angle = sample_random_cameras(n, angle_cfg, torch.Generator().manual_seed(0)).elevation_deg
    for e in (sphere, angle):
        assert e.min() >= -10.0 - 1e-4 and e.max() <= 90.0 + 1e-4
    # share above 60 degrees: (1 - sin 60) / (1 + sin 10) on the sphere, 30 / 100 in angle
    expected_sphere = (1 - math.sin(math.radians(60))) / (1 + math.sin(math.radians(10)))
    assert abs(float((sphere > 60).double().mean()) - expected_sphere) < 0.01
    assert abs(float((angle > 60).double().mean()) - 0.30) < 0.01
    assert abs(float(angle.double().mean()) - 40.0) < 0.6
    # the same seed draws the same cameras, and the choice changes only the elevations
    again = sample_random_cameras(n, angle_cfg, torch.Generator().manual_seed(0))
    assert torch.equal(again.elevation_deg, angle)
    base = sample_random_cameras(n, CameraConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(again.azimuth_deg, base.azimuth_deg) and torch.equal(again.radius, base.radius)


def test_elevation_sampling_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="elevation_sampling"):
        sample_random_cameras(4, CameraConfig(elevation_sampling="bogus"), torch.Generator().manual_seed(0))


def test_angle_until_draws_elevations_in_angle_for_its_share_of_the_run_then_the_configured_way():
    cfg = CameraConfig(angle_until=0.25)
    assert cameras_at(cfg, 0.0).elevation_sampling == "angle" and cameras_at(cfg, 0.249).elevation_sampling == "angle"
    assert cameras_at(cfg, 0.25) is cfg and cameras_at(cfg, 0.9) is cfg  # sphere from a quarter of the run on
    off = CameraConfig()
    assert cameras_at(off, 0.0) is off  # 0 = off
    already = CameraConfig(elevation_sampling="angle", angle_until=0.5)
    assert cameras_at(already, 0.9) is already  # angle throughout, whatever the share
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="angle_until"):
            cameras_at(CameraConfig(angle_until=bad), 0.0)


def test_the_step_plan_draws_each_slot_s_cameras_by_its_own_progress():
    from types import SimpleNamespace

    from dreamfusion_trt.config import RunConfig
    from dreamfusion_trt.train.plan import _unpack, host_plan

    cfg = RunConfig()
    cfg.camera.angle_until = 0.5
    early = SimpleNamespace(step=1, iters=10, cpu_gen=torch.Generator().manual_seed(3))
    late = SimpleNamespace(step=5, iters=10, cpu_gen=torch.Generator().manual_seed(4))
    plan = host_plan([early, late], cfg, lambda s: "rgb", lambda s: "lambertian", {"latent": 8, "rgb": 8}, 4)
    elevation = _unpack(plan.upload)["elevation"][:, 0]
    angle = CameraConfig(**{**cfg.camera.__dict__, "elevation_sampling": "angle"})
    assert elevation[0] == sample_random_cameras(1, angle, torch.Generator().manual_seed(3)).elevation_deg[0]
    assert elevation[1] == sample_random_cameras(1, cfg.camera, torch.Generator().manual_seed(4)).elevation_deg[0]
    assert elevation[1] != sample_random_cameras(1, angle, torch.Generator().manual_seed(4)).elevation_deg[0]


def test_take_repeated_and_cat_keep_every_field_of_the_cameras():
    cams = orbit_cameras(4, 15.0, 2.0, 45.0)
    one = cams.take(2)
    assert len(one) == 1 and torch.equal(one.c2w, cams.c2w[2:3]) and torch.equal(one.light_dir, cams.light_dir[2:3])
    picked = cams.take(torch.tensor([3, 0]))
    assert torch.equal(picked.azimuth_deg, cams.azimuth_deg[[3, 0]])
    three = one.repeated(3)
    assert len(three) == 3 and all(torch.equal(getattr(three, f)[i], getattr(one, f)[0]) for f in one.__dict__ for i in range(3))
    both = type(cams).cat([cams.take(slice(0, 2)), cams.take(slice(2, 4))])
    assert all(torch.equal(getattr(both, f), getattr(cams, f)) for f in cams.__dict__)
    with pytest.raises(ValueError, match="batch of one"):
        cams.repeated(2)
