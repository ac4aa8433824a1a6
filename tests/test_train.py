"""The trainer end to end: real DeepSpeed ZeRO-2 engines, 2 CPU ranks (gloo), tiny models, synthetic shards.

One uninterrupted reference run (tiny-t5, bf16, a prompt, evaluations at steps 8, 16, 24) is shared by
several tests: loss falls, TensorBoard (scalars, HParams, layout, gallery, read back with TensorBoard's
reader), validation loss, checkpoints, best adapter and its model card, a 1-rank run with the same global
batch, a SIGTERM'd run resumed to the end, standalone evaluation and captioning with the recorded
settings, the progress bar in a log file, and a merged export of the trained adapter.
"""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
from launch_helpers import (
    REPO,
    explain,
    load_launch,
    read_json,
    read_scalars,
    run,
    signal_workers,
    start,
    wait_for,
)

from blip2_dist.checkpoint import COMPLETE

pytestmark = pytest.mark.slow

STEPS = 24
# Same data and schedule for every run below; only the launch shape changes.
COMMON = [
    "--max-steps",
    str(STEPS),
    "--save-steps",
    "8",
    "--keep-last",
    "5",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "4",
    "--log-steps",
    "4",
    "--seed",
    "7",
    "--lora-r",
    "8",
    "--num-beams",
    "1",
    "--max-new-tokens",
    "12",
    "--min-length",
    "1",
    "--eval-batch",
    "16",
    "--prompt",
    "a picture of",
]
EVAL_STEPS = 8  # the reference run evaluates at 8, 16 and 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from blip2_dist.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, n_train=256, n_val=24, n_test=8, seed=0, samples_per_shard=100)
    return out


def train_args(shards, out, model="tiny-t5", micro=8, workers=1, accum=1, extra=()):
    return [
        "--deepspeed",
        "ds_configs/zero2.json",
        "--model",
        model,
        "--data",
        str(shards),
        "--output-dir",
        str(out),
        "--micro-batch",
        str(micro),
        "--num-workers",
        str(workers),
        "--grad-accum",
        str(accum),
        *COMMON,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    start = time.monotonic()
    proc = run("launch/train.py", train_args(shards, out, extra=["--eval-steps", str(EVAL_STEPS)]), nproc=2)
    assert proc.returncode == 0, explain(proc)
    (out.parent / "ref-launch.json").write_text(
        json.dumps({"stderr": proc.stderr, "stdout": proc.stdout, "wall_s": time.monotonic() - start})
    )
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
    scalars = read_scalars(reference_run / "tensorboard" / "training")
    for tag in (
        "Train/loss",
        "Train/lr",
        "optim/grad_norm",
        "perf/captions_per_s",
        "perf/tokens_per_s",
        "perf/sec_per_step",
        "perf/data_wait_frac",
        "memory/host_peak_rss_gib",
        "progress/epoch",
        "Val/CIDEr",
        "Val/BLEU-4",
        "Val/loss",
        "best/CIDEr",
        "best/step",
    ):
        assert tag in scalars, f"{tag} missing from TensorBoard; have {sorted(scalars)}"
    assert not [t for t in scalars if t.startswith("memory/device")]  # CPU run: no device memory to report
    assert "perf/samples_per_s" not in scalars and "perf/peak_mem_gb" not in scalars
    losses = read_json(reference_run / "final_state.json")["loss_history"]
    logged = dict(scalars["Train/loss"])
    # The mean over the log window (--log-steps 4), not the last step's loss.
    assert logged[STEPS] == pytest.approx(sum(losses[STEPS - 4 :]) / 4, rel=1e-6)
    assert logged[8] == pytest.approx(sum(losses[4:8]) / 4, rel=1e-6) and logged[1] == pytest.approx(losses[0])
    lrs = [v for _, v in scalars["Train/lr"]]
    assert max(lrs) == pytest.approx(3e-3, rel=0.05) and lrs[-1] < max(lrs)  # warm-up then cosine
    assert 0 < dict(scalars["memory/host_peak_rss_gib"])[STEPS] < 64  # GiB: a process, not bytes or KiB
    # TensorBoard sorts tag groups case-sensitively and opens the first two: training, then evaluation.
    assert sorted({t.split("/")[0] for t in scalars})[:2] == ["Train", "Val"]


def test_validation_loss_at_every_eval_step(reference_run):
    val = dict(read_scalars(reference_run / "tensorboard" / "training")["Val/loss"])
    assert sorted(val) == [8, 16, 24]
    for step, value in val.items():
        results = read_json(reference_run / "eval" / f"{step:08d}" / "results.json")
        assert value == pytest.approx(results["metrics"]["loss"], rel=1e-6)
        assert results["loss"]["captions"] == 24 * 5  # every reference caption of the 24 images, once
    assert val[24] < val[8] - 0.3  # the model learnt the captions


def test_hparams_layout_and_gallery_in_tensorboard(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(reference_run / "tensorboard" / "training"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    hp = {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in acc.PluginTagToContent("hparams").items()
    }
    settings = {
        k: v.number_value or v.string_value
        for k, v in hp["_hparams_/session_start_info"].session_start_info.hparams.items()
    }
    assert settings["lr"] == pytest.approx(3e-3) and settings["lora_r"] == 8 and settings["model"] == "tiny-t5"
    assert settings["global_batch"] == 16 and settings["world_size"] == 2 and settings["prompt"] == "a picture of"
    metrics = {m.name.tag for m in hp["_hparams_/experiment"].experiment.metric_infos}
    assert {"best/CIDEr", "best/loss", "best/step", "Train/loss"} <= metrics
    assert hp["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS: the run finished
    assert acc.PluginTagToContent("custom_scalars")  # the layout: train and validation loss in one chart
    cards = [t for t in acc.Tags()["images"] if t.startswith("gallery/Val/")]
    assert len(cards) == 24  # every gallery image (--gallery-images 24), not 4
    steps = [e.step for e in acc.Images(cards[0])]
    assert steps == [8, 16, 24] and acc.Images(cards[0])[-1].width == 320
    from tensorboard.util import tensor_util

    table = [e for e in acc.Tensors("gallery/Val/text_summary")][-1]
    text = tensor_util.make_ndarray(table.tensor_proto).item().decode()
    assert "**evaluated** step 24" in text and "| image | generated | CIDEr | references |" in text
    assert "'a picture of'" in text and "num_beams=1" in text


def test_progress_bar_is_not_redrawn_every_step_in_a_log_file(reference_run):
    launch = read_json(reference_run.parent / "ref-launch.json")
    draws = launch["stderr"].count("train:")
    # stderr is a pipe here, as in a Slurm log: a redraw every 30 s plus the first and the last.
    assert 2 <= draws <= 3 + launch["wall_s"] / 30, draws


def test_checkpoints_best_and_eval_outputs(reference_run):
    ckpts = reference_run / "checkpoints"
    done = sorted(p.name for p in ckpts.iterdir() if (p / COMPLETE).exists())
    assert done == ["step_00000008", "step_00000016", "step_00000024"]
    assert (ckpts / "latest").read_text().strip() == "step_00000024"
    assert (ckpts / "step_00000024" / "adapter" / "adapter_config.json").exists()
    listed = read_json(ckpts / "step_00000024" / COMPLETE)["files"]  # what resume checks before loading
    assert {"mp_rank_00_model_states.pt", "train_state.json", "adapter/adapter_config.json"} <= set(listed)
    assert listed["train_state.json"] == (ckpts / "step_00000024" / "train_state.json").stat().st_size
    best = reference_run / "best"
    assert (best / "adapter_config.json").exists() and "CIDEr" in read_json(best / "metrics.json")
    assert (reference_run / "gallery.html").read_text().count("<th><a href='eval/") == 3  # one column a step
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
    saved = read_json(
        tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip() / "train_state.json"
    )
    assert 8 <= saved["step"] < STEPS
    proc = run("launch/train.py", train_args(shards, tmp_path, extra=["--resume", "auto"]), nproc=2)
    assert proc.returncode == 0, explain(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = read_json(tmp_path / "final_state.json")["loss_history"]
    reference = read_json(reference_run / "final_state.json")["loss_history"]
    assert resumed == reference  # bf16, per-step dropout seeds, restored data position: exact


def test_resume_from_explicit_path(shards, reference_run, tmp_path):
    shutil.copytree(reference_run / "checkpoints" / "step_00000016", tmp_path / "from" / "step_00000016")
    proc = run(
        "launch/train.py",
        train_args(
            shards, tmp_path / "run", extra=["--resume", str(tmp_path / "from" / "step_00000016"), "--skip-eval"]
        ),
        nproc=2,
    )
    assert proc.returncode == 0, explain(proc)
    resumed = read_json(tmp_path / "run" / "final_state.json")["loss_history"]
    assert resumed == read_json(reference_run / "final_state.json")["loss_history"]


def test_resume_auto_passes_over_an_unusable_checkpoint_loudly(shards, reference_run, tmp_path):
    # The newest checkpoint lost its COMPLETE marker (as after a crash mid-save) and `latest` names
    # it: auto resumes from the one before and says so, and the unusable one is never deleted
    # (its folder is moved aside when the run saves that step again).
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", ckpts)
    (ckpts / "step_00000024" / COMPLETE).unlink()
    proc = run("launch/train.py", train_args(shards, tmp_path, extra=["--resume", "auto", "--skip-eval"]), nproc=2)
    assert proc.returncode == 0, explain(proc)
    said = proc.stdout + proc.stderr
    assert f"checkpoint {ckpts / 'step_00000024'} has no COMPLETE marker" in said
    assert f"--resume auto: resuming from {ckpts / 'step_00000016'}" in said
    assert f"moved to {ckpts / 'step_00000024.aside-1'} (not deleted)" in said
    assert (ckpts / "step_00000024.aside-1" / "mp_rank_00_model_states.pt").is_file()
    assert (ckpts / "step_00000024" / COMPLETE).is_file()
    resumed = read_json(tmp_path / "final_state.json")["loss_history"]
    assert resumed == read_json(reference_run / "final_state.json")["loss_history"]


def test_resume_from_a_damaged_checkpoint_names_it(shards, reference_run, tmp_path):
    ckpt = tmp_path / "from" / "step_00000016"
    shutil.copytree(reference_run / "checkpoints" / "step_00000016", ckpt)
    states = ckpt / "mp_rank_00_model_states.pt"
    states.write_bytes(b"\0" * states.stat().st_size)  # same size: only loading it can tell
    proc = run(
        "launch/train.py",
        train_args(shards, tmp_path / "run", extra=["--resume", str(ckpt), "--skip-eval"]),
        nproc=1,
        timeout=300,
    )
    assert proc.returncode == 1, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint {ckpt} cannot be loaded ("), errors
    assert "Traceback" not in proc.stderr and states.stat().st_size > 0  # reported, left as it was


def test_resume_with_another_launch_shape(shards, reference_run, tmp_path):
    # 2 ranks -> 1 rank: the epoch is twice as long per rank; the run continues at the same fraction.
    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    proc = run("launch/train.py", train_args(shards, tmp_path, extra=["--resume", "auto", "--skip-eval"]), nproc=1)
    assert proc.returncode == 0, explain(proc)
    assert "launch shape changed" in proc.stdout and "optimizer moments restart" in proc.stdout
    final = read_json(tmp_path / "final_state.json")
    assert final["step"] == STEPS and len(final["loss_history"]) == STEPS


def test_standalone_evaluate_reproduces_training_eval(shards, reference_run, tmp_path):
    # No --prompt and no generation flags: the adapter's recorded ones reproduce the training evaluation.
    adapter = reference_run / "checkpoints" / "step_00000024" / "adapter"
    proc = run(
        "launch/evaluate.py",
        [
            "--adapter",
            str(adapter),
            "--data",
            str(shards),
            "--split",
            "val",
            "--output-dir",
            str(tmp_path),
            "--eval-batch",
            "16",
        ],
        nproc=2,
    )
    assert proc.returncode == 0, explain(proc)
    assert "warning" not in proc.stdout + proc.stderr.replace("warnings.warn", "")
    standalone = read_json(tmp_path / "predictions.json")
    in_training = read_json(reference_run / "eval" / f"{STEPS:08d}" / "predictions.json")
    assert standalone == in_training
    results = read_json(tmp_path / "results.json")
    assert results["prompt"] == "a picture of" and results["step"] == STEPS
    training = read_json(reference_run / "eval" / f"{STEPS:08d}" / "results.json")
    assert results["metrics"]["loss"] == pytest.approx(training["metrics"]["loss"], rel=1e-6)


def test_bad_arguments_fail_fast(shards, tmp_path):
    proc = run(
        "launch/train.py",
        ["--model", "tiny-t5", "--data", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")],
        nproc=1,
        timeout=120,
    )
    assert proc.returncode == 1 and f"error: --data: {tmp_path / 'none'}: not found (no manifest" in proc.stderr
    proc = run(
        "launch/train.py", train_args(shards, tmp_path / "o", extra=["--deepspeed", "nope.json"]), nproc=1, timeout=120
    )
    assert proc.returncode != 0 and "nope.json not found" in proc.stderr


def test_caption_command_on_trained_adapter(reference_run, shards, tmp_path):
    import tarfile

    with tarfile.open(sorted(shards.glob("test-*.tar"))[0]) as tar:
        jpgs = [m for m in tar if m.name.endswith(".jpg")][:3]
        for m in jpgs:
            (tmp_path / m.name).write_bytes(tar.extractfile(m).read())
    (tmp_path / "broken.jpg").write_bytes((tmp_path / jpgs[0].name).read_bytes()[:200])  # truncated
    last = reference_run / "checkpoints" / f"step_{STEPS:08d}" / "adapter"  # best/ may be an early, weak one
    args = [
        "--model",
        "tiny-t5",
        "--adapter",
        str(last),
        "--num-beams",
        "1",
        "--max-new-tokens",
        "8",
        "--min-length",
        "1",
        "--batch-size",
        "2",
    ]
    proc = run("launch/caption.py", [*args, str(tmp_path)], nproc=1, timeout=300)
    assert proc.returncode == 1, explain(proc)  # one image failed
    assert "max_new_tokens=8 differs from the recorded max_new_tokens=12" in proc.stderr
    lines = [line.split("\t", 1) for line in proc.stdout.splitlines() if line.strip()]
    assert sorted(p.rsplit("/", 1)[1] for p, _ in lines) == sorted(m.name for m in jpgs)
    assert all(caption.strip() for _, caption in lines)
    assert "broken.jpg" in proc.stderr
    good = str(tmp_path / jpgs[0].name)
    proc = run("launch/caption.py", [*args, "--json", good, str(tmp_path / "syn-test-*.jpg")], nproc=1, timeout=300)
    assert proc.returncode == 0, explain(proc)
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert rows[0]["path"] == good and len(rows) == 1 + len(jpgs)
    proc = run("launch/caption.py", [*args, str(tmp_path / "missing.jpg")], nproc=1, timeout=300)
    assert proc.returncode == 2 and "missing.jpg" in proc.stderr


def test_nonfinite_loss_stops_with_the_step_named(shards, tmp_path):
    # An absurd learning rate drives the weights to inf within a few steps.
    extra = ["--lr", "1e30", "--warmup-steps", "0", "--max-grad-norm", "0", "--skip-eval"]
    proc = run("launch/train.py", train_args(shards, tmp_path, extra=extra), nproc=1, timeout=300)
    assert proc.returncode == 1, explain(proc)
    assert "non-finite loss at step" in proc.stderr and "--max-nonfinite 0" in proc.stderr
    proc = run(
        "launch/train.py",
        train_args(shards, tmp_path / "skip", extra=[*extra, "--max-nonfinite", "1000"]),
        nproc=1,
        timeout=300,
    )
    assert proc.returncode == 0, explain(proc)
    assert "micro-batch skipped" in proc.stdout


def test_activation_checkpointing_and_unfused_adamw_match_the_plain_run(shards, tmp_path):
    # Checkpointing recomputes activations; it must not change the numbers (fp32: no bf16 noise).
    fp32 = tmp_path / "fp32.json"
    fp32.write_text(json.dumps({**read_json(REPO / "ds_configs/zero2.json"), "bf16": {"enabled": False}}))
    base = ["--deepspeed", str(fp32), "--max-steps", "4", "--skip-eval", "--fused-adamw", "off"]
    plain = run("launch/train.py", train_args(shards, tmp_path / "a", extra=base), nproc=1, timeout=300)
    ckpt = run(
        "launch/train.py",
        train_args(shards, tmp_path / "b", extra=[*base, "--grad-checkpointing"]),
        nproc=1,
        timeout=300,
    )
    assert plain.returncode == 0 and ckpt.returncode == 0, explain(ckpt)
    a = read_json(tmp_path / "a" / "final_state.json")["loss_history"]
    b = read_json(tmp_path / "b" / "final_state.json")["loss_history"]
    assert len(a) == 4 and b == pytest.approx(a, rel=1e-5)


def test_best_adapter_records_settings_and_has_a_model_card(reference_run):
    best = reference_run / "best"
    meta = read_json(best / "blip2_dist_adapter.json")
    step = read_json(best / "metrics.json")["step"]
    assert meta["step"] == step and meta["caption_format"]["prompt"] == "a picture of"
    assert meta["caption_format"]["end_of_caption"] == "</s>"
    assert meta["generation"] == {
        "num_beams": 1,
        "max_new_tokens": 12,
        "min_new_tokens": 1,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
    }
    assert meta["metrics"]["split"] == "val" and meta["metrics"]["step"] == step
    assert meta["metrics"]["values"]["CIDEr"] == read_json(best / "metrics.json")["CIDEr"]
    assert meta["training"]["global_batch"] == 16 and "--max-steps 24" in meta["training"]["command"]
    card = (best / "README.md").read_text()
    for needle in (
        "tiny-t5",
        "trained on split `train`",
        "evaluated on `val`",
        "r=8, alpha=32",
        '"a picture of"',
        "num_beams=1",
        "Split `val`",
        f"step {step}",
        "launch/train.py --deepspeed",
        "| CIDEr |",
    ):
        assert needle in card, needle
    # A checkpoint's adapter is carded too; metrics only when that step was evaluated.
    assert (
        "Not evaluated at this step"
        not in (reference_run / "checkpoints" / "step_00000016" / "adapter" / "README.md").read_text()
    )


def test_early_stop_all_ranks_together_best_kept(shards, tmp_path):
    # lr 1e-30 (0 is refused by the range check): every update is far below the weights' and activations'
    # rounding, so the evaluation at step 2 is no better than the one at step 1 (the loss, lower is better,
    # is equal); patience 1 stops both ranks at step 2 of 20, best/ from step 1.
    extra = [
        "--lr",
        "1e-30",
        "--eval-steps",
        "1",
        "--early-stop-patience",
        "1",
        "--best-metric",
        "loss",
        "--max-eval-images",
        "2",
        "--max-steps",
        "20",
        "--save-steps",
        "100",
        "--num-workers",
        "0",
    ]
    proc = run("launch/train.py", train_args(shards, tmp_path, micro=4, extra=extra), nproc=2, timeout=600)
    assert proc.returncode == 0, explain(proc)
    assert "early stop at step 2: no better loss in 1 evaluations" in proc.stdout
    assert (proc.stdout + proc.stderr).count("exits successfully") == 2  # both ranks ended together
    final = read_json(tmp_path / "final_state.json")
    assert final["stopped_early"] is True and final["step"] == 2 and final["best_step"] == 1
    assert read_json(tmp_path / "best" / "metrics.json")["step"] == 1
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["00000001", "00000002"]  # none after it
    assert (tmp_path / "checkpoints" / "step_00000002" / COMPLETE).exists()


def test_early_stop_flag_checks_and_direction():
    from blip2_dist.checks import improved, validate_eval_plan
    from blip2_dist.config import parse_config

    for flags, message in (
        (["--early-stop-patience", "2"], "needs --eval-steps"),
        (["--early-stop-patience", "2", "--eval-steps", "5", "--skip-eval"], "no --skip-eval"),
        (["--early-stop-patience", "-1"], ">= 0"),
        (["--best-metric", "cider"], "--best-metric 'cider' is not one of"),
    ):
        with pytest.raises(ValueError, match=message):
            validate_eval_plan(parse_config(flags, "t"))
    validate_eval_plan(parse_config(["--early-stop-patience", "2", "--eval-steps", "5"], "t"))
    assert improved("loss", 1.0, 2.0) and not improved("loss", 2.0, 1.0) and not improved("loss", 1.0, 1.0)
    assert improved("CIDEr", 2.0, 1.0) and not improved("CIDEr", 1.0, 1.0) and improved("CIDEr", 0.0, None)


def test_export_of_the_trained_adapter_captions_like_it(reference_run, shards, tmp_path, capsys):
    import tarfile

    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    with tarfile.open(sorted(shards.glob("test-*.tar"))[0]) as tar:
        for m in [m for m in tar if m.name.endswith(".jpg")][:4]:
            (tmp_path / m.name).write_bytes(tar.extractfile(m).read())
    images = sorted(tmp_path.glob("*.jpg"))
    out, adapter = tmp_path / "merged", reference_run / "checkpoints" / f"step_{STEPS:08d}" / "adapter"
    # The commands' main() in this process (test_export.py runs the plain side in a fresh interpreter).
    assert load_launch("export").main(["--adapter", str(adapter), "--out", str(out), "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert load_launch("caption").main(["--adapter", str(adapter), "--dtype", "float32", *map(str, images)]) == 0
    ours = [line.split("\t", 1)[1] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(ours) == len(images) and any(ours)
    model = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    inputs = processor(
        images=[Image.open(p).convert("RGB") for p in images], text=["a picture of"] * len(images), return_tensors="pt"
    )
    with torch.no_grad():
        ids = model.generate(**inputs, generation_config=model.generation_config)
    assert [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)] == ours
