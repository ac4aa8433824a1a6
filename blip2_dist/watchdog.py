"""Heartbeat watchdog: a rank whose peer died or went silent ends itself instead of waiting for it.

    watchdog = Watchdog(rank, world_size, host, port, timeout_s=60)   # after the process group is up
    watchdog.start()          # every rank
    ...                       # training, evaluation, saves
    watchdog.stop()           # this rank finished: it is no longer expected to beat

Why: a collective whose peer is gone waits. With gloo a peer killed on a reachable host closes its
sockets and the collective fails at once, but a node that vanished (power, link, kernel panic)
or a frozen process sends nothing, and the collective waits for the process-group timeout; NCCL
may not notice even a killed peer before its own timeout. Meanwhile the job holds its allocation
and nothing requeues it. The watchdog bounds that wait by `timeout_s`, independent of how long a
collective may legitimately take (rank 0 scoring an evaluation while the others wait, a slow save).

How: every rank runs two daemon threads, so the training thread is never blocked. The beat thread
increments this rank's counter in the job's TCPStore (the one the process group rendezvoused
through, at MASTER_ADDR:MASTER_PORT) every `timeout_s / 10` seconds through its own client, and
reads the counters it watches: rank 0 every rank's, the others rank 0's. The judge thread only
compares times: a watched counter that has not moved for `timeout_s` seconds means that rank is
lost, unless it marked itself done (`stop()`): a rank that finished is not taken for a dead one. A
store that has not answered for `timeout_s` means its host is lost, or this node's network
(under srun and the deepspeed launcher the store lives in rank 0's process; under torchrun in the
agent on the rendezvous node). The two are apart because a store call to a host that vanished
never returns (TCPStore's timeout does not bound it: measured with a frozen server). Rank 0 also
publishes the lost ranks in the store, so every rank exits, not only rank 0. On a loss the judge
prints one line naming the lost rank(s) and ends the process with `hard_exit(EXIT_PEER_LOST)`
(76: the batch script requeues, a bounded number of times).

Why a store client and not a dedicated gloo group: one TCP connection per rank instead of a full
mesh, no collective that every rank must enter in the same order from a side thread, and it works
the same under NCCL. What it does not catch: a rank that is alive but stuck (a deadlock, a hung
filesystem read), since its thread still beats; the process-group timeout (`--dist-timeout`) is
the bound there.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

from blip2_dist.errors import EXIT_PEER_LOST, hard_exit


class Watchdog:
    """See the module docstring. `timeout_s` <= 0 or a world of one rank: start/stop do nothing."""

    def __init__(self, rank: int, world_size: int, host: str, port: int, timeout_s: float):
        self.rank, self.world_size = rank, world_size
        self.host, self.port = host, port
        self.timeout_s = float(timeout_s)
        self.enabled = self.timeout_s > 0 and world_size > 1
        # Beat often enough that one late beat is no alarm.
        self.interval_s = min(5.0, max(0.2, self.timeout_s / 10))
        self.prefix = ""
        self._store = None  # the beat thread's client; only that thread uses it
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # stop() and a verdict never cross: after stop() no exit
        # Written by the beat thread, read by the judge.
        self._answered = 0.0  # when the store last answered a whole round
        self._counts: dict[int, int] = {}  # watched rank -> its counter
        self._moved: dict[int, float] = {}  # watched rank -> when its counter last moved
        self._done: set[int] = set()  # watched ranks that finished
        self._verdict: str | None = None  # lost ranks, as rank 0 published them
        # Rank 0's judge asks the beat thread to publish a verdict, and waits for that at most a while.
        self._to_publish: tuple[str, int] | None = None
        self._published = threading.Event()
        self._done_written = threading.Event()

    # -- public

    def start(self) -> None:
        """Start the threads (no collective: nothing here may run before the ranks bind their GPUs)."""
        if not self.enabled:
            return
        # srun and the deepspeed launcher start a new store with every run; torchrun's agent keeps
        # its store across restarts of the workers, so the restart count keeps old beats apart.
        self.prefix = f"blip2/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        now = time.monotonic()
        watched = [r for r in range(self.world_size) if r != self.rank] if self.rank == 0 else [0]
        self._answered, self._moved = now, {r: now for r in watched}
        for name, target in (("beat", self._beat_loop), ("judge", self._judge_loop)):
            thread = threading.Thread(target=target, name=f"blip2-watchdog-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """This rank is done: no verdict of this watchdog ends the process after this returns.
        Tells the store this rank finished (if it answers within a beat or two)."""
        if not self._threads:
            return
        with self._lock:
            self._stopping.set()
        self._done_written.wait(timeout=2 * self.interval_s + 1)
        for thread in self._threads:
            thread.join(timeout=self.interval_s + 1)  # a beat stuck on a dead store is left behind
        self._threads = []

    # -- the beat thread: all store I/O

    def _key(self, kind: str, rank: int | None = None) -> str:
        return f"{self.prefix}/{kind}" + ("" if rank is None else f"/{rank}")

    def _beat_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - any store failure is "no answer": reconnect next beat
                self._store = None
            self._stopping.wait(self.interval_s)
        try:
            if self._store is not None:
                self._store.set(self._key("done", self.rank), "1")
        except Exception:  # noqa: BLE001 - the store's host may have finished first: nothing to tell
            pass
        self._done_written.set()

    def _beat(self) -> None:
        if self._store is None:
            import torch.distributed as tdist

            self._store = tdist.TCPStore(
                self.host,
                self.port,
                is_master=False,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=max(1.0, self.timeout_s / 2)),
            )
        store = self._store
        store.add(self._key("beat", self.rank), 1)
        if self.rank != 0 and self._verdict is None and store.check([self._key("lost")]):
            self._verdict = store.get(self._key("lost")).decode()
            store.add(self._key("heard"), 1)
        now = time.monotonic()
        for r in self._moved:
            count = store.add(self._key("beat", r), 0)  # add 0 = read, and never blocks on a missing key
            if count != self._counts.get(r):
                self._counts[r], self._moved[r] = count, now
            elif r not in self._done and now - self._moved[r] > 2 * self.interval_s:
                if store.check([self._key("done", r)]):
                    self._done.add(r)
        self._answered = time.monotonic()
        if self._to_publish is not None and not self._published.is_set():
            self._publish(store, *self._to_publish)

    def _publish(self, store, names: str, listeners: int) -> None:
        """Tell the other ranks which ranks are lost, and give them a few beats to read it before
        this process (which may host the store) exits; else they learn only that the store is gone."""
        store.set(self._key("lost"), names)
        deadline = time.monotonic() + 3 * self.interval_s
        while store.add(self._key("heard"), 0) < listeners and time.monotonic() < deadline:
            time.sleep(self.interval_s / 4)
        self._published.set()

    # -- the judge thread: times only, never blocked by the network

    def _judge_loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._judge(time.monotonic())

    def _judge(self, now: float) -> None:
        if self._verdict is not None:
            self._lost(f"rank 0 reports rank(s) {self._verdict} lost")
        if now - self._answered > self.timeout_s:
            self._lost(
                f"no answer from the job's store at {self.host}:{self.port} for {self.timeout_s:.0f} s: "
                "rank 0, its node or this node's network is lost"
            )
        lost = [r for r, moved in dict(self._moved).items() if now - moved > self.timeout_s and r not in self._done]
        if not lost:
            return
        names = ",".join(map(str, lost))
        if self.rank == 0:
            self._to_publish = (names, self.world_size - 1 - len(lost))
            self._published.wait(timeout=4 * self.interval_s + 1)
        self._lost(f"rank(s) {names} silent for {self.timeout_s:.0f} s: process or node lost")

    def _lost(self, message: str) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            line = f"error: rank {self.rank}: {message}; exiting with {EXIT_PEER_LOST} (peer lost)"
            print(line, file=sys.stderr, flush=True)
            hard_exit(EXIT_PEER_LOST, message)
