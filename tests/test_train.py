"""The trainer end to end: real DeepSpeed ZeRO-2 engines, 2 CPU ranks (gloo), tiny models, synthetic shards.

One uninterrupted reference run (tiny-t5, bf16) is shared by several tests: loss falls, TensorBoard
scalars, checkpoints, best adapter, a 1-rank run with the same global batch, a SIGTERM'd run
resumed to the end, and standalone evaluation of the saved adapter.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from blip2_dist.checkpoint import COMPLETE
from launch_helpers import (
    REPO, explain, read_json, read_scalars, run, signal_workers, start, wait_for,
)

pytestmark = pytest.mark.slow

STEPS = 24
# Same data and schedule for every run below; only the launch shape changes.
COMMON = [
    "--max-steps", str(STEPS), "--save-steps", "8", "--keep-last", "5", "--lr", "3e-3",
    "--warmup-steps", "4", "--log-steps", "4", "--seed", "7", "--lora-r", "8",
    "--num-beams", "1", "--max-new-tokens", "12", "--min-length", "1", "--eval-batch", "16",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from blip2_dist.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, n_train=256, n_val=24, n_test=8, seed=0, samples_per_shard=100)
    return out


def train_args(shards, out, model="tiny-t5", micro=8, workers=1, accum=1, extra=()):
    return ["--deepspeed", "ds_configs/zero2.json", "--model", model, "--data", str(shards),
            "--output-dir", str(out), "--micro-batch", str(micro), "--num-workers", str(workers),
            "--grad-accum", str(accum), *COMMON, *extra]


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = run("launch/train.py", train_args(shards, out), nproc=2)
    assert proc.returncode == 0, explain(proc)
    return out


def _falls(losses, label, nats):
    head, tail = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert tail < head - nats, f"{label}: loss fell less than {nats}: first {losses[:4]} last {losses[-4:]}"


def test_loss_falls_t5_zero2_bf16_two_ranks(reference_run):
    final = read_json(reference_run / "final_state.json")
    assert final["step"] == STEPS and len(final["loss_history"]) == STEPS
    _falls(final["loss_history"], "tiny-t5", nats=1.0)
    resolved = read_json(reference_run / "config.json")
    assert resolved["deepspeed_resolved"]["bf16"]["enabled"] is True
    assert resolved["deepspeed_resolved"]["zero_optimization"]["stage"] == 2
    assert resolved["deepspeed_resolved"]["train_batch_size"] == 16
    assert resolved["world_size"] == 2


def test_loss_falls_opt_zero2_bf16_two_ranks(shards, tmp_path):
    # A random frozen OPT learns slowly through q/v alone: adapt the MLP too, as users of small
    # OPTs often do; ~0.45 nats fall in 24 steps here.
    extra = ["--skip-eval", "--lora-targets", "q_proj", "v_proj", "fc1", "fc2", "--lr", "1e-2", "--train-query-tokens"]
    proc = run("launch/train.py", train_args(shards, tmp_path, model="tiny-opt", micro=16, extra=extra), nproc=2)
    assert proc.returncode == 0, explain(proc)
    _falls(read_json(tmp_path / "final_state.json")["loss_history"], "tiny-opt", nats=0.3)


def test_tensorboard_scalars_written(reference_run):
    scalars = read_scalars(reference_run / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s",
                "perf/sec_per_step", "perf/data_wait_frac", "perf/peak_mem_gb", "eval/CIDEr", "eval/BLEU-4"):
        assert tag in scalars, f"{tag} missing from TensorBoard; have {sorted(scalars)}"
    losses = read_json(reference_run / "final_state.json")["loss_history"]
    logged = dict(scalars["train/loss"])
    assert logged[STEPS] == pytest.approx(losses[STEPS - 1], rel=1e-5)
    lrs = [v for _, v in scalars["train/lr"]]
    assert max(lrs) == pytest.approx(3e-3, rel=0.05) and lrs[-1] < max(lrs)  # warm-up then cosine


def test_checkpoints_best_and_eval_outputs(reference_run):
    ckpts = reference_run / "checkpoints"
    done = sorted(p.name for p in ckpts.iterdir() if (p / COMPLETE).exists())
    assert done == ["step_00000008", "step_00000016", "step_00000024"]
    assert (ckpts / "latest").read_text().strip() == "step_00000024"
    assert (ckpts / "step_00000024" / "adapter" / "adapter_config.json").exists()
    best = reference_run / "best"
    assert (best / "adapter_config.json").exists() and "CIDEr" in read_json(best / "metrics.json")
    results = read_json(reference_run / "eval" / f"{STEPS:08d}" / "results.json")
    assert results["images"] == 24 and set(results["metrics"]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert (reference_run / "eval" / f"{STEPS:08d}" / "gallery.html").stat().st_size > 1000


def test_one_rank_matches_two_ranks_same_global_batch(shards, reference_run, tmp_path):
    # 1 rank x 2 workers x accumulation 2 reads the same two data slots per step as 2 ranks x 1 worker.
    proc = run("launch/train.py", train_args(shards, tmp_path, workers=2, accum=2, extra=["--skip-eval"]), nproc=1)
    assert proc.returncode == 0, explain(proc)
    one = read_json(tmp_path / "final_state.json")["loss_history"]
    two = read_json(reference_run / "final_state.json")["loss_history"]
    assert one == pytest.approx(two, rel=3e-2, abs=3e-2)  # bf16 tolerance: reduction order differs


def test_sigterm_saves_then_resume_equals_uninterrupted(shards, reference_run, tmp_path):
    log = tmp_path / "first.log"
    proc = start("launch/train.py", train_args(shards, tmp_path), nproc=2, log=log)
    wait_for(tmp_path / "checkpoints" / "step_00000008" / COMPLETE, timeout=400, proc=proc)
    assert signal_workers(proc, "launch/train.py", signal.SIGTERM) == 2
    assert proc.wait(timeout=300) == 75, log.read_text()[-4000:]
    saved = read_json(tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
                      / "train_state.json")
    assert 8 <= saved["step"] < STEPS
    proc = run("launch/train.py", train_args(shards, tmp_path, extra=["--resume", "auto"]), nproc=2)
    assert proc.returncode == 0, explain(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = read_json(tmp_path / "final_state.json")["loss_history"]
    reference = read_json(reference_run / "final_state.json")["loss_history"]
    assert resumed == reference  # bf16, per-step dropout seeds, restored data position: exact


def test_resume_from_explicit_path(shards, reference_run, tmp_path):
    shutil.copytree(reference_run / "checkpoints" / "step_00000016", tmp_path / "from" / "step_00000016")
    proc = run("launch/train.py", train_args(
        shards, tmp_path / "run", extra=["--resume", str(tmp_path / "from" / "step_00000016"), "--skip-eval"]), nproc=2)
    assert proc.returncode == 0, explain(proc)
    resumed = read_json(tmp_path / "run" / "final_state.json")["loss_history"]
    assert resumed == read_json(reference_run / "final_state.json")["loss_history"]


def test_resume_with_another_launch_shape(shards, reference_run, tmp_path):
    # 2 ranks -> 1 rank: the epoch is twice as long per rank; the run continues at the same fraction.
    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    proc = run("launch/train.py", train_args(shards, tmp_path, extra=["--resume", "auto", "--skip-eval"]), nproc=1)
    assert proc.returncode == 0, explain(proc)
    assert "launch shape changed" in proc.stdout and "optimizer moments restart" in proc.stdout
    final = read_json(tmp_path / "final_state.json")
    assert final["step"] == STEPS and len(final["loss_history"]) == STEPS


def test_standalone_evaluate_reproduces_training_eval(shards, reference_run, tmp_path):
    adapter = reference_run / "checkpoints" / "step_00000024" / "adapter"
    proc = run("launch/evaluate.py", ["--model", "tiny-t5", "--adapter", str(adapter), "--data", str(shards),
                                      "--split", "val", "--output-dir", str(tmp_path), "--num-beams", "1",
                                      "--max-new-tokens", "12", "--min-length", "1", "--eval-batch", "16"], nproc=2)
    assert proc.returncode == 0, explain(proc)
    standalone = read_json(tmp_path / "predictions.json")
    in_training = read_json(reference_run / "eval" / f"{STEPS:08d}" / "predictions.json")
    assert standalone == in_training


def test_bad_arguments_fail_fast(shards, tmp_path):
    proc = run("launch/train.py", ["--model", "tiny-t5", "--data", str(tmp_path / "none"), "--output-dir",
                                   str(tmp_path / "o")], nproc=1, timeout=120)
    assert proc.returncode != 0 and "no manifest" in proc.stderr
    proc = run("launch/train.py", train_args(shards, tmp_path / "o", extra=["--deepspeed", "nope.json"]),
               nproc=1, timeout=120)
    assert proc.returncode != 0 and "nope.json not found" in proc.stderr


def test_caption_command_on_trained_adapter(reference_run, shards, tmp_path):
    import tarfile

    with tarfile.open(sorted(shards.glob("test-*.tar"))[0]) as tar:
        jpgs = [m for m in tar if m.name.endswith(".jpg")][:3]
        for m in jpgs:
            (tmp_path / m.name).write_bytes(tar.extractfile(m).read())
    (tmp_path / "broken.jpg").write_bytes((tmp_path / jpgs[0].name).read_bytes()[:200])  # truncated
    args = ["--model", "tiny-t5", "--adapter", str(reference_run / "best"), "--num-beams", "1",
            "--max-new-tokens", "8", "--min-length", "1", "--batch-size", "2"]
    proc = run("launch/caption.py", [*args, str(tmp_path)], nproc=1, timeout=300)
    assert proc.returncode == 1, explain(proc)  # one image failed
    lines = [l.split("\t") for l in proc.stdout.strip().splitlines()]
    assert sorted(p.rsplit("/", 1)[1] for p, _ in lines) == sorted(m.name for m in jpgs)
    assert all(caption.strip() for _, caption in lines)
    assert "broken.jpg" in proc.stderr
    good = str(tmp_path / jpgs[0].name)
    proc = run("launch/caption.py", [*args, "--json", good, str(tmp_path / "syn-test-*.jpg")], nproc=1, timeout=300)
    assert proc.returncode == 0, explain(proc)
    rows = [json.loads(l) for l in proc.stdout.strip().splitlines()]
    assert rows[0]["path"] == good and len(rows) == 1 + len(jpgs)
    proc = run("launch/caption.py", [*args, str(tmp_path / "missing.jpg")], nproc=1, timeout=300)
    assert proc.returncode == 2 and "missing.jpg" in proc.stderr


def test_nonfinite_loss_stops_with_the_step_named(shards, tmp_path):
    # An absurd learning rate drives the weights to inf within a few steps.
    extra = ["--lr", "1e30", "--warmup-steps", "0", "--max-grad-norm", "0", "--skip-eval"]
    proc = run("launch/train.py", train_args(shards, tmp_path, extra=extra), nproc=1, timeout=300)
    assert proc.returncode == 1, explain(proc)
    assert "non-finite loss at step" in proc.stderr and "--max-nonfinite 0" in proc.stderr
    proc = run("launch/train.py", train_args(shards, tmp_path / "skip", extra=[*extra, "--max-nonfinite", "1000"]),
               nproc=1, timeout=300)
    assert proc.returncode == 0, explain(proc)
    assert "micro-batch skipped" in proc.stdout


def test_activation_checkpointing_and_unfused_adamw_match_the_plain_run(shards, tmp_path):
    # Checkpointing recomputes activations; it must not change the numbers (fp32: no bf16 noise).
    fp32 = tmp_path / "fp32.json"
    fp32.write_text(json.dumps({**read_json(REPO / "ds_configs/zero2.json"), "bf16": {"enabled": False}}))
    base = ["--deepspeed", str(fp32), "--max-steps", "4", "--skip-eval", "--fused-adamw", "off"]
    plain = run("launch/train.py", train_args(shards, tmp_path / "a", extra=base), nproc=1, timeout=300)
    ckpt = run("launch/train.py", train_args(shards, tmp_path / "b", extra=[*base, "--grad-checkpointing"]),
               nproc=1, timeout=300)
    assert plain.returncode == 0 and ckpt.returncode == 0, explain(ckpt)
    a = read_json(tmp_path / "a" / "final_state.json")["loss_history"]
    b = read_json(tmp_path / "b" / "final_state.json")["loss_history"]
    assert len(a) == 4 and b == pytest.approx(a, rel=1e-5)
