"""hard_exit ends a process whose children ignore SIGTERM, at once and with the code asked for."""

import subprocess
import sys
import time

from blip2_dist.errors import EXIT_PEER_LOST

CHILD_IGNORES_TERM = r"""
import multiprocessing as mp, signal, sys, time
from blip2_dist.errors import hard_exit, child_pids

def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)

if __name__ == "__main__":
    p = mp.get_context("fork").Process(target=stubborn, daemon=True)
    p.start()
    time.sleep(0.5)
    print(p.pid, flush=True)
    assert p.pid in child_pids()
    if sys.argv[1] == "hard":
        hard_exit(int(sys.argv[2]))
    sys.exit(int(sys.argv[2]))  # multiprocessing's atexit hook: SIGTERM (ignored), then join forever
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_hard_exit_kills_a_child_that_ignores_sigterm(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD_IGNORES_TERM)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), "hard", str(EXIT_PEER_LOST)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_PEER_LOST, proc.stderr
    assert time.monotonic() - t0 < 30
    child = int(proc.stdout.split()[0])
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def test_plain_exit_with_such_a_child_hangs(tmp_path):
    """The failure hard_exit exists for: without it the same process never exits."""
    script = tmp_path / "child.py"
    script.write_text(CHILD_IGNORES_TERM)
    proc = subprocess.Popen([sys.executable, str(script), "plain", "3"], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        proc.wait(timeout=5)
        hung = False
    except subprocess.TimeoutExpired:
        hung = True
    finally:
        proc.kill()
        subprocess.run(["kill", "-9", str(child)])
        proc.wait()
    assert hung


def test_hard_exit_writes_the_exit_report(tmp_path):
    script = tmp_path / "exit.py"
    script.write_text("from blip2_dist.errors import hard_exit\nhard_exit(76, 'lost rank 1')\n")
    env = {**__import__("os").environ, "BLIP2_EXIT_DIR": str(tmp_path / "exits"), "RANK": "3"}
    proc = subprocess.run([sys.executable, str(script)], env=env, timeout=60)
    assert proc.returncode == 76
    report = __import__("json").loads((tmp_path / "exits" / "rank-3.json").read_text())
    assert report == {"rank": 3, "exit_code": 76, "message": "lost rank 1"}
