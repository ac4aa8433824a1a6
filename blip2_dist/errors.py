"""How a process of a job ends: the exit codes launch scripts act on, and an exit that never waits.

    raise UserError("--save-steps must be >= 1, got 0")   # one line for the user, no traceback
    hard_exit(EXIT_PEER_LOST)                             # flush, SIGKILL own children, os._exit

Exit codes (launch/slurm/train.sbatch requeues on some of them):
  0   done
  1   EXIT_ERROR: deterministic failure (bad flag, bad data, a bug); a rerun fails the same way,
      so it is never requeued
  2   EXIT_USAGE: argparse's code for a bad command line
  75  EXIT_PREEMPTED (EX_TEMPFAIL): a checkpoint was saved after SIGUSR1/SIGTERM; requeue
  76  EXIT_PEER_LOST: another rank died, its node was lost, or a collective timed out; this rank
      has nothing to save that the last checkpoint lacks; requeue (a bounded number of times)
A rank killed by a signal (SIGKILL, the OOM killer, a segfault) writes nothing and exits 128+N.

Exit reports: when BLIP2_EXIT_DIR is set (launch/slurm/train.sbatch sets one per attempt),
`hard_exit` first writes `$BLIP2_EXIT_DIR/rank-<RANK>.json` = {"rank", "exit_code", "message"}, so
the batch script can tell "a deterministic error on some rank" (do not requeue) from "preempted" or
"a rank was lost" (requeue) even when srun reports only one exit code for all tasks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import NoReturn

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76


class UserError(Exception):
    """A problem the user can fix, stated in one line that names the flag, file or sample."""


def child_pids() -> list[int]:
    """Pids of this process's direct children (DataLoader workers, helper processes), from /proc."""
    me = str(os.getpid())
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: nothing to find this way
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == me:
            found.append(int(entry))
    return found


def kill_children() -> None:
    """SIGKILL every direct child. Loader workers ignore SIGTERM (they must survive Slurm's signals
    until their rank has saved), so multiprocessing's own exit hook, which sends SIGTERM and then
    joins without a timeout, would wait for them forever."""
    for pid in child_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def write_exit_report(code: int, message: str | None = None) -> None:
    """$BLIP2_EXIT_DIR/rank-<RANK>.json (atomic), if BLIP2_EXIT_DIR is set; never raises."""
    folder = os.environ.get("BLIP2_EXIT_DIR")
    if not folder:
        return
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank-{rank}.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"rank": int(rank), "exit_code": code, "message": message}, f)
        os.replace(tmp, path)
    except OSError:  # a report is a courtesy to the batch script; the exit itself must happen
        pass


def hard_exit(code: int, message: str | None = None) -> NoReturn:
    """End this process now with `code`: write the exit report (see the module docstring), flush
    the streams, kill the children, and skip every atexit hook and non-daemon thread (a stuck
    collective or a worker join can never hold the exit). `message`: the one-line reason, for the
    report only; print it yourself before calling."""
    write_exit_report(code, message)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream must not stop the exit
            pass
    kill_children()
    os._exit(code)
