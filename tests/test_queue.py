"""The shared prompt queue: atomic claims under a race of processes, leases that expire and are
taken over after a SIGKILL, done prompts that stay done, shards that cover a list exactly once.

Processes are forked (the queue imports no torch), leases are 1-2 s, and no assertion depends
on how fast the machine is: takeover times are checked against the expiry the dead holder
itself recorded, not against a stopwatch.
"""

import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from dreamfusion_trt.train.queue import (
    PromptQueue,
    parse_shard,
    queue_dir,
    read_states,
    shard_ids,
)

IDS = [f"prompt-{i:02d}" for i in range(30)]
_fork = mp.get_context("fork")


def _chain(out, pid):
    """The kinds of a prompt's records, in gen order."""
    qdir = queue_dir(out)
    gens = sorted(int(n.rsplit(".", 1)[1]) for n in os.listdir(qdir) if n.startswith(pid + "."))
    assert gens == list(range(len(gens))), f"gens of {pid} have holes: {gens}"
    return [json.loads((qdir / f"{pid}.{g}").read_text())["kind"] for g in gens]


# ------------------------------------------------------------------------------------------
# racing claims


def _race_worker(out, rank, barrier, results):
    q = PromptQueue(out, IDS, lease_s=30, rank=rank, skew_s=0)
    barrier.wait()
    mine = []
    while (pid := q.claim_next()) is not None:  # claim everything this process can get...
        mine.append(pid)
    for pid in mine:  # ...then finish it
        assert q.finish(pid, "done", {"rank": rank})
    results.put((rank, mine))


def test_three_processes_claim_thirty_ids_exactly_once(tmp_path):
    barrier, results = _fork.Barrier(3), _fork.Queue()
    procs = [_fork.Process(target=_race_worker, args=(tmp_path, r, barrier, results)) for r in range(3)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    claimed = [pid for ids in got.values() for pid in ids]
    assert sorted(claimed) == sorted(IDS)  # every id once: none twice, none missing
    for pid in IDS:
        assert _chain(tmp_path, pid) == ["lease", "done"]
    assert PromptQueue(tmp_path, IDS, rank=9).pending() == []
    states = read_states(tmp_path, IDS)
    by_rank = {r: sorted(p for p, s in states.items() if s.record.holder.rank == r) for r in range(3)}
    assert by_rank == {r: sorted(ids) for r, ids in got.items()}


# ------------------------------------------------------------------------------------------
# a holder killed with SIGKILL


def _holder(out, ids, host, lease_s, ready, renew):
    q = PromptQueue(out, ids, lease_s=lease_s, rank=1, host=host, skew_s=0, renew_every_s=0.1)
    for _ in range(5):
        assert q.claim_next() is not None
    ready.set()
    while True:  # a live rank renews from its training loop
        if renew:
            assert q.renew() == []
        time.sleep(0.05)


def test_killed_holder_is_taken_over_after_its_lease_expires(tmp_path):
    ids = IDS[:10]
    ready = _fork.Event()
    # another host name: the dead-pid shortcut cannot apply, only the lease's expiry
    proc = _fork.Process(target=_holder, args=(tmp_path, ids, "node-a", 2.0, ready, True), daemon=True)
    proc.start()
    assert ready.wait(30)
    taker = PromptQueue(tmp_path, ids, lease_s=2.0, rank=2, host="node-b", skew_s=0)
    mine = []
    deadline = time.monotonic() + 3.0  # longer than a lease, while the holder renews
    while time.monotonic() < deadline:
        pid = taker.claim_next()
        if pid is not None:
            mine.append(pid)
        time.sleep(0.05)
    assert sorted(mine) == ids[5:]  # only the five nobody held: a renewed lease is not taken
    held = {pid: s.record for pid, s in read_states(tmp_path, ids).items() if s.record.holder.host == "node-a"}
    assert sorted(held) == ids[:5]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    killed_at = time.time()
    taken = []
    while (pid := taker.wait_claim(poll_s=0.1)) is not None:
        taken.append(pid)
        last = read_states(tmp_path, [pid])[pid].record  # the taker's own new lease
        previous = taker.previous_holder(pid)
        assert previous.kind == "lease" and previous.holder.host == "node-a"
        assert last.time > previous.expires  # not before the dead rank's lease ran out
        assert last.time >= killed_at
    assert sorted(taken) == ids[:5]
    for pid in taken:
        assert taker.finish(pid, "done")
        assert _chain(tmp_path, pid) == ["lease", "lease", "done"]
    for pid in mine:
        assert taker.finish(pid, "done")
    assert taker.pending() == []


def test_killed_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    ids = IDS[:5]
    ready = _fork.Event()
    proc = _fork.Process(target=_holder, args=(tmp_path, ids, None, 600.0, ready, False), daemon=True)
    proc.start()
    assert ready.wait(30)
    taker = PromptQueue(tmp_path, ids, lease_s=600.0, rank=2, skew_s=0)
    assert taker.claim_next() is None  # a live holder on this host keeps its prompts
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    # same host, boot and pid namespace, pid gone: no need to wait ten minutes
    taken = [taker.claim_next() for _ in ids]
    assert sorted(taken) == ids
    assert all(taker.previous_holder(p).holder.pid == proc.pid for p in taken)


# ------------------------------------------------------------------------------------------
# done stays done; lost leases; releases


class _Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def test_a_done_prompt_is_never_claimed_again(tmp_path):
    clock = _Clock()
    q = PromptQueue(tmp_path, IDS[:3], lease_s=1.0, skew_s=0, clock=clock)
    assert q.claim_next() == IDS[0]
    assert q.finish(IDS[0], "done", {"step": 100})
    clock.now += 1e6  # every lease long expired
    other = PromptQueue(tmp_path, IDS[:3], lease_s=1.0, rank=1, skew_s=0, retry_failed=True, clock=clock)
    assert [other.claim_next(), other.claim_next(), other.claim_next()] == [IDS[1], IDS[2], None]
    assert not other.claim(IDS[0])
    # a rank whose (stale, cached) listing still shows only the first lease, long expired,
    # tries to create the next record: the done record is that record, so it fails
    assert not other._try_claim(IDS[0], 0)
    assert _chain(tmp_path, IDS[0]) == ["lease", "done"]
    assert read_states(tmp_path, [IDS[0]])[IDS[0]].record.info == {"step": 100}


def test_lost_lease_is_reported_and_cannot_be_finished(tmp_path):
    clock = _Clock()
    a = PromptQueue(tmp_path, ["p-1"], lease_s=2.0, rank=0, host="a", skew_s=0, clock=clock)
    b = PromptQueue(tmp_path, ["p-1"], lease_s=2.0, rank=1, host="b", skew_s=0, clock=clock)
    assert a.claim_next() == "p-1"
    clock.now += 1.0
    assert a.renew(force=True) == [] and b.claim_next() is None  # renewed in time: still a's
    clock.now += 2.5  # a paused past its expiry, b takes over
    assert b.claim_next() == "p-1"
    assert a.holds("p-1") is False and b.holds("p-1") is True
    assert not a.finish("p-1", "done")  # the late holder cannot mark it done
    assert a.renew(force=True) == []  # nothing held any more
    assert b.finish("p-1", "done")
    assert _chain(tmp_path, "p-1") == ["lease", "lease", "done"]


def test_renew_reports_a_lease_taken_while_running(tmp_path):
    clock = _Clock()
    a = PromptQueue(tmp_path, ["p-1"], lease_s=2.0, host="a", skew_s=0, clock=clock)
    b = PromptQueue(tmp_path, ["p-1"], lease_s=2.0, rank=1, host="b", skew_s=0, clock=clock)
    a.claim_next()
    clock.now += 3.0
    assert b.claim_next() == "p-1"
    assert a.renew(force=True) == ["p-1"] and a.held == []
    with pytest.raises(ValueError, match="not held by rank 0"):
        a.finish("p-1", "done")


def test_a_holder_late_to_renew_retakes_its_lease_if_nobody_did(tmp_path):
    clock = _Clock()
    a = PromptQueue(tmp_path, ["p-1"], lease_s=2.0, skew_s=0, clock=clock)
    a.claim_next()
    clock.now += 10.0
    assert a.renew(force=True) == [] and a.holds("p-1")
    assert _chain(tmp_path, "p-1") == ["lease", "lease"]
    assert a.finish("p-1", "done")


def test_renew_is_cheap_between_intervals_and_stores_progress(tmp_path):
    clock = _Clock()
    a = PromptQueue(tmp_path, ["p-1"], lease_s=2.0, skew_s=0, renew_every_s=3600, clock=clock)
    a.claim_next()
    before = (queue_dir(tmp_path) / "p-1.0").read_text()
    assert a.renew(info={"p-1": {"step": 7}}) == []
    assert (queue_dir(tmp_path) / "p-1.0").read_text() == before  # not due: nothing written
    a.renew(force=True)
    record = read_states(tmp_path, ["p-1"])["p-1"].record
    assert record.info == {"step": 7} and record.expires == clock.now + 2.0


def test_released_prompts_resume_at_once_and_failures_are_final(tmp_path):
    clock = _Clock()
    a = PromptQueue(tmp_path, ["p-1", "p-2"], lease_s=600, skew_s=0, clock=clock)
    assert a.claim_next() == "p-1" and a.claim_next() == "p-2"
    assert a.release_all() == ["p-1", "p-2"]  # a stop signal: checkpoints written, leases given up
    b = PromptQueue(tmp_path, ["p-1", "p-2"], lease_s=600, rank=1, skew_s=0, clock=clock)
    assert b.claim_next() == "p-1" and b.previous_holder("p-1").kind == "released"
    assert b.claim_next() == "p-2"
    assert b.finish("p-1", "failed", {"error": "non-finite loss"})
    assert b.finish("p-2", "done")
    clock.now += 1e6
    assert PromptQueue(tmp_path, ["p-1", "p-2"], rank=2, clock=clock).claim_next() is None
    assert PromptQueue(tmp_path, ["p-1", "p-2"], rank=2, clock=clock).pending() == []
    # --retry-failed: failures recorded before this queue was opened are claimable again, once
    clock.now += 1.0
    retry = PromptQueue(tmp_path, ["p-1", "p-2"], rank=3, retry_failed=True, clock=clock)
    late = PromptQueue(tmp_path, ["p-1", "p-2"], rank=4, retry_failed=True, clock=clock)
    assert retry.pending() == ["p-1"] and retry.claim_next() == "p-1"
    clock.now += 1.0
    assert retry.finish("p-1", "failed", {"error": "again"})
    assert late.claim_next() is None  # failed in this run: not retried twice
    assert _chain(tmp_path, "p-1") == ["lease", "released", "lease", "failed", "lease", "failed"]


def test_wait_claim_returns_none_when_only_own_prompts_are_left(tmp_path):
    q = PromptQueue(tmp_path, ["p-1"], lease_s=600, skew_s=0)
    assert q.wait_claim(poll_s=0.01) == "p-1"
    slept = []
    assert q.wait_claim(poll_s=0.01, sleep=slept.append) is None and slept == []
    other = PromptQueue(tmp_path, ["p-1"], lease_s=600, rank=1, host="elsewhere", skew_s=0)
    calls = iter([False, False, True])
    assert other.wait_claim(poll_s=0.01, should_stop=lambda: next(calls), sleep=slept.append) is None
    assert slept == [0.01, 0.01]  # waited (its holder may die) until told to stop


def test_bad_ids_and_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'a/b' cannot name a queue record"):
        PromptQueue(tmp_path, ["a/b"])
    with pytest.raises(ValueError, match="--lease-s must be positive, got 0"):
        PromptQueue(tmp_path, ["p-1"], lease_s=0)
    q = PromptQueue(tmp_path, ["p-1"])
    with pytest.raises(ValueError, match="unknown finish status 'finished'"):
        q.finish("p-1", "finished")
    with pytest.raises(ValueError, match="'p-9' is not in this queue"):
        q.claim("p-9")


# ------------------------------------------------------------------------------------------
# shards


@pytest.mark.parametrize("n", [1, 2, 3, 7, 30, 31])
def test_shards_cover_the_list_exactly_once(n):
    shards = [shard_ids(IDS, i, n) for i in range(n)]
    assert sorted(p for s in shards for p in s) == sorted(IDS)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert shard_ids(IDS, n - 1, n) == shard_ids(list(IDS), n - 1, n)  # deterministic
    for s in shards:
        assert s == [p for p in IDS if p in s]  # file order kept


def test_parse_shard():
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard(" 3 / 4 ") == (3, 4)
    with pytest.raises(ValueError, match=r"shard index i must be below N \(0 <= i < 2\)"):
        parse_shard("3/2")
    with pytest.raises(ValueError, match=r"--shard must look like i/N with whole numbers \(e.g. 0/4\), got 'a/b'"):
        parse_shard("a/b")
    for bad in ("-1/2", "1", "1/2/3", ""):
        with pytest.raises(ValueError, match="--shard must look like i/N"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="N must be at least 1"):
        parse_shard("0/0")
    with pytest.raises(ValueError, match="2/2 is not a shard"):
        shard_ids(IDS, 2, 2)


# ------------------------------------------------------------------------------------------
# the pattern the batch driver follows, end to end: K slots per rank, renew every step,
# checkpoints in each prompt's folder, one rank SIGKILLed mid-run


def _train_worker(out, ids, rank, iters, step_s, go, results):
    q = PromptQueue(out, ids, lease_s=1.0, rank=rank, host=f"node-{rank}", skew_s=0, renew_every_s=0.1)
    slots = {}  # id -> [step, start step]

    def start(pid):
        ckpt = out / pid / "ckpt.json"
        step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
        slots[pid] = [step, step]

    def save(pid):
        (out / pid).mkdir(exist_ok=True)
        tmp = out / pid / f".ckpt.{rank}"
        tmp.write_text(json.dumps({"step": slots[pid][0], "rank": rank}))
        os.replace(tmp, out / pid / "ckpt.json")

    go.wait()
    finished = []
    while True:
        while len(slots) < 2 and (pid := q.claim_next()) is not None:
            start(pid)
        if not slots:
            if (pid := q.wait_claim(poll_s=0.05)) is None:
                break
            start(pid)
        time.sleep(step_s)  # one training step of every slot
        for s in slots.values():
            s[0] += 1
        for pid in q.renew(info={p: {"step": s[0]} for p, s in slots.items()}):
            del slots[pid]  # taken over: drop it, write nothing
        for pid, (step, begun) in list(slots.items()):
            if step % 5 == 0 or step >= iters:
                save(pid)
            if step >= iters:
                if q.holds(pid) and q.finish(pid, "done", {"start": begun, "rank": rank}):
                    finished.append(pid)  # (a rank starved of CPU past its lease loses the prompt instead)
                del slots[pid]
    results.put((rank, finished))


def test_a_killed_rank_costs_nothing_but_time(tmp_path):
    ids = [f"p-{i:02d}" for i in range(12)]
    go, results = _fork.Event(), _fork.Queue()
    step_s = {0: 0.01, 1: 0.05, 2: 0.01}  # rank 1 is slow: it is still holding prompts when killed
    procs = {r: _fork.Process(target=_train_worker, args=(tmp_path, ids, r, 20, step_s[r], go, results), daemon=True)
             for r in range(3)}  # fmt: skip
    for p in procs.values():
        p.start()
    go.set()
    deadline = time.monotonic() + 60
    while True:  # until rank 1 holds a prompt it has checkpointed past step 0
        states = read_states(tmp_path, ids)
        victims = {pid: s for pid, s in states.items() if s.state == "held" and s.record.holder.rank == 1}
        steps = {pid: json.loads((tmp_path / pid / "ckpt.json").read_text())["step"]
                 for pid in victims if (tmp_path / pid / "ckpt.json").exists()}  # fmt: skip
        if any(v >= 5 for v in steps.values()):
            break
        assert time.monotonic() < deadline, "rank 1 never checkpointed"
        time.sleep(0.005)
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join(10)
    # what rank 1 left behind: its leases and its last checkpoints
    left = {pid: s.gen for pid, s in read_states(tmp_path, ids).items() if s.state in ("held", "expired") and s.record.holder.rank == 1}
    at_death = {pid: json.loads((tmp_path / pid / "ckpt.json").read_text())["step"] if (tmp_path / pid / "ckpt.json").exists() else 0
                for pid in left}  # fmt: skip
    assert any(step >= 5 for step in at_death.values())
    got = dict(results.get(timeout=60) for _ in (0, 2))
    for r in (0, 2):
        procs[r].join(10)
        assert procs[r].exitcode == 0
    finished = got[0] + got[2]
    finished_by_1 = [pid for pid, s in read_states(tmp_path, ids).items() if s.record.holder.rank == 1]
    assert sorted(finished + finished_by_1) == ids  # every prompt finished, none twice
    final = read_states(tmp_path, ids)
    assert all(s.state == "done" for s in final.values())
    for pid, step in at_death.items():  # the survivors resumed rank 1's prompts from its checkpoints
        assert final[pid].record.holder.rank in (0, 2)
        assert final[pid].record.info["start"] >= step  # == unless a starved survivor lost it to the other
        rest = _chain(tmp_path, pid)[left[pid]:]
        assert rest[0] == "lease" and rest[-1] == "done" and set(rest[1:-1]) == {"lease"}


@pytest.mark.slow
def test_torchrun_ranks_share_the_queue_and_recover_from_a_sigkill(tmp_path):
    """Three torchrun ranks (CPU); rank 1 SIGKILLs itself mid-prompt. torchrun stops the other
    two (they checkpoint and release on its SIGTERM) and restarts the group once; every prompt
    ends done exactly once and the interrupted ones resume from their checkpoints."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "--max-restarts", "1",
           str(repo / "examples" / "slurm" / "smoke_queue.py"), "--out", str(out), "--prompts", "6", "--steps", "30",
           "--kill-rank", "1"]  # fmt: skip
    environ = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, cwd=repo, env=environ, capture_output=True, text=True, timeout=240, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    report = json.loads((out / "smoke.json").read_text())
    assert report["all_done_once"] and report["world_size"] == 3 and report["launcher"] == "torchrun"
    assert report["resumed"], log[-3000:]  # something was interrupted and picked up from its step
    for pid, start in report["resumed"].items():
        # 30: stopped (torchrun's SIGTERM) after its last step, before its done record; resumed at its end
        assert 0 < start <= 30 and _chain(tmp_path / "smoke", pid)[-1] == "done"
    qdir = queue_dir(out)
    taken = []  # (gen, rank) of leases that ended without a record by their holder: the SIGKILL
    for pid in report["resumed"]:
        chain = [json.loads((qdir / f"{pid}.{g}").read_text()) for g in range(len(_chain(out, pid)))]
        taken += [(a["gen"], a["rank"]) for a, b in zip(chain, chain[1:]) if a["kind"] == b["kind"] == "lease" and a["token"] != b["token"]]
    assert any(rank == 1 for _, rank in taken), taken
