"""How a process of a job ends: the exit codes launch scripts act on, and an exit that never waits.

    raise UserError("--save-steps must be >= 1, got 0")   # one line for the user, no traceback
    hard_exit(EXIT_PEER_LOST)                             # flush, SIGKILL own children, os._exit
    if __name__ == "__main__":
        run_main(main)                                    # every entry point ends through this

`run_main` turns whatever ends `main` (a return code, any exception, Ctrl-C) into one line on
stderr, `error: [rank N: ]MESSAGE`, and an exit through `hard_exit`, so no process of a job
outlives an error: a rank that raised exits 1 with its message; a rank whose collective failed
because another rank died exits 76 with a short line. A UserError (a message written for the user)
comes without traceback; an unexpected exception (a bug, a library failing) is printed with its
traceback, as a bug report needs it; --debug or BLIP2_DEBUG=1 shows every traceback. Before the
process group starts every rank runs the same checks and meets the same error, so only the first
rank of each node prints it; afterwards the rank that failed prints it.

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
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

DEBUG_ENV = "BLIP2_DEBUG"
# A rank that lost a peer waits this long before exiting, so that the rank with the real error is
# the first to exit: the deepspeed launcher polls every second and exits with the first non-zero
# code it sees, which should be that rank's 1 rather than this rank's 76. (Under srun the exit
# reports decide, see launch/slurm/train.sbatch.)
PEER_LOST_GRACE_S = 3.0


class UserError(ValueError):
    """A problem the user can fix, stated in one line that names the flag, file or sample.
    `exit_code` is what the process exits with (EXIT_ERROR unless given). A ValueError, so library
    callers that catch bad values keep working."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(UserError):
    """A bad command line (what argparse reports): exit code 2."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class AgreedError(UserError):
    """Raised on every rank at once, after the ranks agreed on it (e.g. a non-finite loss):
    printed once, by rank 0, like the errors found before the process group starts."""


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


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG).

    For DataLoader workers: they ignore SIGTERM so that Slurm's signals don't kill them before
    their rank has saved, so nothing else would end them if their rank were SIGKILLed (the OOM
    killer, a node agent). The death signal follows the parent *thread* that started the worker,
    the rank's main thread here. If the parent is already gone, exit at once."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the rank's hard_exit still kills its workers
        return
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(EXIT_PEER_LOST)


# ---- the entry points' exit path ---------------------------------------------------------------


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def _env_int(*names: str) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _process_group():
    """torch.distributed when a process group is up, else None (torch is not imported here)."""
    td = sys.modules.get("torch.distributed")
    try:
        return td if td is not None and td.is_available() and td.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken torch state means no usable group
        return None


def is_peer_lost(exc: BaseException) -> bool:
    """A collective or the job's store failed (another rank gone, or stuck past --dist-timeout),
    as opposed to an error of this rank's own (blip2_dist.dist.is_comm_failure)."""
    if "torch.distributed" not in sys.modules:  # no collective can have run
        return False
    from blip2_dist.dist import is_comm_failure

    return is_comm_failure(exc)


def one_line(exc: BaseException) -> str:
    """The message of an exception, without the traceback a DataLoader worker wraps it in."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = re.sub(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ", "", last)  # "pkg.mod.Type: msg"
    return text


def exit_for(exc: BaseException) -> tuple[int, str | None]:
    """(exit code, one-line message) for whatever ended an entry point's main."""
    if isinstance(exc, SystemExit):  # sys.exit(n), argparse's --help
        code = exc.code
        if code is None or isinstance(code, int):
            return code or EXIT_OK, None
        return EXIT_ERROR, str(code)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C)"
    if isinstance(exc, UserError):
        return exc.exit_code, one_line(exc)
    text = one_line(exc)
    if is_peer_lost(exc):
        first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")  # gloo's source path
        cause = f"{type(exc).__name__}: {first.split('. ')[0][:160]}"
        if _process_group() is None:  # the rendezvous itself failed (a port taken, the store unreachable)
            return EXIT_PEER_LOST, f"the process group could not start ({cause})"
        return EXIT_PEER_LOST, f"a collective failed ({cause}): another rank or its node is lost"
    first = text.splitlines()[0] if text else "(no message)"
    return EXIT_ERROR, f"{type(exc).__name__}: {first}"


def _printed_here(exc: BaseException, code: int) -> bool:
    """Before the process group every rank meets the same error: the first rank of each node prints
    it (a node that sees other files than the first one still says why). Afterwards the rank that
    failed prints it, except errors all ranks agreed on (and Ctrl-C, which every rank gets): rank 0.
    A rank that lost its peers always says so."""
    td = _process_group()
    if code == EXIT_PEER_LOST:
        return True
    if td is None:
        return _env_int("LOCAL_RANK", "SLURM_LOCALID") == 0
    if isinstance(exc, AgreedError) or code == EXIT_INTERRUPTED:
        return td.get_rank() == 0
    return True


def _rank_prefix() -> str:
    td = _process_group()
    if td is not None:
        return f"rank {td.get_rank()}: " if td.get_world_size() > 1 else ""
    rank = _env_int("RANK", "SLURM_PROCID")
    return f"rank {rank}: " if rank else ""


def _close_progress_bars() -> None:
    """End a tqdm bar's line, so the message starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - cosmetic only
            pass


def report(exc: BaseException, code: int, message: str | None, debug: bool) -> None:
    """Print what ended the process: `error: [rank N: ]MESSAGE`, after the traceback for an
    unexpected exception (or for any with --debug)."""
    if message is None or not _printed_here(exc, code):
        return
    _close_progress_bars()
    unexpected = code == EXIT_ERROR and not isinstance(exc, UserError)
    if (debug or unexpected) and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
        traceback.print_exception(exc, file=sys.stderr)
    tail = f"; exiting with {code}" if code in (EXIT_PEER_LOST, EXIT_INTERRUPTED) else ""
    print(f"error: {_rank_prefix()}{message}{tail}", file=sys.stderr, flush=True)


class _CtrlC:
    """Remembers that SIGINT came (then raises KeyboardInterrupt as Python does): a rank blocked in
    a collective may first see the collective fail because its peer already left on the same Ctrl-C."""

    def __init__(self) -> None:
        self.seen = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run an entry point's `main(argv)` and end the process through `hard_exit`, whatever happens
    (see the module docstring). `main` returns the exit code (None = 0)."""
    argv = sys.argv[1:] if argv is None else argv
    ctrl_c = _CtrlC()
    try:
        code = main(argv)
    except BaseException as exc:  # noqa: BLE001 - everything ends here, Ctrl-C included
        code, message = exit_for(exc)
        try:
            if code == EXIT_PEER_LOST:
                time.sleep(PEER_LOST_GRACE_S)
        except BaseException:  # noqa: BLE001 - Ctrl-C meanwhile: noted by ctrl_c
            pass
        if ctrl_c.seen:
            code, message = exit_for(KeyboardInterrupt())
        try:
            report(exc, code, message, debug_requested(argv))
        except BaseException:  # noqa: BLE001 - a second Ctrl-C or a broken stream: exit anyway
            pass
        hard_exit(code, message)
    hard_exit(EXIT_OK if code is None else int(code))
