"""Run the real entry points as the user does: `deepspeed --num_gpus N` on CPU (gloo), or plain python."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from blip2_dist.dist import free_port  # noqa: F401 - the tests import it from here

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cpu_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def command(script: str, args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / script), *args]
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(REPO / script),
        *args,
    ]


def run(script: str, args: list[str], nproc: int = 2, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(script, args, nproc), cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return proc


def start(script: str, args: list[str], nproc: int = 2, log: Path | None = None, **env: str) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        command(script, args, nproc), cwd=REPO, env=cpu_env(**env), stdout=out, stderr=subprocess.STDOUT
    )


def rank_processes(launcher: subprocess.Popen, script: str) -> tuple[list[int], list[int]]:
    """(trainer ranks, all their processes incl. DataLoader workers) under a deepspeed launcher."""
    procs = [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if any(script in part for part in p.cmdline()) and "--local_rank" in " ".join(p.cmdline())
    ]
    pids = {p.pid for p in procs}
    ranks = [p.pid for p in procs if p.ppid() not in pids]
    return ranks, sorted(pids)


def signal_workers(launcher: subprocess.Popen, script: str, sig: int = signal.SIGTERM) -> int:
    """Signal every process of every rank, as SLURM does on preemption; returns the ranks hit."""
    ranks, pids = rank_processes(launcher, script)
    for pid in pids:
        os.kill(pid, sig)
    return len(ranks)


def wait_for(path: Path, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {path} appeared")
        if time.time() > end:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.2)


def load_launch(name: str):
    """launch/NAME.py as a module, so a test can call its main(argv) in this process (no interpreter start)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of a folder, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
