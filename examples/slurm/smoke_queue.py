"""Smoke test of the shared queue under a real launcher, no model needed.

Every rank claims prompts from one queue in ``--out``, "trains" each for ``--steps`` steps (a
matmul on its device), renews its leases every step, checkpoints a step counter in the prompt's
folder and finishes it; rank 0 then writes ``<out>/smoke.json``: the progress summary, who
trained what, and whether every prompt was done exactly once. With ``--kill-rank R`` rank R
SIGKILLs itself halfway through its first prompt (in the launcher's first attempt only); the
others take its prompts over once its lease runs out, or at once on the same machine, and
resume them from its checkpoints. torchrun stops every local rank when one dies (they write
their checkpoints and release their prompts on its SIGTERM, exit 143) and, given
``--max-restarts 1``, starts them again: the new ranks finish everything.

    torchrun --standalone --nproc-per-node 2 examples/slurm/smoke_queue.py --out /tmp/smoke
    torchrun --standalone --nproc-per-node 3 --max-restarts 1 examples/slurm/smoke_queue.py --out /tmp/smoke2 --kill-rank 1
    srun -n 4 python examples/slurm/smoke_queue.py --out /shared/smoke      # Slurm tasks

Several ranks may share one GPU here (each maps to ``cuda:0`` when one GPU is visible).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from dreamfusion_trt.atomic import atomic_write_text
from dreamfusion_trt.train.distributed import (
    ProgressReporter,
    StopFlag,
    device_for,
    dist_env,
    format_summary,
)
from dreamfusion_trt.train.queue import PromptQueue, read_states


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lease-s", type=float, default=3.0)
    p.add_argument("--kill-rank", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    env = dist_env()
    device = device_for(env)
    out = Path(args.out)
    ids = [f"smoke-{i:03d}" for i in range(args.prompts)]
    queue = PromptQueue(out, ids, lease_s=args.lease_s, rank=env.rank, host=env.host, job=env.job, restart=env.restart,
                        skew_s=0.5, renew_every_s=args.lease_s / 6)  # fmt: skip
    reporter = ProgressReporter(out, ids, env, every_s=2.0, lease_s=args.lease_s, skew_s=0.5)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    with StopFlag(out, env.job, env.restart, check_every_s=0.5) as flag:
        code = _work(args, env, device, out, queue, reporter, flag, kill=first_attempt and env.rank == args.kill_rank)
    if code or not env.is_main:
        return code
    return _report(out, ids, env, device, queue, reporter)


def _work(args, env, device, out, queue, reporter, flag, kill) -> int:
    x = torch.randn(512, 512, device=device)
    while (pid := queue.wait_claim(poll_s=0.5, should_stop=lambda: flag.requested)) is not None:
        folder = out / pid
        folder.mkdir(parents=True, exist_ok=True)
        ckpt = folder / "step.json"
        start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
        step, lost = start, False
        while step < args.steps:
            x = torch.tanh(x @ x) * 0.5  # a step's worth of device work
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step += 1
            if pid in queue.renew(info={pid: {"step": step}}):
                lost = True
                break
            if step % 10 == 0:
                atomic_write_text(ckpt, json.dumps({"step": step, "rank": env.rank}))
            if kill and step == args.steps // 2:
                os.kill(os.getpid(), signal.SIGKILL)
            reporter.maybe_report()
            if flag.requested:  # what the batch does: checkpoint, release, exit with the flag's code
                atomic_write_text(ckpt, json.dumps({"step": step, "rank": env.rank}))
                queue.release_all()
                logging.warning("rank %d: %s; checkpointed at step %d and released", env.rank, flag.reason, step)
                return flag.exit_code
        if lost or not queue.holds(pid):
            continue
        atomic_write_text(ckpt, json.dumps({"step": step, "rank": env.rank}))
        queue.finish(pid, "done", {"start": start, "rank": env.rank, "device": str(device)})
    return flag.exit_code or 0


def _report(out, ids, env, device, queue, reporter) -> int:
    started = reporter.since
    while queue.pending():  # rank 0 reports once every prompt is over
        time.sleep(0.5)
    progress = reporter.maybe_report(force=True)
    states = read_states(out, ids)
    finals = {pid: {"rank": s.record.holder.rank, "host": s.record.holder.host, **s.record.info} for pid, s in states.items()}
    result = {"world_size": env.world_size, "launcher": env.launcher, "device": str(device), "torch": torch.__version__,
              "prompts": len(ids), "all_done_once": all(s.state == "done" for s in states.values()),
              "resumed": {pid: f["start"] for pid, f in finals.items() if f["start"] > 0},
              "wall_s": round(time.time() - started, 2), "summary": format_summary(progress).splitlines(),
              "finals": finals}  # fmt: skip
    atomic_write_text(out / "smoke.json", json.dumps(result, indent=2) + "\n")
    logging.info("smoke: %s", "ok" if result["all_done_once"] else "FAILED")
    return 0 if result["all_done_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
