"""`batch` over the shared queue: torchrun ranks and `--shard i/N` tasks train every prompt once,
into the same folders and manifest as one process, with the same parameters; a SIGKILLed
worker's prompts are taken over from its checkpoints after its lease; a stopped run releases
its prompts (exit 75 to requeue, 143 after SIGTERM) and a re-run finishes them."""

import csv
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from test_batch import FAST, _assert_same_checkpoint
from tiny_sd import tiny_sd_paths  # noqa: F401  (session fixture)

from dreamfusion_trt import cli
from dreamfusion_trt.checkpoint import load_checkpoint
from dreamfusion_trt.train import batch as batch_mod
from dreamfusion_trt.train import distributed as dist_mod
from dreamfusion_trt.train import queue as queue_mod
from dreamfusion_trt.train import trainer as trainer_mod
from dreamfusion_trt.train.distributed import EXIT_REQUEUE, EXIT_TERMINATED, request_stop
from dreamfusion_trt.train.manifest import Manifest, PromptRecord
from dreamfusion_trt.train.queue import queue_dir, read_states, shard_ids
from dreamfusion_trt.train.shared_jobs import merge_states

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red chair", "a blue dog", "a cat", "a photo of a hamburger"]
SAME = ("id", "prompt", "negative", "seed", "iters", "line", "status", "step", "outputs", "error")  # what a worker must not change


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread here and in every worker (OMP_NUM_THREADS=1): the same reduction
    order in every process, so a prompt trained anywhere gives the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _args(tiny, tmp_path, prompts, out, *extra, quiet=True):
    fast = FAST if quiet else [a for a in FAST if a != "--quiet"]  # INFO logs: what was done, by whom
    return ["batch", str(prompts), "--out", str(out), "--model", str(tiny.folder), "--model.cache_dir", str(tmp_path / "cache"),
            *fast, *extra]  # fmt: skip


def _environ():
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def _records(out):
    return {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _chain(out, pid):
    qdir = queue_dir(out)
    gens = sorted(int(p.name.rsplit(".", 1)[1]) for p in qdir.glob(f"{pid}.*"))
    return [json.loads((qdir / f"{pid}.{g}").read_text()) for g in gens]


def _wait_for(predicate, timeout_s, proc=None, what=""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_torchrun_ranks_train_every_prompt_once_like_one_process(tmp_path, tiny_sd_paths):
    """Two CPU ranks under torchrun share four prompts (one slot each): every prompt is done
    exactly once, by rank 0 or 1 on this host; the folders, manifest and checkpoints (weights,
    Adam state and random generators, bit for bit: batches of one on one thread) equal a
    single-process batch's."""
    prompts = _write(tmp_path / "prompts.txt", PROMPTS)
    out, alone = tmp_path / "ranks", tmp_path / "alone"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
           "-m", "dreamfusion_trt.cli", *_args(tiny_sd_paths, tmp_path, prompts, out, "--concurrency", "1", "--iters", "3",
                                                "--lease-s", "8", quiet=False)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=_environ(), capture_output=True, text=True, timeout=300, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    for text in PROMPTS:  # trained to the end and written once, by one rank
        assert len(re.findall(rf"done: {re.escape(repr(text))} ->", log)) == 1, (text, log[-4000:])
    assert "dropped here" not in log and "took over" not in log
    assert "batch summary:" in log and "4/4 prompts done" in log  # rank 0's summary of the whole job

    assert cli.main(_args(tiny_sd_paths, tmp_path, prompts, alone, "--concurrency", "1", "--iters", "3")) == 0
    ranks, single = _records(out), _records(alone)
    assert list(ranks) == list(single) and len(ranks) == 4  # same prompts, same folders, file order
    for pid, record in ranks.items():
        assert {k: record[k] for k in SAME} == {k: single[pid][k] for k in SAME}
        assert record["status"] == "done" and record["rank"] in (0, 1) and record["host"] == socket.gethostname()
        assert single[pid]["rank"] is None  # one process keeps today's manifest
        chain = _chain(out, pid)
        assert [c["kind"] for c in chain].count("done") == 1 and chain[-1]["kind"] == "done"
        assert {p.name for p in (out / pid).iterdir()} == {p.name for p in (alone / pid).iterdir()}
        _assert_same_checkpoint(load_checkpoint(alone / pid), load_checkpoint(out / pid))


@pytest.mark.slow
def test_shards_cover_the_file_exactly_once(tmp_path, tiny_sd_paths, caplog):
    """`--shard 0/2` then `--shard 1/2` (as two array tasks): each trains every other prompt of
    the file, the second finds the first's finished and trains only its own, and together they
    leave every prompt done once with its rank and host in one manifest."""
    prompts = _write(tmp_path / "prompts.txt", PROMPTS + ["a red chair"])  # a duplicate line counts once
    out = tmp_path / "shards"
    assert cli.main(_args(tiny_sd_paths, tmp_path, prompts, out, "--shard", "0/2", "--iters", "2")) == 0
    ids = list(_records(out))
    assert len(ids) == 4  # every prompt of the file has a record, whichever shard trains it
    first = set(shard_ids(ids, 0, 2))
    assert first == {ids[0], ids[2]}
    records = _records(out)
    for pid in ids:
        assert records[pid]["status"] == ("done" if pid in first else "pending"), pid
        assert (out / pid / "mesh.glb").is_file() == (pid in first)
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        assert cli.main(_args(tiny_sd_paths, tmp_path, prompts, out, "--shard", "1/2", "--iters", "2")) == 0
    assert "training 2 prompt(s)" in caplog.text
    records = _records(out)
    for pid in ids:
        assert records[pid]["status"] == "done" and records[pid]["step"] == 2
        assert records[pid]["rank"] == 0 and records[pid]["host"] == socket.gethostname()
        chain = _chain(out, pid)
        assert [c["kind"] for c in chain].count("done") == 1 and chain[-1]["kind"] == "done"
        assert (out / pid / "mesh.glb").is_file()
    mtimes = {pid: (out / pid / "checkpoint.safetensors").stat().st_mtime_ns for pid in ids}
    assert cli.main(_args(tiny_sd_paths, tmp_path, prompts, out, "--shard", "0/2", "--iters", "2")) == 0  # nothing left
    assert mtimes == {pid: (out / pid / "checkpoint.safetensors").stat().st_mtime_ns for pid in ids}


@pytest.mark.slow
def test_a_killed_worker_is_taken_over_from_its_checkpoints_after_its_lease(tmp_path, tiny_sd_paths, monkeypatch, caplog):
    """A worker is SIGKILLed while it trains two prompts (2 s leases, a checkpoint every 2
    steps). Another, which cannot tell that pid is gone (another machine as far as the queue
    knows), waits for the leases to run out, then resumes both from the dead worker's
    checkpoints: each ends done once, with one metrics history."""
    iters = 14
    prompts = _write(tmp_path / "prompts.txt", PROMPTS[:2])
    out = tmp_path / "batch"
    args = _args(tiny_sd_paths, tmp_path, prompts, out, "--shard", "0/1", "--lease-s", "2", "--concurrency", "2",
                 "--iters", str(iters), "--train.ckpt_every", "2")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "dreamfusion_trt.cli", *args], cwd=REPO, env=_environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        def both_checkpointed():
            steps = [batch_mod.checkpoint_step(p) for p in out.glob("a-*") if p.is_dir()]
            return len(steps) == 2 and min(steps) >= 4

        _wait_for(both_checkpointed, 240, proc, "both prompts had a checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    states = read_states(out, lease_s=2)
    assert {s.state for s in states.values()} <= {"held", "expired"} and len(states) == 2  # left behind: leases
    dead = {pid: batch_mod.checkpoint_step(out / pid) for pid in states}
    assert all(4 <= step < iters for step in dead.values()), dead

    monkeypatch.setattr(queue_mod, "machine_id", lambda: "another-machine")  # no dead-pid shortcut: the lease must run out
    start = time.time()
    with caplog.at_level(logging.INFO, logger="dreamfusion_trt"):
        assert cli.main(args) == 0
    for pid, step in dead.items():
        text = _records(out)[pid]["prompt"]
        assert f"took over prompt {text!r} from rank 0" in caplog.text
        assert f"{text!r} resumes from its checkpoint at step {step}" in caplog.text
        chain = _chain(out, pid)
        taken = next(c for c in chain if c["pid"] == os.getpid())
        assert taken["time"] > max(c["expires"] for c in chain if c["pid"] == proc.pid) + queue_mod.DEFAULT_SKEW_S
        assert [c["kind"] for c in chain].count("done") == 1 and chain[-1]["kind"] == "done"
        rows = list(csv.DictReader((out / pid / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows] == list(range(1, iters + 1))
        assert load_checkpoint(out / pid).step == iters
    assert time.time() - start > 2  # it did wait


@pytest.mark.slow
@pytest.mark.parametrize("how, code", [("SIGTERM", EXIT_TERMINATED), ("SIGUSR1", EXIT_REQUEUE), ("request", EXIT_REQUEUE)])
def test_a_stopped_worker_releases_its_prompts_and_a_rerun_finishes_them(tmp_path, tiny_sd_paths, monkeypatch, capsys, how, code):
    """SIGTERM (143), SIGUSR1 (75: requeue) or the stop-request file (75) after step 3: every
    prompt in flight is checkpointed and released as resumable, and the same command finishes
    the batch from those checkpoints."""
    prompts = _write(tmp_path / "prompts.txt", PROMPTS[:3])
    out = tmp_path / "batch"
    args = _args(tiny_sd_paths, tmp_path, prompts, out, "--shard", "0/1", "--concurrency", "2", "--iters", "6")
    monkeypatch.setattr(batch_mod, "StopFlag", partial(dist_mod.StopFlag, check_every_s=0.0))
    real_step = trainer_mod.Trainer.train_step

    def stop_at_3(self, *a, **kw):
        real_step(self, *a, **kw)
        if self.slots[0] is not None and self.slots[0].step == 3:
            if how == "request":
                request_stop(out, "requeue")
            else:
                os.kill(os.getpid(), getattr(signal, how))

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", stop_at_3)
    assert cli.main(args) == code
    assert "checkpoints written" in capsys.readouterr().err
    states = read_states(out)  # the prompts the queue has records of: the third never started
    assert sorted(s.state for s in states.values()) == ["released", "released"]
    for pid, s in states.items():
        if s.state == "released":
            assert s.record.info["step"] == 3 == load_checkpoint(out / pid).step
    records = _records(out)
    assert sorted(r["status"] for r in records.values()) == ["pending"] * 3
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)
    if how == "request":
        dist_mod.stop_file(out).unlink()  # a stop request stands until it is removed
    assert cli.main(args) == 0
    records = _records(out)
    assert all(r["status"] == "done" and r["step"] == 6 for r in records.values())
    for pid in records:
        rows = list(csv.DictReader((out / pid / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows] == list(range(1, 7))


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_then_a_rerun_finishes_everything(tmp_path, tiny_sd_paths):
    """SIGTERM to torchrun while both ranks train: torchrun passes it on, each rank checkpoints
    its prompt, releases it and exits 143; the manifest says where each stands; the same batch
    again finishes every prompt from those checkpoints, each done once."""
    iters = 100
    prompts = _write(tmp_path / "prompts.txt", PROMPTS[:3])
    out = tmp_path / "batch"
    args = _args(tiny_sd_paths, tmp_path, prompts, out, "--concurrency", "1", "--iters", str(iters), "--lease-s", "8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
           "-m", "dreamfusion_trt.cli", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=_environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def both_training():  # two prompts mid-way: a rank that started late cannot let the other finish one first
            rows = [len((p / "metrics.csv").read_text().splitlines()) - 1 for p in out.glob("a-*") if (p / "metrics.csv").is_file()]
            return len([n for n in rows if 2 <= n <= iters // 2]) >= 2

        _wait_for(both_training, 240, proc, "both ranks trained two steps")
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert log.count("stopped by SIGTERM; checkpoints written") == 2, log[-4000:]
    states = read_states(out, lease_s=8)
    assert sorted(s.state for s in states.values()) == ["released", "released"], log[-4000:]  # no lease left behind
    records = _records(out)
    for pid, s in states.items():
        step = load_checkpoint(out / pid).step
        assert 2 <= step < iters and s.record.info["step"] == step
        assert (records[pid]["status"], records[pid]["step"], records[pid]["rank"]) == ("pending", step, s.record.holder.rank)
    assert {s.record.holder.rank for s in states.values()} == {0, 1}

    assert cli.main(args) == 0  # one process, no queue this time: the rebuilt manifest says what is left
    records = _records(out)
    assert all(r["status"] == "done" and r["step"] == iters for r in records.values())
    for pid in records:
        rows = list(csv.DictReader((out / pid / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows] == list(range(1, iters + 1))  # one history: resumed, not restarted


def test_the_manifest_is_rebuilt_from_the_queue(tmp_path):
    """Queue records decide a prompt's status, rank and host; a prompt the queue never saw, or
    one finished since by a single-process run while the queue still holds an old lease, keeps
    its manifest record."""
    base = Manifest(tmp_path)
    for pid in ("p-a", "p-b", "p-c", "p-d"):
        base.add(PromptRecord(pid, pid, "", 0, 10))
    base.records["p-d"].status = "done"
    q = queue_mod.PromptQueue(tmp_path, ["p-a", "p-b", "p-c", "p-d"], lease_s=60, rank=3, host="n7")
    assert [q.claim_next() for _ in range(4)] == ["p-a", "p-b", "p-c", "p-d"]
    q.renew(info={"p-b": {"step": 4}}, force=True)
    assert q.finish("p-a", "done", {"outputs": {"checkpoint": "p-a/checkpoint.safetensors"}, "wall_s": 1.5, "step": 10})
    assert q.finish("p-c", "failed", {"error": "non-finite loss", "attempts": 1})
    merged = merge_states(base, read_states(tmp_path, list(base.records)))
    a, b, c, d = (merged.records[p] for p in ("p-a", "p-b", "p-c", "p-d"))
    assert (a.status, a.step, a.outputs, a.wall_s, a.rank, a.host) == ("done", 10, {"checkpoint": "p-a/checkpoint.safetensors"}, 1.5, 3, "n7")
    assert (b.status, b.step, b.rank) == ("running", 4, 3)
    assert (c.status, c.error, c.attempts) == ("failed", "non-finite loss", 1)
    assert (d.status, d.rank) == ("done", None)  # the old lease does not undo a later finish
    assert base.records["p-a"].status == "pending"  # the base is not changed
    q.release_all()
    assert merge_states(base, read_states(tmp_path, list(base.records))).records["p-b"].status == "pending"


def test_a_rebuild_that_read_the_queue_before_another_rank_released_does_not_have_the_last_word(tmp_path, monkeypatch):
    """Rank 1 reads the queue while rank 0 still holds its prompt; rank 0 then releases it and
    rebuilds; rank 1's stale write lands after. Rank 1's rebuild reads the queue again after its
    write, so the manifest ends with the release (CI once saw a SIGTERMed torchrun job leave a
    released prompt 'running' at step 0)."""
    from dreamfusion_trt.train import shared_jobs

    base = Manifest(tmp_path)
    for pid in ("p-a", "p-b"):
        base.add(PromptRecord(pid, pid, "", 0, 10))
    q0 = queue_mod.PromptQueue(tmp_path, ["p-a", "p-b"], lease_s=60, rank=0, host="n0")
    q1 = queue_mod.PromptQueue(tmp_path, ["p-a", "p-b"], lease_s=60, rank=1, host="n1")
    assert q0.claim_next() == "p-a" and q1.claim_next() == "p-b"
    q1.release_all({"p-b": {"step": 3}})
    real_read, raced = shared_jobs.read_states, []

    def read_then_rank0_releases(*a, **kw):
        states = real_read(*a, **kw)
        if not raced:  # between rank 1's read and its write: rank 0 releases and rebuilds
            raced.append(True)
            q0.release_all({"p-a": {"step": 6}})
            monkeypatch.setattr(shared_jobs, "read_states", real_read)
            shared_jobs.rebuild_manifest(base, 60)
            monkeypatch.setattr(shared_jobs, "read_states", read_then_rank0_releases)
        return states

    monkeypatch.setattr(shared_jobs, "read_states", read_then_rank0_releases)
    merged = shared_jobs.rebuild_manifest(base, 60)
    assert raced
    on_disk = _records(tmp_path)
    assert (on_disk["p-a"]["status"], on_disk["p-a"]["step"], on_disk["p-a"]["rank"]) == ("pending", 6, 0)
    assert (on_disk["p-b"]["status"], on_disk["p-b"]["step"], on_disk["p-b"]["rank"]) == ("pending", 3, 1)
    assert merged.records["p-a"].status == "pending"


def test_shard_and_lease_flags_are_checked(tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.txt", PROMPTS[:1])
    assert cli.main(["batch", str(prompts), "--out", str(tmp_path / "b"), "--shard", "2/2"]) == 2
    assert "--shard '2/2': the shard index i must be below N" in capsys.readouterr().err
    assert cli.main(["batch", str(prompts), "--out", str(tmp_path / "b"), "--lease-s", "0"]) == 2
    assert "--lease-s must be a positive number of seconds, got 0.0" in capsys.readouterr().err


def test_shared_jobs_lock_folders_and_hand_back_what_they_cannot_train(tmp_path):
    """A claimed prompt whose folder a live process here still locks goes back to the queue
    (not failed) and is skipped for a while; a lost lease takes the folder lock with it; the
    end releases what is left and rebuilds the manifest from the queue."""
    from dreamfusion_trt.config import RunConfig
    from dreamfusion_trt.lock import LOCK_NAME, RunLock
    from dreamfusion_trt.train.jobs import Job
    from dreamfusion_trt.train.shared_jobs import SharedJobs

    ids = ["p-a", "p-b", "p-c"]
    jobs = [Job(pid, RunConfig(), tmp_path / pid, line=i + 1) for i, pid in enumerate(ids)]
    base = Manifest(tmp_path)
    for pid in ids:
        base.add(PromptRecord(pid, pid, "", 0, 10))
    q = queue_mod.PromptQueue(tmp_path, ids, lease_s=60, rank=1, host="n1")
    source = SharedJobs(jobs, q, base)
    other = RunLock(tmp_path / "p-a", what="batch").acquire()  # as a process whose lease ran out under it
    b = source.take()
    assert b.id == "p-b" and b.lock is not None and (tmp_path / "p-b" / LOCK_NAME).is_file()
    assert read_states(tmp_path, ids)["p-a"].state == "released"
    c = source.take()
    assert c.id == "p-c" and source.take() is None and source.exhausted()  # p-a is skipped for now
    thief = queue_mod.PromptQueue(tmp_path, ids, lease_s=60, rank=2, host="n2", clock=lambda: time.time() + 120)
    assert thief.claim("p-b")  # b's lease looks expired to it
    q.renew_every_s = 0  # renew at this heartbeat
    assert source.heartbeat([b, c]) == [b]
    assert b.lock is None and c.lock is not None
    source.record(c, status="done", step=10, outputs={"checkpoint": "p-c/checkpoint.safetensors"}, wall_s=2.0)
    other.release()
    source._locked_out.clear()  # as after renew_every_s
    source._none_until = float("-inf")
    a = source.take()
    assert a.id == "p-a" and a.lock is not None
    source.close()
    assert a.lock is None and q.held == []
    states = read_states(tmp_path, ids)
    assert (states["p-a"].state, states["p-b"].state, states["p-c"].state) == ("released", "held", "done")
    records = Manifest.load(tmp_path).records
    assert [records[p].status for p in ids] == ["pending", "running", "done"]
    assert (records["p-b"].rank, records["p-b"].host, records["p-c"].rank) == (2, "n2", 1)
