"""The whole step as a CUDA graph (train.cuda_graph): the plan's tensors in and out of static
buffers, the step's key, warm-up, capture and the fall-back to eager steps, on the CPU through
`BufferReplay` (the graph's twin: the same buffers, the step re-run instead of replayed); the
real CUDA graph against the eager step on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt.cameras import CameraBatch
from dreamfusion_trt.config import from_dict
from dreamfusion_trt.train import plan as step_plan
from dreamfusion_trt.train.step_graph import BufferReplay, StepGraphs, step_graph_choice
from test_coarse_to_fine import two_prompt_trainer

CUDA = torch.device("cuda")


def test_auto_graphs_one_prompt_on_cuda_only():
    cfg = from_dict({})
    assert step_graph_choice(cfg, 1, CUDA)[0] is True
    assert step_graph_choice(cfg, 16, CUDA) == (False, "auto: 16 prompts per step (GPU-bound; nerfacc skips empty space)")
    assert step_graph_choice(cfg, 1, torch.device("cpu"))[0] is False
    assert step_graph_choice(from_dict({"render": {"backend": "nerfacc"}}), 1, CUDA)[0] is False
    assert step_graph_choice(from_dict({"train": {"data_parallel": True}}), 1, CUDA)[0] is False
    assert step_graph_choice(from_dict({"train": {"cuda_graph": "off"}}), 1, CUDA)[0] is False
    assert step_graph_choice(from_dict({"train": {"cuda_graph": "on"}}), 16, CUDA)[0] is True


@pytest.mark.parametrize("overrides, why", [({"render": {"backend": "nerfacc"}}, "nerfacc"), ({}, "need a CUDA device")])
def test_on_says_why_it_cannot_run(overrides, why):
    cfg = from_dict({**overrides, "train": {"cuda_graph": "on"}})
    device = CUDA if "render" in overrides else torch.device("cpu")
    with pytest.raises(ValueError, match=why):
        step_graph_choice(cfg, 1, device)


def test_plan_tensors_round_trip(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder)
    plan = trainer.plan()
    tensors = step_plan.plan_tensors(plan)
    copies = [t.clone() + 1 for t in tensors]
    again = step_plan.with_tensors(plan, copies)
    assert all(a is b for a, b in zip(step_plan.plan_tensors(again), copies))
    assert again.groups == plan.groups and again.phases == plan.phases and again.rays == plan.rays
    with pytest.raises(ValueError, match="plan tensors"):
        step_plan.with_tensors(plan, [*copies, copies[0]])


class _Breaks:
    """A capture that fails, as a CUDA capture of an operation a graph cannot hold does."""

    def __call__(self, fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_warm_up_then_capture_then_replay():
    calls = []

    def fn(xs):
        calls.append(xs[0])
        return [xs[0] * 2]

    graphs = StepGraphs(BufferReplay(), warmup=2)
    outs = [graphs.run("k", [torch.tensor([float(i)])], fn)[0].item() for i in range(5)]
    assert outs == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert graphs.seen == {"k": 2} and list(graphs.graphs) == ["k"] and graphs.replays == 3
    # every replay computes from the same static buffer, never from the caller's tensor
    assert all(c is calls[2] for c in calls[3:])


def test_a_failed_capture_runs_that_step_and_all_later_ones_eagerly(caplog):
    graphs = StepGraphs(_Breaks(), warmup=1)
    outs = [graphs.run(i % 2, [torch.tensor([float(i)])], lambda xs: [xs[0] + 1])[0].item() for i in range(4)]
    assert outs == [1.0, 2.0, 3.0, 4.0]
    assert graphs.failed == "operation not permitted when stream is capturing" and not graphs.graphs
    assert "could not be captured" in caplog.text


def test_keys_beyond_the_limit_run_eagerly():
    graphs = StepGraphs(BufferReplay(), warmup=1, max_graphs=1)
    for _ in range(3):
        for key in ("a", "b"):
            graphs.run(key, [torch.ones(1)], lambda xs: [xs[0]])
    assert list(graphs.graphs) == ["a"] and graphs.seen["b"] == 3


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.renderer.named_parameters()}


@pytest.mark.parametrize("field", [{}, {"coarse_to_fine": 0.5, "coarse_levels": 1, "blob_fade": 0.5}])
def test_replayed_steps_train_as_the_eager_steps_do(tmp_path, tiny_sd_paths, field):  # noqa: F811
    """Through the latent -> RGB switch, a slot emptied and refilled, and the level weights and
    blob share that change every step (buffers written outside the step): the replayed trainer
    reaches its eager twin's parameters, Adam state and metrics exactly."""
    eager = two_prompt_trainer(tmp_path / "eager", tiny_sd_paths.folder, step_graph=True, **field)
    eager.step_graphs = None  # the same trainer (torch sampler, device-side shading), stepped directly
    graphed = two_prompt_trainer(tmp_path / "graphed", tiny_sd_paths.folder, step_graph=True, **field)
    graphed.step_graphs = StepGraphs(BufferReplay(), warmup=1)
    for step in range(7):
        if step == 4:  # slot 0 has done its 4 iterations: empty it, then give it a new prompt
            for t in (eager, graphed):
                old = t.slots[0]
                t.release(0)
        if step == 5:
            for t in (eager, graphed):
                t.assign(0, dataclasses.replace(old.cfg, train=dataclasses.replace(old.cfg.train, seed=7)), _embedding(t, old))
        eager.train_step()
        graphed.train_step()
        torch.testing.assert_close(graphed.metrics, eager.metrics, rtol=0, atol=0)
    assert graphed.step_graphs.replays >= 3 and len(graphed.step_graphs.graphs) >= 2  # latent and RGB keys
    for name, p in _params(eager).items():
        torch.testing.assert_close(_params(graphed)[name], p, rtol=0, atol=0, msg=name)
    for a, b in zip(eager.optimizer.state_tensors(), graphed.optimizer.state_tensors()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert [s.step for s in graphed.slots] == [s.step for s in eager.slots]


def _embedding(trainer, slot):
    from dreamfusion_trt.guidance.text import PromptEmbeddings

    v = len(trainer.views)
    return PromptEmbeddings(cond=trainer.cond_table[:v].cpu(), uncond=trainer.uncond[0].cpu(), views=trainer.views,
                            prompt=slot.cfg.prompt.text, truncated=False)  # fmt: skip


def test_a_value_baked_into_the_capture_shows_against_the_eager_twin(tmp_path, tiny_sd_paths):  # noqa: F811
    """The twin test can fail: a step that takes a per-step value other than through the plan
    (here the timesteps, dropped from the buffers) computes with the capture's value."""
    eager = two_prompt_trainer(tmp_path / "eager", tiny_sd_paths.folder, step_graph=True)
    eager.step_graphs = None
    graphed = two_prompt_trainer(tmp_path / "graphed", tiny_sd_paths.folder, step_graph=True)
    graphed.step_graphs = StepGraphs(BufferReplay(), warmup=1)
    real = step_plan.plan_tensors

    def without_t(plan):  # the timesteps stay the captured plan's
        return [x for x in real(plan) if x is not plan.t]

    at = len(dataclasses.fields(CameraBatch)) + step_plan._PLAN_TENSORS.index("t")  # where plan_tensors puts t

    def with_captured_t(plan, xs, _real=step_plan.with_tensors):
        return _real(plan, [*xs[:at], plan.t, *xs[at:]])

    eager.phase_override = graphed.phase_override = "latent"  # one key: replays from the second step on
    diverged = False
    for _ in range(4):
        eager.train_step()
        step_plan.plan_tensors, step_plan.with_tensors = without_t, with_captured_t
        try:
            graphed.train_step()
        finally:
            step_plan.plan_tensors, step_plan.with_tensors = real, with_captured_t.__defaults__[0]
        diverged = diverged or not torch.equal(graphed.metrics[:, 5], eager.metrics[:, 5])  # t_mean
    assert diverged


def test_swapping_the_render_strategy_is_a_new_key(tmp_path, tiny_sd_paths):  # noqa: F811
    trainer = two_prompt_trainer(tmp_path, tiny_sd_paths.folder, step_graph=True)
    trainer.step_graphs = StepGraphs(BufferReplay(), warmup=1)
    trainer.phase_override = "latent"
    plan = trainer.plan()
    key = trainer._graph_key(plan, step_plan.plan_tensors(plan))
    inputs = trainer.guidance.inputs
    inputs["latent"] = type(inputs["latent"])(inputs["latent"].latent_map, inputs["latent"].render_size)
    assert trainer._graph_key(plan, step_plan.plan_tensors(plan)) != key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_steps_match_eager_steps_on_the_gpu(tmp_path, tiny_sd_paths):  # noqa: F811
    """The real capture: the tiny SD on the GPU with fp16 autocast, eager and graphed trainers
    from the same state for 8 steps across the phase switch. Replays run the kernels the eager
    step runs, so they agree to float rounding."""
    from dreamfusion_trt.train import frozen as frozen_mod

    device = CUDA
    data = {"prompt": {"text": "a cat"},
            "model": {"model": str(tiny_sd_paths.folder), "cache_dir": str(tmp_path / "cache"), "backend": "eager"},
            "field": {"num_levels": 4, "log2_hashmap_size": 12, "max_resolution": 64, "hidden_dim": 16},
            "render": {"num_samples": 12, "albedo_iters": 1}, "camera": {"render_size": 16},
            "train": {"latent_fraction": 0.5, "device": "cuda", "iters": 8, "rgb_encoder": "vae"}}  # fmt: skip
    cfg = from_dict(data)
    frozen, (emb,) = frozen_mod.load_frozen(cfg, device, [cfg.prompt], max_prompts=1)
    trainers = []
    for graph in (False, True):
        t = frozen_mod.new_trainer(frozen, cfg, 1, device, step_graph=True)
        if not graph:
            t.step_graphs = None
        t.assign(0, cfg, emb)
        trainers.append(t)
    eager, graphed = trainers
    for _ in range(8):
        eager.train_step()
        graphed.train_step()
    torch.cuda.synchronize()
    assert graphed.step_graphs.failed is None, graphed.step_graphs.failed
    assert graphed.step_graphs.replays >= 4
    for (name, a), (_, b) in zip(eager.renderer.named_parameters(), graphed.renderer.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(graphed.metrics, eager.metrics, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_a_graphed_generate_trains_and_renders_its_outputs_with_the_torch_sampler(tmp_path, tiny_sd_paths, monkeypatch, caplog):  # noqa: F811
    """`generate` with step graphs (forced on the CPU, replayed through `BufferReplay`): every
    output is written, from a scene that renders with the sampler the prompt trained with (a
    graphed run never needs nerfacc's kernels, whose first build takes minutes)."""
    import logging

    from dreamfusion_trt.train import driver as driver_mod
    from dreamfusion_trt.train import frozen as frozen_mod
    from dreamfusion_trt.train import step_graph as step_graph_mod
    from test_generate import _generate

    monkeypatch.setattr(frozen_mod, "step_graph_choice", lambda cfg, k, device: (True, "forced by the test"))
    monkeypatch.setattr(step_graph_mod, "CudaGraphCapture", BufferReplay)
    samplers = []
    real = driver_mod.write_outputs

    def recording(scene, *args, **kwargs):
        samplers.append(scene.sampler)
        return real(scene, *args, **kwargs)

    monkeypatch.setattr(driver_mod, "write_outputs", recording)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        assert _generate(tmp_path, tiny_sd_paths, out, "--iters", "6") == 0
    assert samplers == ["torch"]
    assert "captured step graph 2" in caplog.text and "could not be captured" not in caplog.text  # latent and RGB
    for name in ("checkpoint.safetensors", "turntable.mp4", "validation.png", "mesh.glb", "metrics.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
