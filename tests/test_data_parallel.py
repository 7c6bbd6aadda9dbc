"""`generate --data-parallel`: one prompt over several ranks (train/data_parallel.py).

In-process twins with two "ranks" as two threads over a real two-member collective (a barrier
and a shared buffer): the averaged gradient of a data-parallel step is the mean of what one
process computes for the same two rank-seeded draws, the ranks end the step with identical
parameters, the stop vote and the out-of-step check. Then two CPU ranks under torchrun (gloo):
SIGTERM stops both after the same step with one checkpoint written by rank 0, `--resume`
finishes the run, and rank 0 alone writes the folder. Then the refusals and the no-op.
"""

import csv
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_batch import FAST as BATCH_FAST
from test_batch import _one_thread  # noqa: F401  (autouse: one intra-op thread)
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt import cli
from dreamfusion_trt.checkpoint import load_checkpoint
from dreamfusion_trt.config import from_dict
from dreamfusion_trt.scene import build_scene
from dreamfusion_trt.sequence import sequence_offset, sequence_point
from dreamfusion_trt.train import frozen as frozen_mod
from dreamfusion_trt.train.data_parallel import DataParallel, broadcast_grid, join, view_seed
from dreamfusion_trt.train.distributed import DistEnv
from dreamfusion_trt.train.slots import fresh_slot_state

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red chair"




class ThreadPair:
    """A real collective between the threads of one process: each member hands in its tensor,
    all wait, each reads the result (the sum in rank order, the same on every member)."""

    def __init__(self, world_size: int = 2) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.inbox: list = [None] * world_size

    def member(self, rank: int) -> "PairMember":
        return PairMember(self, rank)


class PairMember:
    def __init__(self, pair: ThreadPair, rank: int) -> None:
        self.pair, self.rank, self.world_size = pair, rank, pair.world_size
        self.calls: list[str] = []

    def _exchange(self, tensor):
        self.pair.inbox[self.rank] = tensor.clone()
        self.pair.barrier.wait()
        values = list(self.pair.inbox)
        self.pair.barrier.wait()  # everyone has read before anyone hands in the next
        return values

    def all_reduce_sum(self, tensor):
        self.calls.append("all_reduce_sum")
        values = self._exchange(tensor)
        total = values[0].clone()
        for v in values[1:]:
            total += v
        tensor.copy_(total)

    def broadcast(self, tensor, src=0):
        self.calls.append("broadcast")
        tensor.copy_(self._exchange(tensor)[src])

    def vote_max(self, tensor):
        self.calls.append("vote_max")
        tensor.copy_(torch.stack(self._exchange(tensor)).amax(0))


def _run_ranks(fns):
    """Run fns[r]() in one thread per rank; re-raise the first error; return their results."""
    results, errors = [None] * len(fns), []

    def run(r):
        try:
            results[r] = fns[r]()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def _cfg(tiny, tmp_path, **train):
    return from_dict({
        "model": {"model": str(tiny.folder), "cache_dir": str(tmp_path / "cache")},
        "prompt": {"text": PROMPT},
        "field": {"num_levels": 4, "log2_hashmap_size": 12, "max_resolution": 64, "hidden_dim": 16},
        "render": {"num_samples": 12, "albedo_iters": 1, "backend": "torch"}, "camera": {"render_size": 16},
        "train": {"latent_fraction": 0.5, "device": "cpu", "iters": 4, "ckpt_every": 2, **train},
    })  # fmt: skip


@pytest.fixture(scope="module")
def frozen_side(tiny_sd_paths, tmp_path_factory):
    cfg = _cfg(tiny_sd_paths, tmp_path_factory.mktemp("dp"))
    frozen, (embedding,) = frozen_mod.load_frozen(cfg, torch.device("cpu"), [cfg.prompt], max_prompts=1)
    return cfg, frozen, embedding


def _trainer(frozen_side, step_sync=None):
    """An empty one-slot trainer (built in the test's thread: scene building draws from the
    global generator, which threads would share)."""
    cfg, frozen, _ = frozen_side
    trainer = frozen_mod.new_trainer(frozen, cfg, 1, torch.device("cpu"))
    trainer.step_sync = step_sync
    return trainer


def _assign(frozen_side, trainer, seed=0):
    """Fill the slot with the prompt, seeded `seed` (in a rank's thread: with `step_sync` this
    is a collective)."""
    cfg, _, embedding = frozen_side
    slot_cfg = from_dict({"train": {"seed": seed}}, cfg)
    trainer.assign(0, slot_cfg, embedding, init_state=fresh_slot_state(slot_cfg, seed))
    return trainer


def _ranks(frozen_side, seeds=(0, 0), **kwargs):
    pair = ThreadPair()
    trainers = [_trainer(frozen_side, DataParallel(pair.member(r), **kwargs)) for r in range(2)]
    states = [fresh_slot_state(from_dict({"train": {"seed": s}}, frozen_side[0]), s) for s in seeds]
    _run_ranks([lambda r=r: trainers[r].assign(0, from_dict({"train": {"seed": seeds[r]}}, frozen_side[0]), frozen_side[2],
                                                 init_state=states[r]) for r in range(2)])  # fmt: skip
    return trainers


def _params(trainer):
    return [p for g in trainer.optimizer.groups for p in g.params]


def test_a_data_parallel_step_averages_the_gradients_of_the_ranks_own_views(frozen_side, caplog):
    """Twin: two ranks (threads) take one data-parallel step; the gradient each steps on is the
    mean of the gradients one process computes for rank 0's draws (the prompt's own generators)
    and for rank 1's (seeded with view_seed(seed, 1, step, ...)); both ranks end the step with
    bit-identical parameters, Adam state and metrics, and a second step keeps them so."""
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        ranks = _ranks(frozen_side, check_every=2)
        _run_ranks([lambda t=t: t.train_step() for t in ranks])
    averaged = [[p.grad.clone() for p in _params(t)] for t in ranks]

    # One process, no collectives: the same two draws, one after the other, from the same start.
    alone = []
    for rank in range(2):
        twin = _assign(frozen_side, _trainer(frozen_side))
        if rank:
            slot = twin.slots[0]
            slot.cpu_gen.manual_seed(view_seed(0, rank, 0, 0))
            slot.dev_gen.manual_seed(view_seed(0, rank, 0, 1))
        twin.train_step()
        assert all(p.grad is not None for p in _params(twin))
        alone.append([p.grad.clone() for p in _params(twin)])
    for g0, g1, got0, got1 in zip(*alone, *averaged):
        assert not torch.allclose(g0, g1)  # the ranks did see different views
        mean = (g0.double() + g1.double()) / 2
        scale = float(mean.abs().max()) + 1e-12
        torch.testing.assert_close(got0.double(), mean, rtol=1e-4, atol=1e-5 * scale)
        assert torch.equal(got0, got1)
    for a, b in zip(_params(ranks[0]), _params(ranks[1])):
        assert torch.equal(a, b)
    assert torch.equal(ranks[0].metrics, ranks[1].metrics)

    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        _run_ranks([lambda t=t: t.train_step() for t in ranks])  # step 2: the check compares with rank 0's
    for a, b in zip(_params(ranks[0]), _params(ranks[1])):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0].optimizer.state_tensors(), ranks[1].optimizer.state_tensors()):
        assert torch.equal(a, b)
    assert caplog.text.count("the parameters of all 2 ranks are identical ('a red chair' at step 2)") == 2
    assert "differ" not in caplog.text
    assert ranks[0].step_sync.comm.calls == ranks[1].step_sync.comm.calls  # the same collectives in the same order


def test_ranks_that_start_apart_take_rank_0s_state(frozen_side, caplog):
    """A rank whose scene was built from another seed is told so and continues from rank 0's."""
    with caplog.at_level(logging.WARNING, logger="dreamfusion_trt"):
        ranks = _ranks(frozen_side, seeds=(0, 1))
    assert caplog.text.count("the ranks started 'a red chair' with different parameters") == 2
    for a, b in zip(ranks[0].renderer.state_dict().values(), ranks[1].renderer.state_dict().values()):
        assert torch.equal(a, b)


def test_the_ranks_share_one_low_discrepancy_sequence_out(frozen_side):
    """camera.sequence / sds.t_sequence stratified: rank r of 2 takes points 2 s + r of the
    prompt's one sequence, so the step's two views are neighbours in it, never the same point."""
    ranks = _ranks(frozen_side)
    offset = sequence_offset(0)
    for r, t in enumerate(ranks):
        slot = t.slots[0]
        assert (slot.sequence_stride, slot.sequence_phase) == (2, r)
        slot.step = 3
        assert slot.sequence_point() == sequence_point(6 + r, offset)


def test_the_occupancy_grid_is_rank_0s(tmp_path, tiny_sd_paths):
    cfg = _cfg(tiny_sd_paths, tmp_path)
    scenes = [build_scene(cfg, 1) for _ in range(2)]
    scenes[1].estimators[0].occs.uniform_()
    scenes[1].estimators[0].binaries.fill_(False)
    pair = ThreadPair()
    _run_ranks([lambda r=r: broadcast_grid(pair.member(r), scenes[r], 0) for r in range(2)])
    for a, b in zip(scenes[0].estimators[0].state_dict().values(), scenes[1].estimators[0].state_dict().values()):
        assert torch.equal(a, b)
    assert bool(scenes[1].estimators[0].binaries.all())


def _busy(step):
    return SimpleNamespace(slots=[SimpleNamespace(step=step)])


@pytest.mark.parametrize("signals, agreed", [
    ((None, None), None),
    ((None, signal.SIGTERM), signal.SIGTERM),
    ((signal.SIGTERM, signal.SIGUSR1), signal.SIGUSR1),  # requeue wins, as after SIGUSR1 then SIGTERM in one process
])  # fmt: skip
def test_every_rank_stops_after_the_same_step(signals, agreed):
    pair = ThreadPair()
    dps = [DataParallel(pair.member(r)) for r in range(2)]
    got = _run_ranks([lambda r=r: dps[r].agree_stop(signals[r], _busy(5)) for r in range(2)])
    assert got == [agreed, agreed]


def test_ranks_out_of_step_fail_instead_of_waiting_for_each_other():
    """Rank 0 dropped its job (a checkpoint it could not write, say) while rank 1 trains on:
    the next vote raises on both instead of a collective that never completes."""
    pair = ThreadPair()
    dps = [DataParallel(pair.member(r)) for r in range(2)]
    with pytest.raises(ValueError, match=r"data parallel: the ranks are out of step \(rank \d: between steps"):
        _run_ranks([lambda: dps[0].agree_stop(None, SimpleNamespace(slots=[None])), lambda: dps[1].agree_stop(None, _busy(3))])


def test_view_seeds_differ_by_rank_step_and_stream():
    seeds = {view_seed(0, r, s, k) for r in range(4) for s in range(100) for k in range(2)}
    assert len(seeds) == 800 and all(0 <= x < 2**63 for x in seeds)
    assert view_seed(7, 1, 3, 0) == view_seed(7, 1, 3, 0)


def test_one_process_is_a_no_op_and_a_device_for_every_rank_is_refused(tmp_path, tiny_sd_paths, caplog):
    cfg = _cfg(tiny_sd_paths, tmp_path, data_parallel=True)
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        assert join(cfg, DistEnv()) is None
    assert "--data-parallel: one process (world size 1, no torchrun): nothing to share, training as without it" in caplog.text
    two = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    with pytest.raises(ValueError, match="--device 'cuda:0' with --data-parallel under torchrun would put all 2 ranks on one device"):
        join(from_dict({"train": {"device": "cuda:0"}}, cfg), two)
    with pytest.raises(ValueError, match="needs at least 2 ranks, got a world size of 1"):
        DataParallel(ThreadPair(1).member(0))


def test_batch_refuses_data_parallel(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    assert cli.main(["batch", str(prompts), "--out", str(tmp_path / "b"), "--data-parallel", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "dreamfusion-trt: error: --data-parallel (train.data_parallel) trains one prompt over several GPUs: use it with generate" in err
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# torchrun, two CPU ranks

FAST = [a for a in BATCH_FAST if a != "--quiet"]  # the batch tests' tiny run, with its logs


def _torchrun(tiny, tmp_path, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
            "--tee", "3", "-m", "dreamfusion_trt.cli", "generate", "a red cube", "--model", str(tiny.folder), "--out", str(out),
            "--model.cache_dir", str(tmp_path / "cache"), "--data-parallel", *FAST, *extra]  # fmt: skip


def _environ():
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def _rank_lines(log, rank):
    """What rank `rank` printed: torchrun's --tee prefixes each of its writes with [default<rank>]:
    (or [rank<rank>]:), which can land mid-line after another rank's progress bar."""
    parts = re.split(r"\[(?:rank|default)(\d+)\]:", log)
    return "".join(text for who, text in zip(parts[1::2], parts[2::2]) if int(who) == rank)


@pytest.mark.slow
def test_torchrun_ranks_train_one_prompt_stop_together_and_resume(tmp_path, tiny_sd_paths):
    """Two CPU ranks train one prompt: SIGTERM to torchrun stops both after the same step, rank
    0 writes the one checkpoint (both exit 143); `--resume` on both continues from it to the
    end; the parameters of the ranks are identical at every check, and only rank 0 wrote the
    folder: checkpoint, metrics (one row per step, one history) and outputs."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(tiny_sd_paths, tmp_path, out, "--iters", "400", "--train.ckpt_every", "2"), cwd=REPO,
                            env=_environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, log[-4000:]
    for rank in (0, 1):
        assert "stopped by SIGTERM; checkpoints written" in _rank_lines(log, rank), log[-4000:]
    step = load_checkpoint(out).step
    assert 2 <= step < 400
    assert "1 checkpoint(s) written" in _rank_lines(log, 0) and "0 checkpoint(s) written" in _rank_lines(log, 1)
    assert "drawing its own views" in _rank_lines(log, 1)

    iters = step + 2
    result = subprocess.run(_torchrun(tiny_sd_paths, tmp_path, out, "--resume", "--iters", str(iters)), cwd=REPO, env=_environ(),
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    zero, one = _rank_lines(log, 0), _rank_lines(log, 1)
    for lines in (zero, one):
        assert f"'a red cube' resumes from its checkpoint at step {step}" in lines
        assert f"the parameters of all 2 ranks are identical ('a red cube' at step {iters})" in lines
        assert "with different parameters" not in lines and "differ by" not in lines
    assert f"done: 'a red cube' -> {out}" in zero and "mesh: " in zero
    assert "done: " not in one and "mesh: " not in one and "wrote " not in one
    assert "rank 1 is done; rank 0 writes the outputs" in one
    assert load_checkpoint(out).step == iters
    for name in ("checkpoint.safetensors", "checkpoint.json", "turntable.mp4", "validation.png", "mesh.glb", "metrics.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, iters + 1))
