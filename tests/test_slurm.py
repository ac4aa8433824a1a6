"""launch/slurm/train.sbatch on a real single-node Slurm started by the test (tests/slurm_cluster.py).

- harness: a 2-task batch job sees ranks 0 and 1 of world 2 through blip2_dist.dist, MASTER_ADDR
  resolves;
- the sbatch's preemption path with a stand-in trainer (PYTHON pointed at a small script written
  here that follows the trainer's contract: checkpoint, exit 75 on SIGUSR1/SIGTERM, --resume auto):
  USR1 to the batch script -> forwarded -> exit 75 -> `scontrol requeue` -> the second run
  (SLURM_RESTART_COUNT=1) resumes from the first run's state; a plain scancel does not requeue;
- the real trainer (launch/train.py, tiny-t5, synthetic shards, 2 CPU ranks): a run finishes with a
  final checkpoint and eval metrics; a run preempted mid-way ends in the same final state.

Needs root and apt on first use (~15 s install); skipped with the reason otherwise.
Run alone: .venv/bin/pytest tests/test_slurm.py -v
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, SlurmUnavailable, clean_stale

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
TRAINER = REPO / "launch" / "train.py"
# Two CPU tasks on the one node: cancels the script's GPU request, one core per task.
CPU_ARGS = ["--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
EXIT_PREEMPTED = 75

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = SlurmCluster(cred_expire=10)
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm on this machine: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def _job_logs(out: Path) -> str:
    """The batch log(s) and per-rank logs under `out`, for assertion messages."""
    parts = [f"--- {p.name}\n{_read(p)[-3000:]}" for p in sorted(out.rglob("*.out")) + sorted(out.rglob("*.log"))]
    return "\n".join(parts)


def _submit_sbatch(slurm: SlurmCluster, tmp: Path, run_dir: Path, env: dict, name: str) -> int:
    env = {"OUT": str(run_dir), "CPU": "1", **env}
    args = [*CPU_ARGS, f"--job-name={name}", f"--output={tmp}/%x-%j.out"]
    return slurm.submit(SBATCH, env=env, args=args, cwd=REPO)


def _wait_for(predicate, timeout: float, what: str, on_fail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_fail()}")


# ---- (a) the harness ---------------------------------------------------------------------------

def test_two_task_job_sees_ranks_and_master(slurm, tmp_path):
    script = tmp_path / "ranks.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        srun {sys.executable} -c '
        import json, os
        from blip2_dist.dist import export_env_for_torch, world_info_from_env
        info = world_info_from_env(); export_env_for_torch(info)
        print(json.dumps(dict(rank=info.rank, world=info.world_size, local=info.local_rank,
                              addr=os.environ["MASTER_ADDR"], port=os.environ["MASTER_PORT"])))'
        """))
    job = slurm.submit(script, args=["--ntasks=2", f"--output={tmp_path}/out.txt"], cwd=REPO)
    result = slurm.wait(job, timeout=60)
    out = _read(tmp_path / "out.txt")
    assert (result.state, result.exit_code) == ("COMPLETED", 0), out
    rows = sorted((json.loads(l) for l in out.splitlines() if l.startswith("{")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"], r["local"]) for r in rows] == [(0, 2, 0), (1, 2, 1)], out
    assert {r["addr"] for r in rows} == {slurm.node_name}
    socket.gethostbyname(slurm.node_name)  # the node name resolves (else MASTER_ADDR is useless)
    assert {int(r["port"]) for r in rows} == {20000 + job % 20000}


def test_stale_cluster_of_a_dead_session_is_cleaned(slurm):
    """A session killed before its teardown leaves daemons behind; the next start ends them.
    (Its cluster runs beside the module's one: separate folders, ports and munged.)"""
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from slurm_cluster import SlurmCluster\n"
            "c = SlurmCluster(); c.start(); print(c.root, *[p.pid for p in c._procs.values()], flush=True)\n"
            "time.sleep(600)\n") % str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait()
    assert line, "the child process could not start a cluster"
    root, pids = Path(line[0]), [int(p) for p in line[1:]]
    assert len(pids) == 3 and all(Path(f"/proc/{p}").exists() for p in pids)
    clean_stale(root.parent)
    assert not root.exists()
    assert not any(Path(f"/proc/{p}").exists() and "Z" not in _proc_state(p) for p in pids)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# ---- (b) train.sbatch's preemption path, with a stand-in trainer -------------------------------

FAKE_TRAINER = '''\
#!{python}
"""Stand-in for `python launch/train.py ...` with the trainer's contract and no model."""
import argparse, json, os, signal, sys, time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("script"); p.add_argument("--output-dir"); p.add_argument("--resume", default="")
p.add_argument("--max-steps", type=int); p.add_argument("--save-steps", type=int)
p.add_argument("--step-time", type=float, default=0.25)
args, rest = p.parse_known_args()
# What blip2_dist.dist.world_info_from_env reads (without importing torch: this stays fast).
rank = int(os.environ.get("RANK", os.environ["SLURM_PROCID"]))
world = int(os.environ.get("WORLD_SIZE", os.environ["SLURM_NTASKS"]))
out = Path(args.output_dir); ckpt = out / "checkpoints"; ckpt.mkdir(parents=True, exist_ok=True)
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
stop = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: stop.append(s))

state = {{"step": 0, "losses": []}}
mine = ckpt / f"rank{{rank}}.json"
if args.resume == "auto" and mine.exists():
    state = json.loads(mine.read_text())
record = dict(rank=rank, world=world, restart=restart, start_step=state["step"],
              argv=sys.argv[1:], master=os.environ.get("MASTER_ADDR"), port=os.environ.get("MASTER_PORT"))
(out / f"run-r{{restart}}-rank{{rank}}.json").write_text(json.dumps(record))
print("start", record, flush=True)

def save():
    tmp = mine.with_suffix(".tmp"); tmp.write_text(json.dumps(state)); os.replace(tmp, mine)

while state["step"] < args.max_steps:
    time.sleep(args.step_time)
    state["step"] += 1
    state["losses"].append(round(1.0 / state["step"], 6))
    if stop:
        save(); print("signal", stop, "saved at", state["step"], flush=True); sys.exit({exit_preempted})
    if state["step"] % args.save_steps == 0:
        save()
save()
if rank == 0:
    (out / "final_state.json").write_text(json.dumps({{"step": state["step"], "loss_history": state["losses"]}}))
print("done", state["step"], flush=True)
'''


def _fake_trainer(tmp: Path) -> Path:
    path = tmp / "fake_python"
    path.write_text(FAKE_TRAINER.format(python=sys.executable, exit_preempted=EXIT_PREEMPTED))
    path.chmod(0o755)
    return path


def _runs(run_dir: Path) -> dict[tuple[int, int], dict]:
    return {(r["restart"], r["rank"]): r for r in
            (json.loads(p.read_text()) for p in run_dir.glob("run-r*-rank*.json"))}


def test_sbatch_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run_dir, steps = tmp_path / "run", 24
    env = {"PYTHON": str(_fake_trainer(tmp_path)), "MODEL": "stand-in", "DATA": "none",
           "EXTRA_ARGS": f"--max-steps {steps} --save-steps 4 --step-time 0.2"}
    job = _submit_sbatch(slurm, tmp_path, run_dir, env, name="preempt")
    logs = lambda: _job_logs(tmp_path) + "\n" + slurm.logs()
    _wait_for(lambda: (run_dir / "checkpoints" / "rank0.json").exists(), 60, "the first checkpoint", logs)
    t0 = time.monotonic()
    slurm.scancel_signal(job, "USR1", batch=True)
    result = slurm.wait(job, timeout=120)
    requeue_s = time.monotonic() - t0
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1), logs()

    runs = _runs(run_dir)
    assert sorted(runs) == [(0, 0), (0, 1), (1, 0), (1, 1)], logs()
    for (restart, rank), r in runs.items():
        assert r["world"] == 2 and r["master"] == slurm.node_name, r
        assert int(r["port"]) == 20000 + job % 20000, r
        assert r["argv"][0] == "launch/train.py" and "--resume" in r["argv"], r
        assert r["argv"][r["argv"].index("--resume") + 1] == "auto", r
        assert r["argv"][r["argv"].index("--output-dir") + 1] == str(run_dir), r
    # The first run started fresh; the second continued from what the first saved on USR1.
    assert runs[0, 0]["start_step"] == 0
    assert 4 <= runs[1, 0]["start_step"] < steps, logs()
    final = json.loads((run_dir / "final_state.json").read_text())
    assert final == {"step": steps, "loss_history": [round(1.0 / s, 6) for s in range(1, steps + 1)]}

    batch_log = _read(tmp_path / f"preempt-{job}.out")
    assert "got SIGUSR1" in batch_log and f"requeued job {job}" in batch_log, batch_log
    assert "restart 0:" in batch_log and "restart 1:" in batch_log, batch_log  # appended, not overwritten
    for rank in (0, 1):
        rank_log = _read(run_dir / "logs" / f"preempt-{job}-rank{rank}.log")
        starts = [l for l in rank_log.splitlines() if l.startswith("start ")]
        assert len(starts) == 2 and "done" in rank_log, rank_log  # appended across the requeue
    print(f"USR1 -> requeued run finished in {requeue_s:.1f} s (cred_expire {slurm.cred_expire} s)")


def test_sbatch_plain_scancel_does_not_requeue(slurm, tmp_path):
    run_dir = tmp_path / "run"
    env = {"PYTHON": str(_fake_trainer(tmp_path)), "MODEL": "stand-in", "DATA": "none",
           "EXTRA_ARGS": "--max-steps 400 --save-steps 4 --step-time 0.1"}
    job = _submit_sbatch(slurm, tmp_path, run_dir, env, name="cancel")
    _wait_for(lambda: (run_dir / "checkpoints" / "rank0.json").exists(), 60, "the first checkpoint",
              lambda: _job_logs(tmp_path))
    subprocess.run(["scancel", str(job)], env=slurm.env(), check=True)
    result = slurm.wait(job, timeout=60)
    assert result.state == "CANCELLED" and result.restarts == 0, _job_logs(tmp_path)
    assert not (run_dir / "final_state.json").exists()


# ---- (c) the real trainer ----------------------------------------------------------------------
# Output contract assumed (blip2_dist.train / checkpoint / evaluate): exit 0 finished, 75 saved
# after SIGUSR1/SIGTERM; RUN_DIR/checkpoints/step_NNNNNNNN/COMPLETE + checkpoints/latest;
# RUN_DIR/final_state.json {"step": int, "loss_history": [float, ...]} (the whole run's history,
# restored on resume); RUN_DIR/eval/NNNNNNNN/results.json {"metrics": {...}, ...}.

needs_trainer = pytest.mark.skipif(not TRAINER.exists(), reason="launch/train.py not present yet")
STEPS, SAVE_STEPS = 40, 8
TRAIN_ARGS = (f"--max-steps {STEPS} --save-steps {SAVE_STEPS} --eval-steps 0 --micro-batch 2 --seed 0 "
              "--num-workers 0 --num-beams 1 --max-new-tokens 8 --min-length 1")


def _write_shards(out: Path) -> Path:
    try:
        from blip2_dist.data.synthetic import write_synthetic
    except ImportError:
        return _write_shards_by_hand(out)
    write_synthetic(out, n_train=16, n_val=4, n_test=4, seed=0, samples_per_shard=2)
    return out


def _write_shards_by_hand(out: Path) -> Path:
    import io

    from PIL import Image

    from blip2_dist.data.shards import Sample, ShardWriter

    colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
    with ShardWriter(out, samples_per_shard=8) as writer:
        for i in range(24):
            name, rgb = list(colors.items())[i % 4]
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), rgb).save(buf, format="JPEG")
            split = "train" if i < 16 else ("val" if i < 20 else "test")
            caps = [f"a {name} square", f"a {name} image", f"something {name}"]
            writer.write(Sample(f"img{i:03d}", split, caps, buf.getvalue()))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("shards") / "synthetic")


def _train_env(shards: Path) -> dict:
    return {"MODEL": "tiny-t5", "DATA": str(shards), "EXTRA_ARGS": TRAIN_ARGS}


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    """One uninterrupted train.sbatch run; (job result, run dir, submit dir)."""
    tmp = tmp_path_factory.mktemp("slurm_train")
    run_dir = tmp / "run"
    job = _submit_sbatch(slurm, tmp, run_dir, _train_env(shards), name="train")
    return slurm.wait(job, timeout=600), run_dir, tmp


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))


@needs_trainer
def test_train_sbatch_finishes_with_checkpoint_and_metrics(uninterrupted):
    result, run_dir, tmp = uninterrupted
    logs = _job_logs(tmp)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 0), logs
    final = json.loads((run_dir / "final_state.json").read_text())
    assert final["step"] == STEPS and len(final["loss_history"]) == STEPS, final
    assert _complete_checkpoints(run_dir)[-1].name == f"step_{STEPS:08d}", logs
    results = sorted(run_dir.glob("eval/*/results.json"))
    assert results, logs
    metrics = json.loads(results[-1].read_text())["metrics"]
    assert metrics and all(isinstance(v, (int, float)) for v in metrics.values()), metrics


@needs_trainer
def test_train_sbatch_preempted_run_matches_uninterrupted(slurm, shards, uninterrupted, tmp_path):
    result0, run0, _ = uninterrupted
    assert result0.exit_code == 0, "the uninterrupted run failed (see the test above)"
    run_dir = tmp_path / "run"
    job = _submit_sbatch(slurm, tmp_path, run_dir, _train_env(shards), name="train-preempt")
    logs = lambda: _job_logs(tmp_path) + "\n" + slurm.logs()
    _wait_for(lambda: bool(_complete_checkpoints(run_dir)), 600, "the first checkpoint", logs)
    slurm.scancel_signal(job, "USR1", batch=True)
    result = slurm.wait(job, timeout=600)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1), logs()
    assert f"requeued job {job}" in _read(tmp_path / f"train-preempt-{job}.out"), logs()

    want = json.loads((run0 / "final_state.json").read_text())
    got = json.loads((run_dir / "final_state.json").read_text())
    assert got["step"] == want["step"] == STEPS
    # PITFALLS: resumed fp32 losses matched within 2.4e-7, bf16 exactly.
    assert got["loss_history"] == pytest.approx(want["loss_history"], rel=1e-5, abs=1e-6)


@needs_trainer
def test_evaluate_sbatch_scores_the_trained_adapter(slurm, shards, uninterrupted, tmp_path):
    result0, run0, _ = uninterrupted
    assert result0.exit_code == 0, "the uninterrupted run failed (see the tests above)"
    adapter = _complete_checkpoints(run0)[-1] / "adapter"
    out = tmp_path / "eval"
    env = {"CPU": "1", "MODEL": "tiny-t5", "ADAPTER": str(adapter), "DATA": str(shards), "SPLIT": "test",
           "OUT": str(out), "EXTRA_ARGS": "--num-beams 1 --max-new-tokens 8 --min-length 1 --num-workers 0"}
    args = [*CPU_ARGS, "--job-name=eval", f"--output={tmp_path}/%x-%j.out"]
    job = slurm.submit(REPO / "launch" / "slurm" / "evaluate.sbatch", env=env, args=args, cwd=REPO)
    result = slurm.wait(job, timeout=300)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), _job_logs(tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "test" and results["images"] == 4 and results["metrics"], results.keys()
