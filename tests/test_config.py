import argparse

import pytest

from dreamfusion_trt.config import (
    RunConfig,
    add_config_arguments,
    from_dict,
    load_yaml,
    overrides_from_args,
    to_dict,
)


def test_yaml_then_cli_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sds:\n  guidance_scale: 50\ntrain:\n  iters: 7\n  betas: [0.8, 0.9]\n")
    cfg = load_yaml(path)
    assert cfg.sds.guidance_scale == 50.0 and cfg.train.iters == 7 and cfg.train.betas == (0.8, 0.9)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--train.iters", "11", "--field.background_color", "0,0.5,1"])
    cfg = from_dict(overrides_from_args(args), cfg)
    assert cfg.train.iters == 11
    assert cfg.field.background_color == (0.0, 0.5, 1.0)
    assert cfg.sds.guidance_scale == 50.0  # untouched by the command line


def test_round_trip_through_dict():
    cfg = from_dict({"render": {"shading": "textureless"}, "output": {"mesh_formats": ["glb", "ply"]}})
    again = from_dict(to_dict(cfg))
    assert again == cfg and again.output.mesh_formats == ("glb", "ply")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"trian": {"iters": 1}}, "unknown config section 'trian'"),
        ({"train": {"itres": 1}}, "unknown config key train.itres"),
        ({"render": {"shading": "phong"}}, "render.shading: 'phong' is not one of"),
        ({"train": {"iters": "ten"}}, "train.iters: expected int"),
        ({"train": {"iters": 2.5}}, "train.iters: expected an integer"),
        ({"train": {"betas": [0.9]}}, "train.betas: expected 2 values"),
        ({"prompt": {"view_dependent": "maybe"}}, "prompt.view_dependent: expected true or false"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(data)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(bad)


def test_help_lists_every_option_with_default():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    cfg = to_dict(RunConfig())
    for section, values in cfg.items():
        for key in values:
            assert f"--{section}.{key}" in text
    assert "(default: 100.0)" in text  # guidance scale


def test_a_custom_model_on_a_cpu_gets_the_cpu_sizes_under_the_users_flags(tmp_path, caplog):
    """A full-size field on a CPU would run for days: the CPU preset applies to any model, says so,
    and every flag the user gives still wins. A resumed run keeps the settings it started with."""
    import logging

    from dreamfusion_trt import cli
    from dreamfusion_trt.config import CPU_PRESET

    args = cli.make_parser().parse_args(["generate", "a hamburger", "--model", str(tmp_path / "sd"), "--device", "cpu",
                                         "--camera.render_size", "48"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        cfg = cli.build_config(args)
    assert "running on the CPU" in caplog.text
    assert cfg.train.iters == CPU_PRESET["train"]["iters"] and cfg.field.num_levels == CPU_PRESET["field"]["num_levels"]
    assert cfg.camera.render_size == 48  # the user's flag
    resumed = cli.build_config(args, base=RunConfig())
    assert resumed.train.iters == RunConfig().train.iters and resumed.camera.render_size == 48


def test_help_shows_the_defaults_the_prior_and_a_cpu_run_will_use(capsys):
    from dreamfusion_trt import cli

    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--train.iters VALUE (default: 10000; built-in prior: 2000; built-in prior on a CPU: 600; another model on a CPU: 400)" in text
