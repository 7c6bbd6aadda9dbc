"""Rank/device from torchrun and Slurm environments, the gloo process group, rank-0 progress from
the shared queue, and the stop flag under real SIGTERM/SIGUSR1 sent to a subprocess."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dreamfusion_trt.train.distributed import (
    EXIT_REQUEUE,
    EXIT_TERMINATED,
    DistEnv,
    ProgressReporter,
    StopFlag,
    device_for,
    dist_env,
    format_summary,
    init_distributed,
    read_stop_request,
    request_stop,
    stop_file,
)
from dreamfusion_trt.train.queue import PromptQueue

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# environment


def test_torchrun_environment():
    env = dist_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}, "gpu7")
    assert env == DistEnv(5, 8, 1, 4, 1, "gpu7", "torchrun", "", 0)
    assert env.is_distributed and not env.is_main


def test_srun_torchrun_uses_torchruns_ranks_and_keeps_the_slurm_job():
    env = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                    "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                    "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2", "SLURMD_NODENAME": "n002"})  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.node_rank) == (3, 4, 1, 1)
    assert (env.launcher, env.host, env.job, env.restart) == ("torchrun", "n002", "4242", 2)


def test_srun_tasks_without_torchrun():
    env = dist_env({"SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16",
                    "SLURM_LOCALID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1",
                    "SLURM_JOB_ID": "7"}, "n1")  # fmt: skip
    assert env == DistEnv(6, 8, 2, 4, 1, "n1", "slurm", "7", 0)


def test_the_batch_script_itself_is_one_process():
    # sbatch's shell sees the allocation's task count, but it is not an srun step
    env = dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "99", "SLURM_ARRAY_TASK_ID": "3"}, "n1")
    assert (env.rank, env.world_size, env.launcher, env.job) == (0, 1, "single", "99")
    assert dist_env({}, "laptop") == DistEnv(host="laptop")


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "a", "WORLD_SIZE": "2"}, "RANK='a' is not a whole number"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be at least 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be at least 0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID='x' is not a whole number"),
    ({"SLURM_RESTART_COUNT": "two"}, "SLURM_RESTART_COUNT='two' is not a whole number"),
])  # fmt: skip
def test_malformed_environment_is_one_clear_error(environ, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dist_env(environ, "h")


def test_device_for_a_rank():
    env = DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert device_for(env, cuda_available=False) == torch.device("cpu")
    assert device_for(env, cuda_available=True, device_count=2) == torch.device("cuda:1")
    assert device_for(env, cuda_available=True, device_count=1) == torch.device("cuda:0")  # one GPU bound per task
    with pytest.raises(ValueError, match="local rank 3 has no GPU: 2 visible"):
        device_for(DistEnv(local_rank=3), cuda_available=True, device_count=2)


def test_one_rank_never_starts_a_process_group():
    assert init_distributed(DistEnv(), torch.device("cpu")) is False
    assert not torch.distributed.is_initialized()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GLOO = textwrap.dedent("""
    import torch, torch.distributed as dist
    from dreamfusion_trt.train.distributed import dist_env, device_for, init_distributed, destroy_distributed
    env = dist_env()
    device = device_for(env, cuda_available=False)
    assert init_distributed(env, device) and dist.get_backend() == "gloo"
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    print("SUM", env.rank, t.item())
    destroy_distributed()
""")


def test_two_ranks_join_a_gloo_group_on_the_cpu():
    port = _free_port()
    procs = []
    for rank in range(2):
        environ = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _GLOO], env=environ, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("SUM" in o and o.strip().endswith("3.0") for o in outs), outs  # 1 + 2 on both ranks


# ------------------------------------------------------------------------------------------
# progress


def test_rank_zero_reports_every_ranks_prompts(tmp_path):
    ids = [f"p-{i}" for i in range(6)]
    started = time.time() - 3600.0  # the job started an hour ago
    r0 = PromptQueue(tmp_path, ids, lease_s=600, rank=0, host="n0")
    r1 = PromptQueue(tmp_path, ids, lease_s=600, rank=1, host="n1")
    for q, n_done in ((r0, 2), (r1, 1)):
        for _ in range(n_done):
            assert q.finish(q.claim_next(), "done")
    assert r1.finish(r1.claim_next(), "failed", {"error": "nan"})
    r0.claim_next()
    r1.claim_next()  # each holds one; nothing waits
    assert r0.pending() == ["p-4", "p-5"]
    quiet = ProgressReporter(tmp_path, ids, DistEnv(rank=1, world_size=2), since=started)
    assert quiet.maybe_report(force=True) is None
    reporter = ProgressReporter(tmp_path, ids, DistEnv(rank=0, world_size=2), every_s=3600, since=started)
    p = reporter.maybe_report()
    assert (p.total, p.done, p.failed, p.running, p.waiting, p.stalled) == (6, 3, 1, 2, 0, 0)
    assert {r: (c.done, c.failed, c.running, c.host) for r, c in p.per_rank.items()} == {0: (2, 0, 1, "n0"), 1: (1, 1, 1, "n1")}
    assert p.prompts_per_hour == pytest.approx(3.0, rel=0.01)  # 3 done in (just over) one hour
    assert reporter.maybe_report() is None  # not due again for an hour
    summary = format_summary(p)
    assert "3/6 prompts done, 1 failed, 2 unfinished" in summary and "n1" in summary


# ------------------------------------------------------------------------------------------
# stopping


_LOOP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dreamfusion_trt.train.distributed import StopFlag
    out = Path(sys.argv[1])
    with StopFlag() as flag:
        print("ready", flush=True)
        steps = 0
        while not flag.requested:   # the training loop: one step, then a look at the flag
            time.sleep(0.01)
            steps += 1
        (out / "checkpoint").write_text(f"{steps} {flag.reason}")  # what the batch does on a stop
        sys.exit(flag.exit_code)
""")


def _start_loop(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("signals, code, reason", [
    ([signal.SIGTERM], EXIT_TERMINATED, "SIGTERM"),
    ([signal.SIGUSR1], EXIT_REQUEUE, "SIGUSR1"),
    ([signal.SIGUSR1, signal.SIGTERM], EXIT_REQUEUE, "SIGUSR1+SIGTERM"),  # Slurm's warning, then its time limit
])  # fmt: skip
def test_stop_signals_let_the_loop_checkpoint_and_exit_with_its_code(tmp_path, signals, code, reason):
    proc = _start_loop(tmp_path)
    for sig in signals:
        proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    assert (tmp_path / "checkpoint").read_text().endswith(reason)


def test_stop_request_file_reaches_the_ranks_of_its_job_only(tmp_path):
    assert EXIT_REQUEUE == 75 and EXIT_TERMINATED == 143
    path = request_stop(tmp_path, "requeue", job="42", restart=1)
    assert path == stop_file(tmp_path, "42") and path.parent.name == "queue"
    assert read_stop_request(tmp_path, "42", 1) == "requeue"
    assert read_stop_request(tmp_path, "42", 2) is None  # the requeued incarnation goes on
    assert read_stop_request(tmp_path, "43", 1) is None  # another job (array task) sharing the folder
    flag = StopFlag(tmp_path, job="42", restart=1, check_every_s=0.0)
    assert flag.requested and flag.exit_code == EXIT_REQUEUE and flag.reason == "stop request (requeue)"
    request_stop(tmp_path, "terminate")  # by hand, for every job
    late = StopFlag(tmp_path, job="43", restart=0, check_every_s=0.0)
    assert late.requested and late.exit_code == EXIT_TERMINATED
    assert StopFlag(tmp_path / "elsewhere").exit_code is None
    with pytest.raises(ValueError, match="unknown stop action 'pause'"):
        request_stop(tmp_path, "pause")
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        StopFlag().install(["SIGNOPE"])


def test_stop_flag_restores_previous_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopFlag() as flag:
        assert signal.getsignal(signal.SIGUSR1) == flag._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not flag.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.exit_code == EXIT_REQUEUE
    assert signal.getsignal(signal.SIGUSR1) == before
