"""launch/slurm/*.sbatch on a real two-node Slurm started by the test (tests/slurm_cluster.py).

The nodes are network + UTS + mount namespaces of this machine with real TCP between them, so what
a rank does on node 2 (die, lose its link, raise) is seen by node 1 only through the network.
Two nodes x one rank (the machine has 2 cores), tiny-t5, ZeRO-2, CPU (gloo).

- harness: ranks 0/1 on node1/node2 through blip2_dist.dist, MASTER_ADDR resolves on both nodes,
  each rank bound to the CPUs --cpus-per-task gave it (with srun taking exactly what it asks for,
  as SLURM_EXACT=1 makes it, so a lost SRUN_CPUS_PER_TASK would show); a crashed session's cluster
  is cleaned up (daemons, namespaces, folder);
- train.sbatch's decisions with a stand-in trainer (fast, no model): a plain scancel does not
  requeue; a rank that keeps dying is requeued MAX_RESTARTS times, then the job fails;
- the real trainer, sharing one uninterrupted two-node run: every sample of an epoch seen once
  across the nodes; evaluation across the nodes scores every image once; the per-step loss equals
  a one-node two-rank run's and a `torchrun --nnodes 2` run's; evaluate.sbatch on two nodes; USR1
  during an evaluation -> save -> exit 75 -> requeue -> resumed run equal to the uninterrupted one
  (losses, eval results, best adapter, final adapter); kill -9 of node 2's rank -> the job ends in
  bounded time, is requeued, resumes, and its final adapter equals the uninterrupted run's; a
  Python exception on node 2 -> the job fails at once with the traceback in its log, no requeue;
  node 2 cut off the network -> NODE_FAIL, requeue, finish once it is back.

Needs root, network namespaces and apt on first use (~15 s install); skipped with the reason otherwise.
Run alone: .venv/bin/pytest tests/test_slurm.py -v
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable, _alive, clean_stale, netns_pids

from blip2_dist.errors import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
EVAL_SBATCH = REPO / "launch" / "slurm" / "evaluate.sbatch"
BIN = Path(sys.executable).parent
# One CPU task per node, both of a node's CPUs each; or both tasks on node 1 (the one-node run).
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0"]
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
HEARTBEAT = 10  # --heartbeat-timeout of the runs here (60 s by default)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    try:
        c = SlurmCluster(nodes=2)
        c.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm on this machine: {e}")
    try:
        yield c
    finally:
        c.stop()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def _job_logs(folder: Path) -> str:
    """The batch log(s) and per-rank logs under `folder`, for assertion messages."""
    paths = sorted(folder.rglob("*.out")) + sorted(folder.rglob("*.log"))
    return "\n".join(f"--- {p.name}\n{_read(p)[-3000:]}" for p in paths)


def _submit(
    cluster: SlurmCluster, tmp: Path, run_dir: Path, env: dict, name: str, shape=TWO_NODES, script: Path = SBATCH
) -> int:
    env = {"OUT": str(run_dir), "CPU": "1", **env}
    args = [*shape, f"--job-name={name}", f"--output={tmp}/%x-%j.out"]
    return cluster.submit(script, env=env, args=args, cwd=REPO)


def _wait_for(predicate, timeout: float, what: str, on_fail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_fail()}")


# ---- the harness -------------------------------------------------------------------------------

PROBE = '''\
#!{python}
"""Stand-in for `python launch/train.py ...`: records where this rank runs and what it may use."""
import json, os, socket, sys
from blip2_dist.dist import export_env_for_torch, world_info_from_env

info = world_info_from_env()
export_env_for_torch(info)
out = sys.argv[sys.argv.index("--output-dir") + 1]
record = dict(rank=info.rank, world=info.world_size, local=info.local_rank, host=socket.gethostname(),
              master=os.environ["MASTER_ADDR"], master_ip=socket.gethostbyname(os.environ["MASTER_ADDR"]),
              port=int(os.environ["MASTER_PORT"]), cpus=sorted(os.sched_getaffinity(0)),
              cpus_per_task=os.environ.get("SLURM_CPUS_PER_TASK"), exit_dir=os.environ.get("BLIP2_EXIT_DIR"))
with open(os.path.join(out, f"probe-rank{{info.rank}}.json"), "w") as f:
    json.dump(record, f)
'''


def test_two_node_job_ranks_master_and_cpus(cluster, tmp_path):
    probe = tmp_path / "probe"
    probe.write_text(PROBE.format(python=sys.executable))
    probe.chmod(0o755)
    run_dir = tmp_path / "run"
    # SLURM_EXACT=1: srun gives a step exactly the CPUs it asks for (newer Slurm defaults, many
    # site configs); without SRUN_CPUS_PER_TASK in train.sbatch each rank would get one CPU here.
    job = _submit(cluster, tmp_path, run_dir, {"PYTHON": str(probe), "SLURM_EXACT": "1"}, name="probe")
    result = cluster.wait(job, timeout=120)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), _job_logs(tmp_path)
    rows = [json.loads((run_dir / f"probe-rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["local"], r["host"]) for r in rows] == [(0, 2, 0, "node1"), (1, 2, 0, "node2")]
    assert {(r["master"], r["master_ip"]) for r in rows} == {("node1", cluster.address("node1"))}
    assert {r["port"] for r in rows} == {20000 + job % 20000}
    assert [(len(r["cpus"]), r["cpus_per_task"]) for r in rows] == [(2, "2"), (2, "2")], rows
    assert {r["exit_dir"] for r in rows} == {str(run_dir / "exit-reports" / f"job-{job}" / "restart-0")}


def test_stale_cluster_of_a_dead_session_is_cleaned(cluster):
    """A session killed before its teardown leaves daemons and namespaces; the next start ends them.
    (Its one-node cluster runs beside the module's one: separate folders, namespaces, munged.)"""
    code = (
        f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from slurm_cluster import SlurmCluster\n"
        "c = SlurmCluster(nodes=1); c.start()\n"
        "print(c.root, ','.join(c.namespaces), *[p.pid for p in c._procs.values()], flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait()
    assert line, "the child process could not start a cluster"
    root, namespaces, pids = Path(line[0]), line[1].split(","), [int(p) for p in line[2:]]
    assert len(pids) == 3 and all(_alive(p) for p in pids)  # munged, slurmctld, slurmd
    assert all(netns_pids(ns) for ns in namespaces[:2])  # slurmctld and slurmd inside
    orphan = "b2s0123abcdn1"  # a namespace whose folder is gone
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    clean_stale(root.parent)
    assert not root.exists()
    assert not any(_alive(p) for p in pids)
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listing for ns in [*namespaces, orphan]), listing
    assert all(ns in listing for ns in cluster.namespaces)  # a live session's cluster is left alone


# ---- train.sbatch's decisions, with a stand-in trainer ------------------------------------------

FAKE_TRAINER = '''\
#!{python}
"""Stand-in for `python launch/train.py ...` with the trainer's signal contract and no model."""
import argparse, os, signal, sys, time

p = argparse.ArgumentParser()
p.add_argument("script"); p.add_argument("--output-dir"); p.add_argument("--max-steps", type=int)
p.add_argument("--die-rank", type=int, default=-1)
args, _ = p.parse_known_args()
rank = int(os.environ["SLURM_PROCID"])
stop = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: stop.append(s))
print("start restart", os.environ.get("SLURM_RESTART_COUNT", "0"), flush=True)
for step in range(args.max_steps):
    time.sleep(0.1)
    if rank == args.die_rank and step == 3:
        os.kill(os.getpid(), signal.SIGKILL)   # as the OOM killer would: no report, no message
    if stop:
        sys.exit({exit_preempted})
print("done", flush=True)
'''


def _fake_trainer(tmp: Path) -> Path:
    path = tmp / "fake_python"
    path.write_text(FAKE_TRAINER.format(python=sys.executable, exit_preempted=EXIT_PREEMPTED))
    path.chmod(0o755)
    return path


def test_plain_scancel_does_not_requeue(cluster, tmp_path):
    env = {"PYTHON": str(_fake_trainer(tmp_path)), "EXTRA_ARGS": "--max-steps 3000"}
    job = _submit(cluster, tmp_path, tmp_path / "run", env, name="cancel")
    cluster.wait_running(job)
    _wait_for(
        lambda: "start" in _read(tmp_path / "run" / "logs" / f"cancel-{job}-rank1.log"),
        60,
        "rank 1 to start",
        lambda: _job_logs(tmp_path),
    )
    cluster.client(["scancel", str(job)], timeout=30)
    result = cluster.wait(job, timeout=60)
    assert result.state == "CANCELLED" and result.restarts == 0, _job_logs(tmp_path)


def test_a_rank_that_keeps_dying_is_requeued_max_restarts_times(cluster, tmp_path):
    """Rank 1 is SIGKILLed on node 2 in every attempt: srun ends rank 0 at once
    (--kill-on-bad-exit), the job is requeued MAX_RESTARTS=1 time, then fails."""
    env = {"PYTHON": str(_fake_trainer(tmp_path)), "EXTRA_ARGS": "--max-steps 3000 --die-rank 1", "MAX_RESTARTS": "1"}
    t0 = time.monotonic()
    job = _submit(cluster, tmp_path, tmp_path / "run", env, name="crashloop")
    result = cluster.wait(job, timeout=180)
    took = time.monotonic() - t0
    log = _read(tmp_path / f"crashloop-{job}.out")
    assert (result.state, result.exit_code, result.restarts) == ("FAILED", 1, 1), _job_logs(tmp_path)
    assert "failure 1 of at most MAX_RESTARTS=1" in log and "not requeued: 2 failed attempts" in log, log
    assert log.count("0 of 2 rank(s) reported") == 2, log  # killed ranks leave no report
    # Rank 0 would run 300 s; both attempts ended within seconds of rank 1's death.
    assert took < 120, f"{took:.0f} s"
    print(f"crash loop: 2 attempts + 1 requeue in {took:.1f} s")


# ---- the real trainer ----------------------------------------------------------------------------

STEPS, SAVE_STEPS, EVAL_STEPS = 48, 8, 24
N_TRAIN, N_VAL, N_TEST = 16, 48, 8
# Everything that decides the math, identical in every run below.
TRAIN_ARGS = (
    f"--max-steps {STEPS} --save-steps {SAVE_STEPS} --keep-last 10 --micro-batch 2 --seed 0 "
    f"--lr 1e-3 --warmup-steps 4 --num-workers 0 --heartbeat-timeout {HEARTBEAT} --dist-timeout 120"
)
# Evaluations long enough (one image per batch, 32 forced tokens: ~3 s) that a signal lands in one.
EVAL_ARGS = (
    f"--eval-steps {EVAL_STEPS} --eval-batch 1 --num-beams 1 --max-new-tokens 32 --min-length 32 --gallery-images 2"
)
WITH_EVAL = f"{TRAIN_ARGS} {EVAL_ARGS}"
NO_EVAL = f"{TRAIN_ARGS} --skip-eval"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from blip2_dist.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    write_synthetic(out, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, seed=0, samples_per_shard=4)
    return out


def _train_env(shards: Path, extra: str, **env) -> dict:
    return {"MODEL": "tiny-t5", "DATA": str(shards), "EXTRA_ARGS": extra, **env}


@pytest.fixture(scope="module")
def uninterrupted(cluster, shards, tmp_path_factory):
    """One uninterrupted two-node run with evaluations and the sample log: (result, run dir, tmp)."""
    tmp = tmp_path_factory.mktemp("slurm_train")
    run_dir = tmp / "run"
    job = _submit(cluster, tmp, run_dir, _train_env(shards, f"{WITH_EVAL} --sample-log"), name="train")
    result = cluster.wait(job, timeout=600)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 0), _job_logs(tmp)
    return result, run_dir, tmp


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final_state.json").read_text())


def _final_adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(got_dir: Path, want_dir: Path) -> None:
    got, want = _final_adapter(got_dir), _final_adapter(want_dir)
    assert sorted(got) == sorted(want) and got
    different = [k for k in want if not (got[k] == want[k]).all()]
    assert not different, f"adapter tensors differ from the uninterrupted run's: {different[:5]}"


def _expected_examples(split: str, n: int) -> Counter:
    from blip2_dist.data.synthetic import synthetic_sample

    samples = [synthetic_sample(0, split, i)[0] for i in range(n)]
    return Counter((s.image_id, c) for s in samples for c in s.captions)


def test_two_node_run_sees_every_sample_once_per_epoch(uninterrupted):
    _, run_dir, tmp = uninterrupted
    config = json.loads((run_dir / "config.json").read_text())
    assert [(r["rank"], r["host"], r["cpus"]) for r in config["ranks"]] == [(0, "node1", 2), (1, "node2", 2)]
    assert config["dropped_examples_per_epoch"] == 0
    per_epoch = config["plan"]["micro_per_epoch"]
    lines = {
        r: [json.loads(line) for line in _read(run_dir / "samples" / f"rank-{r}.jsonl").splitlines()] for r in (0, 1)
    }
    assert all(len(rows) == STEPS for rows in lines.values()), {r: len(v) for r, v in lines.items()}
    expected = _expected_examples("train", N_TRAIN)
    for epoch in range(STEPS // per_epoch):  # the complete epochs
        seen = {
            r: Counter(tuple(e) for row in rows if row["epoch"] == epoch for e in row["examples"])
            for r, rows in lines.items()
        }
        assert seen[0] + seen[1] == expected, f"epoch {epoch}: not every example exactly once"
        images = [{image for image, _ in seen[r]} for r in (0, 1)]
        assert images[0] and images[1] and not images[0] & images[1], "an image trained on both nodes"
    losses = _final(run_dir)["loss_history"]
    assert len(losses) == STEPS and sum(losses[-8:]) < sum(losses[:8]), losses


def test_two_node_evaluation_scores_every_image_once(uninterrupted):
    _, run_dir, _ = uninterrupted
    want = {image for image, _ in _expected_examples("val", N_VAL)}
    for step in (EVAL_STEPS, STEPS):
        results = json.loads((run_dir / "eval" / f"{step:08d}" / "results.json").read_text())
        assert results["images"] == N_VAL and set(results["per_image"]) == want
        predictions = json.loads((run_dir / "eval" / f"{step:08d}" / "predictions.json").read_text())
        assert set(predictions) == want and all(isinstance(p, str) for p in predictions.values())
        assert set(results["metrics"]) >= {"BLEU-4", "CIDEr", "METEOR", "ROUGE-L"}


def test_one_node_run_has_the_same_per_step_loss(cluster, shards, uninterrupted, tmp_path):
    """Same global batch (2 ranks x 2) and seed on one node: the node layout must not change the math."""
    _, run0, _ = uninterrupted
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, run_dir, _train_env(shards, NO_EVAL), name="onenode", shape=ONE_NODE)
    result = cluster.wait(job, timeout=600)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), _job_logs(tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    assert [(r["rank"], r["host"], r["cpus"]) for r in config["ranks"]] == [(0, "node1", 1), (1, "node1", 1)]
    assert _final(run_dir)["loss_history"] == _final(run0)["loss_history"]
    _assert_same_adapter(run_dir, run0)


def test_evaluate_sbatch_on_two_nodes(cluster, shards, uninterrupted, tmp_path):
    _, run0, _ = uninterrupted
    adapter = run0 / "checkpoints" / f"step_{STEPS:08d}" / "adapter"
    out = tmp_path / "eval"
    env = {
        "MODEL": "tiny-t5",
        "ADAPTER": str(adapter),
        "DATA": str(shards),
        "SPLIT": "test",
        "EXTRA_ARGS": "--num-beams 1 --max-new-tokens 8 --min-length 1 --num-workers 0",
    }
    job = _submit(cluster, tmp_path, out, env, name="eval", script=EVAL_SBATCH)
    result = cluster.wait(job, timeout=300)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), _job_logs(tmp_path)
    results = json.loads((out / "results.json").read_text())
    want = {image for image, _ in _expected_examples("test", N_TEST)}
    assert results["split"] == "test" and set(results["per_image"]) == want and results["metrics"]


def test_usr1_during_evaluation_requeues_and_resumes_to_the_same_run(cluster, shards, uninterrupted, tmp_path):
    _, run0, _ = uninterrupted
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, run_dir, _train_env(shards, WITH_EVAL), name="preempt")
    rank0_log = run_dir / "logs" / f"preempt-{job}-rank0.log"
    logs = lambda: _job_logs(tmp_path) + "\n" + cluster.logs()  # noqa: E731
    _wait_for(
        lambda: f"eval step {EVAL_STEPS} [val]: captioning" in _read(rank0_log),
        600,
        "the evaluation in the middle of the run",
        logs,
    )
    t0 = time.monotonic()
    cluster.scancel_signal(job, "USR1", batch=True)
    _wait_for(lambda: int(cluster.job_info(job).get("Restarts", 0)) >= 1, 120, "the requeue", logs)
    stopped_s = time.monotonic() - t0
    result = cluster.wait(job, timeout=600)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1), logs()

    config = json.loads((run_dir / "config.json").read_text())["train"]
    assert (config["resume"], config["output_dir"]) == ("auto", str(run_dir))  # what the script passes
    rank0 = _read(rank0_log)
    assert f"evaluation at step {EVAL_STEPS} interrupted by a stop signal" in rank0, rank0
    assert f"signal received: saving at step {EVAL_STEPS} and exiting with {EXIT_PREEMPTED}" in rank0, rank0
    assert rank0.count(f"eval step {EVAL_STEPS} [val]: captioning") == 2, rank0  # interrupted, then re-run
    batch_log = _read(tmp_path / f"preempt-{job}.out")
    for needle in ("got SIGUSR1", f"requeued job {job} (preempted: every rank saved)", "restart 0:", "restart 1:"):
        assert needle in batch_log, batch_log

    # The resumed run is the uninterrupted one: losses, the evaluations, the best and final adapters.
    assert _final(run_dir)["loss_history"] == _final(run0)["loss_history"]
    for step in (EVAL_STEPS, STEPS):
        got, want = (json.loads((r / "eval" / f"{step:08d}" / "results.json").read_text()) for r in (run_dir, run0))
        assert got["metrics"] == want["metrics"] and got["per_image"] == want["per_image"], step
    assert _read(run_dir / "best" / "metrics.json") == _read(run0 / "best" / "metrics.json")
    _assert_same_adapter(run_dir, run0)
    print(f"USR1 during an evaluation -> saved and requeued in {stopped_s:.1f} s")


def _trainer_pids(cluster: SlurmCluster, node: str) -> list[int]:
    pids = []
    for pid in cluster.node_pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"launch/train.py") for part in cmdline):
            pids.append(pid)
    return pids


def _first_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step_*/COMPLETE"))


def test_killed_rank_on_node2_ends_the_job_which_resumes_to_the_same_adapter(cluster, shards, uninterrupted, tmp_path):
    _, run0, _ = uninterrupted
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, run_dir, _train_env(shards, NO_EVAL), name="kill")
    logs = lambda: _job_logs(tmp_path) + "\n" + cluster.logs()  # noqa: E731
    _wait_for(lambda: _first_checkpoint(run_dir), 600, "the first checkpoint", logs)
    victims = _trainer_pids(cluster, "node2")
    assert victims, "no trainer process found on node2"
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, 9)
    _wait_for(lambda: int(cluster.job_info(job).get("Restarts", 0)) >= 1, 90, "the job to end and be requeued", logs)
    ended_s = time.monotonic() - t0
    result = cluster.wait(job, timeout=600)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1), logs()
    batch_log = _read(tmp_path / f"kill-{job}.out")
    assert f"requeued job {job} (a rank or node was lost; failure 1 of at most MAX_RESTARTS=3)" in batch_log, batch_log
    assert "resumed from" in _read(run_dir / "logs" / f"kill-{job}-rank0.log")
    assert _final(run_dir)["loss_history"] == _final(run0)["loss_history"]
    _assert_same_adapter(run_dir, run0)
    print(f"kill -9 on node2 -> job ended and requeued in {ended_s:.1f} s")


INJECT_FAULT = """\
#!/bin/bash
# Rank 1 (node 2) runs the real trainer with a train_step that raises at step 3; rank 0 is untouched.
if [ "$SLURM_PROCID" = 1 ]; then
    exec {python} -c '
import runpy, sys
import blip2_dist.train as train
real_step = train.train_step
def failing_step(engine, batch, state, cfg):
    if state.step == 3:
        raise ValueError("bad sample injected by the test on node 2")
    return real_step(engine, batch, state, cfg)
train.train_step = failing_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")' "$@"
fi
exec {python} "$@"
"""


def test_python_error_on_node2_fails_the_job_at_once_without_requeue(cluster, shards, tmp_path):
    wrapper = tmp_path / "python_with_fault"
    wrapper.write_text(INJECT_FAULT.format(python=sys.executable))
    wrapper.chmod(0o755)
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, run_dir, _train_env(shards, NO_EVAL, PYTHON=str(wrapper)), name="error")
    cluster.wait_running(job, timeout=120)
    t0 = time.monotonic()
    result = cluster.wait(job, timeout=300)
    logs = _job_logs(tmp_path)
    assert (result.state, result.exit_code, result.restarts) == ("FAILED", 1, 0), logs
    batch_log = _read(tmp_path / f"error-{job}.out")
    assert 'rank 1 failed: "ValueError: bad sample injected by the test on node 2"' in batch_log, batch_log
    assert "Traceback (most recent call last)" in batch_log and "in failing_step" in batch_log, batch_log
    assert "not requeued: an error on a rank fails the same way again" in batch_log, batch_log
    report = json.loads((run_dir / "exit-reports" / f"job-{job}" / "restart-0" / "rank-1.json").read_text())
    assert report["exit_code"] == 1
    print(f"Python error on node 2: job failed {time.monotonic() - t0:.1f} s after it started running")


def test_torchrun_across_two_nodes_trains_like_srun(cluster, shards, uninterrupted, tmp_path):
    """`torchrun --nnodes 2`, rendezvous on node 1, no Slurm: same losses as the srun run."""
    _, run0, _ = uninterrupted
    run_dir = tmp_path / "run"
    cmd = [
        str(BIN / "torchrun"),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node1:29400",
        "--rdzv-id",
        "blip2-test",
        str(REPO / "launch" / "train.py"),
        "--model",
        "tiny-t5",
        "--data",
        str(shards),
        "--output-dir",
        str(run_dir),
        *NO_EVAL.split(),
    ]
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for node in ("node1", "node2"):
        log = open(tmp_path / f"torchrun-{node}.log", "w")
        procs.append(cluster.exec_on(node, cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], _job_logs(tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    assert [(r["rank"], r["host"]) for r in config["ranks"]] == [(0, "node1"), (1, "node2")]
    assert _final(run_dir)["loss_history"] == _final(run0)["loss_history"]


def test_node_cut_off_fails_the_job_which_finishes_once_the_node_is_back(cluster, shards, uninterrupted, tmp_path):
    _, run0, _ = uninterrupted
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, run_dir, _train_env(shards, NO_EVAL), name="nodelost")
    logs = lambda: _job_logs(tmp_path) + "\n" + cluster.logs()  # noqa: E731
    _wait_for(lambda: _first_checkpoint(run_dir), 600, "the first checkpoint", logs)
    t0 = time.monotonic()
    cluster.set_link("node2", up=False)
    try:
        _wait_for(lambda: cluster.node_state("node2").startswith("down"), 120, "node2 to be DOWN", logs)
        _wait_for(lambda: int(cluster.job_info(job).get("Restarts", 0)) >= 1, 60, "the requeue", logs)
        down_s = time.monotonic() - t0
    finally:
        cluster.set_link("node2", up=True)
    seen: list = []
    result = cluster.wait(job, timeout=600, seen=seen)
    cluster.wait_nodes("idle", ["node2"], timeout=120)
    # A second requeue may follow: when node2 is back, Slurm ends what it still runs of the job's
    # first attempt by job id, which a requeued job keeps, and that can hit the new attempt's
    # step there (a failure like any other: bounded by MAX_RESTARTS).
    assert (result.state, result.exit_code) == ("COMPLETED", 0) and 1 <= result.restarts <= 2, logs()
    ctld_log = _read(cluster.root / "log" / "slurmctld.log")
    assert f"requeue job JobId={job} due to failure of node node2" in ctld_log, ctld_log[-3000:]
    batch_log = _read(tmp_path / f"nodelost-{job}.out")
    assert f"job {job} already requeued by Slurm" in batch_log or f"requeued job {job}" in batch_log, batch_log
    rank1_log = _read(run_dir / "logs" / f"nodelost-{job}-rank1.log")
    # The cut-off rank quit too: whichever its watchdog saw first, the store's silence or rank 0's.
    assert (
        "error: rank 1: no answer from the job's store" in rank1_log
        or "error: rank 1: rank(s) 0 silent for" in rank1_log
    ), rank1_log
    assert _final(run_dir)["loss_history"] == _final(run0)["loss_history"]
    _assert_same_adapter(run_dir, run0)
    print(f"node2 cut off -> DOWN and the job requeued in {down_s:.1f} s; states after: {seen}")
