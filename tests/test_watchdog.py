"""The heartbeat watchdog (blip2_dist/watchdog.py) with real processes and a real gloo process group.

Each test starts 2 or 3 plain processes (RANK/WORLD_SIZE in their environment, as torchrun sets
them) that run collectives in a loop with the watchdog on, then freezes one (SIGSTOP: a node that
vanished sends nothing, so gloo waits for its timeout) or lets one finish early, and watches what
the others do. The process-group timeout is 300 s, so an exit within seconds is the watchdog's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from launch_helpers import free_port

from blip2_dist.errors import EXIT_PEER_LOST

HEARTBEAT = 3.0
# Detection takes timeout + a beat interval + a store round trip; on a loaded 2-core machine
# the processes may be slow to be scheduled, hence the generous bound.
BOUND = HEARTBEAT + 20

RANK_SCRIPT = r"""
import datetime, os, sys, time
import torch, torch.distributed as tdist
from blip2_dist.watchdog import Watchdog

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
wd = Watchdog(rank, world, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
              timeout_s=float(os.environ["HEARTBEAT"]))
wd.start()
print("started", flush=True)
finish_rank = int(os.environ.get("FINISH_RANK", "-1"))
t = torch.ones(1)
for i in range(int(os.environ["STEPS"])):
    if rank == finish_rank and i == 5:   # this rank is done early: stops its watchdog, leaves
        wd.stop(); print("finished early", flush=True); sys.exit(0)
    if finish_rank < 0:
        tdist.all_reduce(t)              # blocks while a peer is frozen: the watchdog must act anyway
    time.sleep(0.1)
wd.stop()
print("done", flush=True)
"""


def _start(tmp_path, world: int, steps: int, **env) -> list[subprocess.Popen]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    base = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        HEARTBEAT=str(HEARTBEAT),
        STEPS=str(steps),
        OMP_NUM_THREADS="1",
        **{k: str(v) for k, v in env.items()},
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**base, "RANK": str(r)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(world)
    ]
    for p in procs:  # every rank past start(): the process group and the watchdog are up
        line = p.stdout.readline()
        assert line.strip() == "started", (line, p.stderr.read() if p.poll() is not None else "")
    return procs


def _end(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait()


def _wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank still running {timeout} s after its peer was lost")
    return proc.returncode, err, time.monotonic() - t0


def test_frozen_peer_ends_the_rank_blocked_in_a_collective(tmp_path):
    procs = _start(tmp_path, world=2, steps=100000)
    try:
        time.sleep(1)
        procs[1].send_signal(signal.SIGSTOP)  # node 2 vanished: nothing closes the sockets
        code, err, took = _wait_exit(procs[0], BOUND)
        assert code == EXIT_PEER_LOST, err
        lines = [line for line in err.splitlines() if "peer lost" in line]
        assert lines == [
            "error: rank 0: rank(s) 1 silent for 3 s: process or node lost; exiting with 76 (peer lost)"
        ], err
        assert took >= HEARTBEAT - 1, took  # not before the peer was really silent that long
    finally:
        _end(procs)


def test_frozen_store_host_ends_the_other_ranks(tmp_path):
    """Rank 0 hosts the job's store (as under srun) and freezes: a store call to it never returns
    (TCPStore's own timeout does not bound it), so rank 1 must judge by the clock alone."""
    procs = _start(tmp_path, world=2, steps=100000, FINISH_RANK=99)  # no collectives: only the watchdog acts
    try:
        time.sleep(1)
        procs[0].send_signal(signal.SIGSTOP)
        code, err, _ = _wait_exit(procs[1], BOUND)
        assert code == EXIT_PEER_LOST, err
        assert "error: rank 1: no answer from the job's store at 127.0.0.1:" in err, err
        assert "rank 0, its node or this node's network is lost; exiting with 76" in err, err
    finally:
        _end(procs)


def test_rank_zero_verdict_reaches_every_rank(tmp_path):
    """Rank 2 freezes; rank 0 notices and publishes it; rank 1, which only watches rank 0, exits too."""
    procs = _start(tmp_path, world=3, steps=100000, FINISH_RANK=99)
    try:
        time.sleep(1)
        procs[2].send_signal(signal.SIGSTOP)
        code0, err0, _ = _wait_exit(procs[0], BOUND)
        code1, err1, _ = _wait_exit(procs[1], BOUND)
        assert (code0, code1) == (EXIT_PEER_LOST, EXIT_PEER_LOST), err0 + err1
        assert "rank(s) 2 silent" in err0, err0
        assert "error: rank 1: rank 0 reports rank(s) 2 lost; exiting with 76" in err1, err1
    finally:
        _end(procs)


def test_a_rank_that_finished_is_not_taken_for_a_lost_one(tmp_path):
    """Rank 1 stops its watchdog and exits after 0.5 s; rank 0 runs on for 3 heartbeat timeouts."""
    steps = int(3 * HEARTBEAT / 0.1)
    procs = _start(tmp_path, world=2, steps=steps, FINISH_RANK=1)
    try:
        out1, err1 = procs[1].communicate(timeout=60)
        assert procs[1].returncode == 0 and "finished early" in out1, err1
        out0, err0 = procs[0].communicate(timeout=steps * 0.1 + 60)
        assert procs[0].returncode == 0 and "done" in out0, err0
        assert "peer lost" not in err0, err0
    finally:
        _end(procs)
