"""METEOR through the COCO toolkit's own Java scorer, one JVM per process, with a lifecycle that
cannot hang a run (metrics.py calls it).

    warm_up_meteor()                                  # start the JVM now, while captions are generated
    score, per_image = get_meteor().compute_score(gts, res)   # the toolkit's tokenised dicts

The JVM (~8-11 s to start, ~1.3 GB) is started once per process, lazily (or early with
`warm_up_meteor()`), never reused across a fork (a child starts its own), called under a timeout
with one retry on a fresh JVM, and killed at exit without the toolkit's `__del__` lock (which hangs
when a call failed mid-way).
"""

from __future__ import annotations

import atexit
import math
import multiprocessing.util
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from pycocoevalcap.meteor import meteor as _meteor_mod

_METEOR_DIR = os.path.dirname(os.path.abspath(_meteor_mod.__file__))


class MeteorError(RuntimeError):
    """METEOR failed (timed out, crashed or answered garbage) even after a retry on a fresh JVM."""


class _ToolkitMeteor(_meteor_mod.Meteor):
    """pycocoevalcap's Meteor: same command and `compute_score`, a lifecycle that cannot hang.

    stderr goes to a temp file (the toolkit's unread PIPE could fill up), and `__del__` neither
    takes the toolkit's lock (left held when a call raised) nor touches a JVM of another process.
    """

    def __init__(self, java: str, cmd: Sequence[str] | None = None):  # no super(): it Popens itself
        self.meteor_cmd = (
            list(cmd)
            if cmd
            else [java, "-jar", "-Xmx2G", _meteor_mod.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        )
        self.owner_pid = os.getpid()
        self.stderr_file = tempfile.TemporaryFile()
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd, cwd=_METEOR_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr_file
        )
        self.lock = threading.Lock()

    def stderr_tail(self, limit: int = 1500) -> str:
        try:
            self.stderr_file.seek(0)
            return self.stderr_file.read().decode(errors="replace")[-limit:].strip()
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        """Kill first (unblocks any reader/writer thread), then reap and close the pipes."""
        if os.getpid() != self.owner_pid:
            return  # the JVM belongs to the parent of this forked process
        p = self.meteor_p
        try:
            p.kill()
            p.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (p.stdin, p.stdout, self.stderr_file):
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_ORPHANS: list[Any] = []  # JVM handles inherited across a fork: kept referenced, never touched


_INSTANCES: weakref.WeakSet = weakref.WeakSet()


_HOOKS_PID: int | None = None


class MeteorScorer:
    """A lazily started, fork-aware, timeout-guarded METEOR JVM (pycocoevalcap's Meteor inside).

    Use `get_meteor()` for the process-wide instance. `compute_score(gts, res)` takes the same
    tokenised dicts as the toolkit ({id: [refs...]}, {id: [hypothesis]}) and returns the same
    (score, per-image scores). A call that times out or fails kills the JVM and is retried once on
    a fresh one; a second failure raises MeteorError.
    """

    def __init__(self, timeout: float | None = None, retries: int = 1, cmd: Sequence[str] | None = None):
        self.timeout = timeout  # None: 180 s + 20 ms per image (the first call includes JVM start)
        self.retries = retries
        self.cmd = list(cmd) if cmd else None  # tests only: replace the JVM command
        self.starts = 0  # how many JVMs this instance started in this process
        self._meteor: _ToolkitMeteor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        _INSTANCES.add(self)

    def _adopt_after_fork(self) -> None:
        """In a forked child: forget the parent's JVM (without killing it) and start afresh."""
        if self._pid != os.getpid():
            if self._meteor is not None:
                _ORPHANS.append(self._meteor)
            self._meteor, self._pid, self.starts = None, os.getpid(), 0
            self._lock = threading.Lock()  # the parent's may have been held at fork time

    def start(self) -> None:
        """Start the JVM now (non-blocking: it loads while the caller does other work)."""
        self._adopt_after_fork()
        with self._lock:
            self._ensure_started()

    @property
    def pid(self) -> int | None:
        """The JVM's process id (None before the first start)."""
        return None if self._meteor is None else self._meteor.meteor_p.pid

    def _ensure_started(self) -> _ToolkitMeteor:
        m = self._meteor
        if m is None or m.meteor_p.poll() is not None:
            if m is not None:
                m.close()
            java = shutil.which("java")
            if java is None and not self.cmd:
                raise FileNotFoundError("no `java` on PATH")
            _register_exit_hooks()
            self._meteor = m = _ToolkitMeteor(java or "java", self.cmd)
            self.starts += 1
        return m

    def compute_score(self, gts: Mapping, res: Mapping, timeout: float | None = None) -> tuple[float, list[float]]:
        self._adopt_after_fork()
        timeout = timeout or self.timeout or 180.0 + 0.02 * len(res)
        with self._lock:
            errors = []
            for _ in range(1 + self.retries):
                try:
                    return self._call(gts, res, timeout)
                except MeteorError as e:
                    errors.append(str(e))
                    self._kill()
            raise MeteorError("; then ".join(errors))

    def _call(self, gts: Mapping, res: Mapping, timeout: float) -> tuple[float, list[float]]:
        m = self._ensure_started()
        out: dict[str, Any] = {}

        def run():
            try:
                out["result"] = m.compute_score(gts, res)
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                out["error"] = e

        worker = threading.Thread(target=run, name="meteor-call", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            m.close()  # unblocks the worker's readline/write
            worker.join(10)
            raise MeteorError(f"METEOR call timed out after {timeout:.0f} s (JVM killed)")
        if "error" in out:
            e = out["error"]
            raise MeteorError(f"METEOR call failed: {type(e).__name__}: {e} [stderr: {m.stderr_tail()}]")
        score, scores = out["result"]
        if len(scores) != len(res) or not all(math.isfinite(x) for x in [score, *scores]):
            raise MeteorError(f"METEOR answered {len(scores)} scores for {len(res)} images")
        return score, scores

    def _kill(self) -> None:
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def close(self) -> None:
        """Kill this process's JVM (a no-op in a forked child for the parent's JVM)."""
        if self._pid == os.getpid():
            self._kill()


_SHARED: MeteorScorer | None = None


_SHARED_LOCK = threading.Lock()


def get_meteor() -> MeteorScorer:
    """The process-wide MeteorScorer (a forked child gets its own, never the parent's JVM)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = MeteorScorer()
        return _SHARED


def warm_up_meteor() -> bool:
    """Start the shared METEOR JVM in the background now; False when Java is missing."""
    try:
        get_meteor().start()
        return True
    except (FileNotFoundError, OSError):
        return False


def _after_fork_in_child() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()  # may have been held by another thread at fork time


def _close_all() -> None:
    for inst in list(_INSTANCES):
        try:
            inst.close()
        except Exception:
            pass


def _register_exit_hooks() -> None:
    """Kill this process's JVMs at exit: atexit, plus a multiprocessing finaliser because a
    multiprocessing child leaves through os._exit (no atexit). Once per process."""
    global _HOOKS_PID
    if _HOOKS_PID != os.getpid():
        _HOOKS_PID = os.getpid()
        atexit.register(_close_all)
        multiprocessing.util.Finalize(None, _close_all, exitpriority=100)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
