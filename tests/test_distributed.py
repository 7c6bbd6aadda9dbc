"""Rank/device from torchrun and Slurm environments, the gloo process group, rank-0 progress from
the shared queue, and the stop flag under real SIGTERM/SIGUSR1 sent to a subprocess."""

import json
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


# ------------------------------------------------------------------------------------------
# the sbatch scripts: syntax, and their signal/requeue logic run with stand-ins for Slurm

SLURM = REPO / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))

_FAKE_BATCH = """#!{python}
# stands in for torchrun / dreamfusion-trt: a rank that polls the real StopFlag
import json, os, sys, time
sys.path.insert(0, {repo!r})
from dreamfusion_trt.train.distributed import StopFlag
args = sys.argv[1:]
out = args[args.index("--out") + 1]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\\n")
if os.environ.get("FAKE_MODE") == "finish":
    sys.exit(0)
with StopFlag(out, job=os.environ.get("SLURM_JOB_ID", ""), restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
              check_every_s=0.05) as flag:
    with open(os.environ["FAKE_READY"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.environ["FAKE_READY"] + ".tmp", os.environ["FAKE_READY"])
    while not flag.requested:
        time.sleep(0.02)
    sys.exit(flag.exit_code)
"""
_FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo "${3%%,*}"; exit 0; fi
echo "$@" >> "$FAKE_SCONTROL_LOG"
"""
_FAKE_SRUN = """#!/bin/bash
while [ "${1#--}" != "$1" ]; do shift; done  # drop srun's own options
exec "$@"
"""


def test_sbatch_scripts_parse():
    assert {p.name for p in SCRIPTS} == {"one_node.sbatch", "multi_node.sbatch", "array.sbatch"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, (script.name, result.stderr)
    assert "--rdzv-backend c10d" in (SLURM / "multi_node.sbatch").read_text()
    assert '--shard "$SHARD"' in (SLURM / "array.sbatch").read_text()


def _fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("torchrun", _FAKE_BATCH), ("dreamfusion-trt", _FAKE_BATCH), ("scontrol", _FAKE_SCONTROL),
                       ("srun", _FAKE_SRUN)):  # fmt: skip
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable, repo=str(REPO)) if "{python}" in text else text)
        path.chmod(0o755)
    return bin_dir


def _run_script(tmp_path, script, send=(), mode="loop", restart=0, term_batch=False):
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    environ = dict(os.environ, PATH=f"{_fake_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}", OUT=str(out), GPUS="2",
                   PROMPTS="prompts.txt", SLURM_JOB_ID="77", SLURM_RESTART_COUNT=str(restart), SLURM_JOB_NUM_NODES="2",
                   SLURM_JOB_NODELIST="n1,n2", SLURM_ARRAY_JOB_ID="70", SLURM_ARRAY_TASK_ID="9",
                   SLURM_ARRAY_TASK_MIN="7", SLURM_ARRAY_TASK_COUNT="4", FAKE_MODE=mode, FAKE_READY=str(ready),
                   FAKE_LOG=str(tmp_path / "calls"), FAKE_SCONTROL_LOG=str(tmp_path / "scontrol"))  # fmt: skip
    proc = subprocess.Popen(["bash", str(SLURM / script)], env=environ, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    if send:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        for sig in send:
            proc.send_signal(sig)  # to the batch shell only, as --signal=B:USR1 does
        if term_batch:
            os.kill(int(ready.read_text()), signal.SIGTERM)
    output = proc.communicate(timeout=30)[0]
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    requeues = (tmp_path / "scontrol").read_text().splitlines() if (tmp_path / "scontrol").exists() else []
    return proc.returncode, calls, requeues, output


@pytest.mark.parametrize("script", ["one_node.sbatch", "multi_node.sbatch"])
def test_usr1_reaches_torchrun_ranks_through_the_stop_file_and_requeues(tmp_path, script):
    rc, calls, requeues, output = _run_script(tmp_path, script, send=[signal.SIGUSR1])
    assert rc == 0, output
    assert requeues == ["requeue 77"], output
    (prog, *args), = calls
    assert prog == "torchrun" and args[args.index("--nproc-per-node") + 1] == "2"
    assert args[args.index("-m") + 1:args.index("-m") + 3] == ["dreamfusion_trt.cli", "batch"]
    assert "--lease-s" in args
    if script == "multi_node.sbatch":
        assert args[args.index("--rdzv-endpoint") + 1] == "n1:29500" and args[args.index("--rdzv-id") + 1] == "77"


def test_array_task_gets_its_shard_and_is_requeued_on_usr1(tmp_path):
    rc, calls, requeues, output = _run_script(tmp_path, "array.sbatch", send=[signal.SIGUSR1])
    assert rc == 0 and requeues == ["requeue 70_9"], output
    (prog, *args), = calls
    assert prog == "dreamfusion-trt" and args[args.index("--shard") + 1] == "2/4"  # task 9 of 7..10


def test_sigterm_stops_without_requeue(tmp_path):
    # one_node: Slurm's SIGTERM reaches the shell, which passes "terminate" on through the stop file
    rc, _, requeues, output = _run_script(tmp_path, "one_node.sbatch", send=[signal.SIGTERM])
    assert (rc, requeues) == (EXIT_TERMINATED, []), output


def test_sigterm_to_an_array_task_and_its_batch_is_not_requeued(tmp_path):
    # Slurm signals every process of the job: the shell and the batch both get SIGTERM
    rc, _, requeues, output = _run_script(tmp_path, "array.sbatch", send=[signal.SIGTERM], term_batch=True)
    assert (rc, requeues) == (EXIT_TERMINATED, []), output


def test_finished_batch_exits_0_and_restarts_are_capped(tmp_path):
    (tmp_path / "a").mkdir()
    rc, _, requeues, output = _run_script(tmp_path / "a", "one_node.sbatch", mode="finish")
    assert (rc, requeues) == (0, []), output
    (tmp_path / "b").mkdir()
    rc, _, requeues, output = _run_script(tmp_path / "b", "one_node.sbatch", send=[signal.SIGUSR1], restart=10)
    assert (rc, requeues) == (EXIT_REQUEUE, []) and "not requeueing: 10 restarts" in output, output
