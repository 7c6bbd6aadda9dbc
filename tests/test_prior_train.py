"""The prior's dataset, tokenizer and training script (tiny CPU runs)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamfusion_trt.config import PromptConfig, load_yaml
from dreamfusion_trt.guidance.text import VIEWS, view_indices, view_prompt
from dreamfusion_trt.prior.dataset import PLAIN, PRIOR_OFFSET, SHADINGS, DatasetConfig, render_dataset
from dreamfusion_trt.prior.model import (
    MAX_WEIGHT_BYTES,
    PriorArchitecture,
    build_tokenizer,
    caption_words,
    folder_weight_bytes,
    learn_merges,
    tiny_config,
    train_prior,
    weight_bytes,
)
from dreamfusion_trt.prior.scenes import KNOWN_CAPTIONS, SIX_COLORED_CAPTION
from dreamfusion_trt.sdmodel import load_diffusion


def _train_prior_script():
    """build_scripts/train_prior.py as a module: the prior's command line lives there."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "build_scripts" / "train_prior.py"
    spec = importlib.util.spec_from_file_location("train_prior_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest on one thread, and do not stall when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_dataset():
    cfg = DatasetConfig(images_per_object=6, image_size=16, num_samples=24, batch=8, plain_caption_prob=0.3, seed=3)
    return cfg, render_dataset(cfg)


def test_dataset_captions_use_the_view_templates_matching_each_camera(small_dataset):
    cfg, data = small_dataset
    n = (len(KNOWN_CAPTIONS) - 1 + cfg.multicolor_factor) * cfg.images_per_object
    assert data.images.shape == (n, 3, 16, 16) and data.images.dtype == torch.uint8
    six = KNOWN_CAPTIONS.index(SIX_COLORED_CAPTION)
    assert int((data.object_index == six).sum()) == cfg.multicolor_factor * cfg.images_per_object
    views = view_indices(data.elevation_deg, data.azimuth_deg, PromptConfig())
    assert torch.equal(views, data.view_index)
    plain = 0
    for i in range(n):
        caption = KNOWN_CAPTIONS[int(data.object_index[i])]
        text = data.texts[int(data.text_index[i])]
        if text == caption:
            plain += 1
        else:
            assert text == view_prompt(caption, VIEWS[int(data.view_index[i])])
    assert 0 < plain < n  # some bare captions, mostly view-dependent ones
    assert set(data.shading_index.tolist()) <= set(range(len(SHADINGS)))
    assert data.texts[PLAIN] == KNOWN_CAPTIONS[0]


def test_dataset_is_reproducible_and_depends_on_the_seed(small_dataset):
    cfg, data = small_dataset
    small = replace(cfg, captions=(KNOWN_CAPTIONS[0],))
    a, b = render_dataset(small), render_dataset(small)
    assert torch.equal(a.images, b.images) and torch.equal(a.text_index, b.text_index)
    c = render_dataset(replace(small, seed=small.seed + 1))
    assert not torch.equal(a.images, c.images)
    # the first object's renders do not depend on which other objects are rendered
    assert torch.equal(a.images, data.images[: cfg.images_per_object])


def test_dataset_object_width_sharpens_the_silhouette_edge():
    """A narrower density edge leaves fewer partly covered pixels at the silhouette, and the
    script's flags reach the dataset."""
    base = DatasetConfig(images_per_object=4, image_size=32, num_samples=128, batch=4, seed=1,
                         shading_probs=(1.0, 0.0, 0.0), captions=("a blue sphere",))  # fmt: skip

    def partial_pixels(width: float) -> int:
        img = render_dataset(replace(base, object_width=width)).float_images()
        red = img[:, 0]  # white background: 1; the blue sphere's albedo: ~0.1
        return int(((red > 0.2) & (red < 0.85)).sum())

    soft, sharp = partial_pixels(0.03), partial_pixels(0.003)
    assert sharp < 0.7 * soft, (soft, sharp)
    with pytest.raises(ValueError, match="object_width"):
        render_dataset(replace(base, object_width=0.0))
    script = _train_prior_script()
    args = script.make_parser().parse_args(["--tiny", "--object-width", "0.003", "--render-samples", "192"])
    cfg = script.config_from_args(args)
    assert cfg.data.object_width == 0.003 and cfg.data.num_samples == 192


def test_dataset_object_offset_renders_the_objects_smaller_and_reaches_the_script():
    base = DatasetConfig(images_per_object=4, image_size=32, num_samples=128, batch=4, seed=1,
                         shading_probs=(1.0, 0.0, 0.0), captions=("a blue sphere",))  # fmt: skip

    def covered_pixels(offset: float) -> int:
        return int((render_dataset(replace(base, object_offset=offset)).float_images()[:, 0] < 0.5).sum())

    assert covered_pixels(0.03) < 0.92 * covered_pixels(0.0)
    with pytest.raises(ValueError, match="object_offset"):
        render_dataset(replace(base, object_offset=-0.01))
    script = _train_prior_script()
    cfg = script.config_from_args(script.make_parser().parse_args(["--tiny", "--object-offset", "0.03"]))
    assert cfg.data.object_offset == 0.03
    assert script.config_from_args(script.make_parser().parse_args(["--tiny"])).data.object_offset == PRIOR_OFFSET == 0.03


def test_dataset_rejects_unknown_captions():
    with pytest.raises(ValueError, match="a hamburger"):
        render_dataset(DatasetConfig(images_per_object=1, captions=("a hamburger",)))


def test_tokenizer_has_one_token_per_caption_word():
    tok = build_tokenizer()
    for word in caption_words():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)
    ids = tok(view_prompt(SIX_COLORED_CAPTION, "front")).input_ids
    assert len(ids) == 10  # bos a six - colored cube , front view eos
    # anything else still tokenizes, byte by byte
    assert len(tok("zebra", add_special_tokens=False).input_ids) == 5
    merges = learn_merges(["aa", "aab"])
    assert merges[0] == ("a", "a")


def test_default_architecture_fits_the_size_limit():
    assert weight_bytes(PriorArchitecture(), torch.float16) < MAX_WEIGHT_BYTES


def _tiny(tmp: Path, name: str, **kw):
    return replace(tiny_config(tmp / name, seed=0), **kw)


def test_tiny_run_writes_a_stable_diffusion_folder_that_load_diffusion_reads(tmp_path):
    out, evaluation = train_prior(_tiny(tmp_path, "prior"))
    assert out == tmp_path / "prior"
    for name in ("model_index.json", "prompts.json", "dreamfusion_preset.yaml", "prior_eval.json", "prior_train.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".prior.tmp-*"))  # the temporary folder was renamed away
    assert 0 < folder_weight_bytes(out) < MAX_WEIGHT_BYTES
    model = load_diffusion(str(out), device="cpu", dtype="float32")
    assert model.latent_channels == 4 and model.unet.config.sample_size == 8
    assert model.text_dim == model.unet.config.cross_attention_dim == 16
    assert model.vae_scaling_factor > 0 and model.alphas_cumprod.shape == (1000,)
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["captions"] == list(KNOWN_CAPTIONS) and prompts["views"] == list(VIEWS)
    cfg = load_yaml(out / "dreamfusion_preset.yaml")
    assert cfg.camera.render_size == cfg.train.encode_size == 32 and cfg.train.latent_fraction == 0.0
    assert cfg.render.backend == "torch"  # the sampler that recovered the cubes (BENCHMARKS.md, ninth session)
    saved = json.loads((out / "prior_eval.json").read_text())
    assert saved["object_accuracy"] == evaluation["object_accuracy"]
    assert 0.0 <= evaluation["object_accuracy"] <= 1.0
    assert len(evaluation["per_text"]) == len(KNOWN_CAPTIONS) * (len(VIEWS) + 1)
    # the tokenizer and text encoder went through the save: the same caption embeds the same
    ids = model.tokenizer(["a red cube, front view", "a red cube, back view"], padding="max_length",
                          max_length=model.max_length, return_tensors="pt").input_ids  # fmt: skip
    emb = model.text_encoder(ids)[0]
    assert emb.shape == (2, 77, 16) and not torch.allclose(emb[0], emb[1])


def test_same_seed_gives_the_same_weights_and_a_rerun_replaces_the_folder(tmp_path):
    """The command line's --tiny run, then the same settings through train_prior into the same folder."""
    out = tmp_path / "a"
    assert _train_prior_script().main(["--tiny", "--out", str(out), "--eval-per-caption", "0"]) == 0
    assert (out / "model_index.json").is_file() and not (out / "prior_eval.json").exists()
    parts = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors")  # fmt: skip
    first = {p: load_file(out / p) for p in parts}
    (out / "marker").write_text("from the first run")
    again, _ = train_prior(_tiny(tmp_path, "a", eval_per_caption=0))
    assert again == out and not (out / "marker").exists()  # replaced as a whole
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a"]  # no temporary or old folders left
    for p in parts:
        second = load_file(out / p)
        assert first[p].keys() == second.keys()
        assert all(torch.equal(first[p][k], second[k]) for k in second), p


def test_training_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="steps_unet"):
        train_prior(_tiny(tmp_path, "x", steps_unet=0))
    cfg = _tiny(tmp_path, "x")
    with pytest.raises(ValueError, match="image_size"):
        train_prior(replace(cfg, data=replace(cfg.data, image_size=16)))
    assert not (tmp_path / "x").exists()


def test_a_retrained_prior_keeps_the_given_vae_and_its_cameras_reach_the_preset(tmp_path):
    """--vae-from keeps the source prior's VAE bit for bit (and its latent scale); the renders'
    elevation sampling is written into the preset, so runs draw their cameras as the prior saw them."""
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    source, _ = train_prior(_tiny(tmp_path, "source", eval_per_caption=0))
    script = _train_prior_script()
    argv = ["--tiny", "--out", str(tmp_path / "angle"), "--eval-per-caption", "0", "--elevation-sampling", "angle",
            "--vae-from", str(source), "--steps-vae", "50"]  # fmt: skip
    cfg = script.config_from_args(script.make_parser().parse_args(argv))
    assert cfg.data.camera.elevation_sampling == "angle" and cfg.vae_from == str(source)
    assert script.main(argv) == 0
    out = tmp_path / "angle"
    before, after = load_file(source / vae_file), load_file(out / vae_file)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    scale = [json.loads((d / "vae" / "config.json").read_text())["scaling_factor"] for d in (source, out)]
    assert scale[0] == scale[1]
    record = json.loads((out / "prior_train.json").read_text())
    assert record["vae"]["from"] == str(source) and record["vae"]["seconds"] == 0.0  # no VAE step ran
    assert record["config"]["data"]["camera"]["elevation_sampling"] == "angle"
    assert load_yaml(out / "dreamfusion_preset.yaml").camera.elevation_sampling == "angle"
    assert load_yaml(source / "dreamfusion_preset.yaml").camera.elevation_sampling == "sphere"
    # the UNet was retrained on the new renders, not copied
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert not all(torch.equal(a, b) for a, b in zip(load_file(source / unet).values(), load_file(out / unet).values()))


def test_vae_from_rejects_a_folder_without_a_vae_or_with_another_architecture(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no trained prior's VAE"):
        train_prior(_tiny(tmp_path, "x", vae_from=str(tmp_path / "empty"), eval_per_caption=0))
    source, _ = train_prior(_tiny(tmp_path, "source", eval_per_caption=0))
    cfg = _tiny(tmp_path, "x", vae_from=str(source), eval_per_caption=0)
    wider = replace(cfg.arch, vae_channels=tuple(2 * c for c in cfg.arch.vae_channels))
    with pytest.raises(ValueError, match="another architecture"):
        train_prior(replace(cfg, arch=wider))
    assert not (tmp_path / "x").exists()


def test_the_shipped_preset_says_how_the_prior_drew_its_elevations():
    from dreamfusion_trt.prior import PRESET_NAME, WEIGHTS_DIR

    train = json.loads((WEIGHTS_DIR / "prior_train.json").read_text())
    drawn = train["config"]["data"]["camera"].get("elevation_sampling", "sphere")  # older records predate the knob
    assert load_yaml(WEIGHTS_DIR / PRESET_NAME).camera.elevation_sampling == drawn


def test_the_shipped_preset_is_what_a_retrain_with_the_default_config_writes():
    """A setting added to the shipped preset by hand would be lost at the next retrain: the
    preset's generator (`preset_yaml`) must carry it too, so the two agree as data."""
    import yaml

    from dreamfusion_trt.prior import PRESET_CPU_NAME, PRESET_NAME, WEIGHTS_DIR
    from dreamfusion_trt.prior.model import PriorTrainConfig, preset_cpu_yaml, preset_yaml

    cfg = PriorTrainConfig()
    assert yaml.safe_load(preset_yaml(cfg)) == yaml.safe_load((WEIGHTS_DIR / PRESET_NAME).read_text())
    assert yaml.safe_load(preset_cpu_yaml(cfg)) == yaml.safe_load((WEIGHTS_DIR / PRESET_CPU_NAME).read_text())


def test_unet_from_continues_a_trained_prior_and_keeps_its_vae(tmp_path):
    """--unet-from starts the UNet and text encoder from the source's weights (so a different
    seed's fresh initialisation plays no part), keeps its VAE bit for bit, and trains on."""
    unet_file, vae_file = "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"
    source, _ = train_prior(_tiny(tmp_path, "source", eval_per_caption=0))
    script = _train_prior_script()
    out = tmp_path / "continued"
    argv = ["--tiny", "--out", str(out), "--eval-per-caption", "0", "--seed", "1", "--unet-from", str(source)]
    assert script.main(argv) == 0
    src, cont = load_file(source / unet_file), load_file(out / unet_file)
    assert not all(torch.equal(src[k], cont[k]) for k in src)  # trained on
    fresh, _ = train_prior(_tiny(tmp_path, "fresh", seed=1, eval_per_caption=0))  # what seed 1 gives from scratch
    far = load_file(fresh / unet_file)

    def dist(a, b):
        return sum(float((a[k].float() - b[k].float()).square().sum()) for k in a) ** 0.5

    assert dist(cont, src) < 0.01 * dist(far, src)
    before, after = load_file(source / vae_file), load_file(out / vae_file)
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = json.loads((out / "prior_train.json").read_text())
    assert record["unet"]["from"] == str(source) and record["vae"]["from"] == str(source)


def test_unet_from_rejects_a_folder_without_a_unet_or_with_another_architecture(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no trained prior's unet"):
        train_prior(_tiny(tmp_path, "x", unet_from=str(tmp_path / "empty"), eval_per_caption=0))
    source, _ = train_prior(_tiny(tmp_path, "source", eval_per_caption=0))
    cfg = _tiny(tmp_path, "x", unet_from=str(source), vae_from=None, eval_per_caption=0)
    wider = replace(cfg.arch, unet_channels=tuple(2 * c for c in cfg.arch.unet_channels))
    with pytest.raises(ValueError, match="unet in .* another architecture"):
        train_prior(replace(cfg, arch=wider))
    few = _tiny(tmp_path, "few", eval_per_caption=0)
    few, _ = train_prior(replace(few, data=replace(few.data, captions=("a red cube", "a blue cube"))))
    with pytest.raises(ValueError, match="other captions"):
        train_prior(_tiny(tmp_path, "x", unet_from=str(few), eval_per_caption=0))
    assert not (tmp_path / "x").exists()


def test_image_size_sets_the_prior_the_renders_and_the_preset():
    script = _train_prior_script()
    cfg = script.config_from_args(script.make_parser().parse_args(["--tiny", "--image-size", "64", "--out", "unused"]))
    assert cfg.arch.image_size == cfg.data.image_size == 64 and cfg.arch.latent_size == 16
    from dreamfusion_trt.config import RunConfig, from_dict
    from dreamfusion_trt.prior.model import preset_yaml

    import yaml

    preset = from_dict(yaml.safe_load(preset_yaml(cfg)), RunConfig())
    assert preset.camera.render_size == 64 and preset.train.encode_size == 64
