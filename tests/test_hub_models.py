"""Every command on checkpoints shaped like the hub's (tests/hub_checkpoints.py), through `--model DIR`.

Two training runs, each shared by several tests (module fixtures), on shards where every image has the
same caption:
  opt_run   launch/train.py, 2 ranks, the OPT checkpoint, a DeepSpeed JSON without a scheduler section,
            ZeRO-2 bf16 with fp32 gradient reduction and accumulation, 2 micro-batches per step. The
            folder where the final evaluation writes its results is blocked by a file, so rank 0's
            evaluation fails after the final save: the run must keep that checkpoint and end every rank.
            launch/evaluate.py and launch/caption.py then caption with the checkpoint's adapter.
  t5_probe  the trainer with observers (tests/train_probe.py), 1 rank, the FLAN-T5 checkpoint,
            --grad-checkpointing, one evaluation half-way and one at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
from launch_helpers import REPO, command, cpu_env, explain, read_json, read_scalars, run

from blip2_dist.checkpoint import COMPLETE
from blip2_dist.data.shards import Sample, ShardWriter
from blip2_dist.data.synthetic import draw_scene, encode_jpeg, make_scene

pytestmark = pytest.mark.slow

CAPTION = "a small brown dog runs across the green grass near a white fence"
STEPS = 80
WARMUP = 5
COMMON = [
    "--max-steps",
    str(STEPS),
    "--lr",
    "2e-2",
    "--warmup-steps",
    str(WARMUP),
    "--seed",
    "3",
    "--save-steps",
    "1000",
    "--num-beams",
    "1",
    "--max-new-tokens",
    "30",
    "--min-length",
    "1",
    "--eval-batch",
    "4",
    "--num-workers",
    "0",
    "--log-steps",
    "1",
]


@pytest.fixture(scope="module")
def one_caption(tmp_path_factory):
    """32 train, 4 val and 4 test images (synthetic scenes), every one captioned CAPTION."""
    out = tmp_path_factory.mktemp("one_caption")
    with ShardWriter(out / "shards", 16, source={"layout": "test", "path": "one caption"}) as writer:
        for split, n in (("train", 32), ("val", 4), ("test", 4)):
            for i in range(n):
                jpeg = encode_jpeg(draw_scene(make_scene(0, split, i), 64))
                writer.write(Sample(f"{split}_{i:03d}", split, [CAPTION], jpeg))
                if split == "test":
                    (out / "photos").mkdir(exist_ok=True)
                    (out / "photos" / f"{i}.jpg").write_bytes(jpeg)
    return out


def no_scheduler_config(tmp_path) -> str:
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    del ds["scheduler"]
    path = tmp_path / "zero2_no_scheduler.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.fixture(scope="module")
def opt_run(hub_opt_dir, one_caption, tmp_path_factory):
    """(run folder, launcher exit code, seconds from the final checkpoint to the last rank's end, output)."""
    out = tmp_path_factory.mktemp("opt_run")
    run_dir = out / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / f"{STEPS:08d}").write_text("a file where the final evaluation's folder would go\n")
    args = [
        "--deepspeed",
        no_scheduler_config(out),
        "--model",
        str(hub_opt_dir),
        "--data",
        str(one_caption / "shards"),
        "--output-dir",
        str(run_dir),
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        *COMMON,
    ]
    log = out / "log.txt"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(
            command("launch/train.py", args, 2), cwd=REPO, env=cpu_env(), stdout=sink, stderr=subprocess.STDOUT
        )
    complete = run_dir / "checkpoints" / f"step_{STEPS:08d}" / COMPLETE
    saved_at, deadline = None, time.monotonic() + 600
    while launcher.poll() is None and time.monotonic() < deadline:
        if saved_at is None and complete.is_file():
            saved_at = time.monotonic()
            deadline = min(deadline, saved_at + 60)  # the final save, one evaluation, then every rank ends
        time.sleep(0.2)
    ended = launcher.poll() is not None
    if not ended:
        for proc in [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]:
            proc.kill()
        launcher.wait()
    after_save = time.monotonic() - saved_at if saved_at is not None and ended else None
    return run_dir, launcher.returncode if ended else None, after_save, log.read_text()


def final_adapter(run_dir):
    return run_dir / "checkpoints" / f"step_{STEPS:08d}" / "adapter"


@pytest.fixture(scope="module")
def t5_probe(hub_t5_dir, one_caption, tmp_path_factory):
    out = tmp_path_factory.mktemp("t5_probe")
    args = [
        "--deepspeed",
        "ds_configs/zero2.json",
        "--model",
        str(hub_t5_dir),
        "--data",
        str(one_caption / "shards"),
        "--output-dir",
        str(out / "run"),
        "--micro-batch",
        "8",
        "--grad-checkpointing",
        "--eval-steps",
        str(STEPS // 2),
        *COMMON,
    ]
    proc = subprocess.run(
        [sys.executable, "tests/train_probe.py", str(out / "probe.json"), *args],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, explain(proc)
    return out / "run", read_json(out / "probe.json")


def final_predictions(run_dir) -> dict:
    return read_json(run_dir / "eval" / f"{STEPS:08d}" / "predictions.json")


def test_rank0_evaluation_failure_keeps_the_final_checkpoint_and_ends_every_rank(opt_run):
    run_dir, code, after_save, output = opt_run
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / COMPLETE).is_file(), output[-4000:]
    assert code is not None and after_save is not None and after_save < 60, (
        f"ranks still running 60 s after the final save:\n{output[-4000:]}"
    )
    assert code != 0
    assert f"evaluation at step {STEPS} failed on rank 0" in output, output[-4000:]  # raised by rank 1 too
    assert "NotADirectoryError" in output or "FileExistsError" in output


def test_fine_tuned_opt_captions_end_where_its_captions_end(opt_run, hub_opt_dir, one_caption, tmp_path):
    """Labels end on the token generation stops on ("\\n" for the hub's OPT), so the caption stops there.
    Also launch/evaluate.py on the hub checkpoint + the final checkpoint's adapter."""
    run_dir = opt_run[0]
    proc = run(
        "launch/evaluate.py",
        [
            "--model",
            str(hub_opt_dir),
            "--adapter",
            str(final_adapter(run_dir)),
            "--data",
            str(one_caption / "shards"),
            "--split",
            "test",
            "--output-dir",
            str(tmp_path),
            "--num-beams",
            "1",
            "--min-length",
            "1",
            "--max-new-tokens",
            "30",
            "--num-workers",
            "0",
            "--dtype",
            "bfloat16",
        ],
        nproc=1,
    )
    assert proc.returncode == 0, explain(proc)
    predictions = read_json(tmp_path / "predictions.json")
    assert len(predictions) == 4 and set(predictions.values()) == {CAPTION}, predictions
    generation = read_json(tmp_path / "results.json")["generation"]
    eos = read_json(hub_opt_dir / "config.json")["text_config"]["eos_token_id"]
    assert generation["eos_token_id"] == eos and generation["end_of_caption"] == "Ċ"  # GPT-2 BPE's "\n"


def test_fine_tuned_t5_captions_end_where_its_captions_end(t5_probe):
    run_dir, _ = t5_probe
    predictions = final_predictions(run_dir)
    assert len(predictions) == 4 and set(predictions.values()) == {CAPTION}, predictions
    assert read_json(run_dir / "eval" / f"{STEPS:08d}" / "results.json")["generation"]["end_of_caption"] == "</s>"


def test_every_module_trains_from_step_one_and_after_an_evaluation(t5_probe):
    _, probe = t5_probe
    forwards = probe["forwards"]
    assert len(forwards) == STEPS and probe["evaluations"] == [STEPS // 2, STEPS]
    assert forwards[0]["not_training"] == [], forwards[0]["not_training"][:10]
    assert forwards[STEPS // 2]["not_training"] == []  # the first step after the evaluation


def test_grad_checkpointing_recomputes_from_step_one(t5_probe):
    _, probe = t5_probe
    # the language model's first layer: once in the forward, once more in the backward (recomputed)
    assert probe["forwards"][1]["layer_calls"] == 2
    assert probe["forwards"][STEPS // 2 + 1]["layer_calls"] == 2


def test_zero2_reduces_and_accumulates_gradients_in_fp32(t5_probe, opt_run):
    _, probe = t5_probe
    assert probe["engine"] == {
        "communication_data_type": "torch.float32",
        "grad_accum_dtype": "torch.float32",
        "zero_fp32_partition_buffer": True,
    }
    resolved = read_json(opt_run[0] / "config.json")["deepspeed_resolved"]
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 10_000_000
    assert resolved["communication_data_type"] == "fp32" and resolved["data_types"]["grad_accum_dtype"] == "fp32"
    assert resolved["gradient_accumulation_steps"] == 2  # accumulation across micro-batches exercised


def test_lr_stays_above_zero_after_warmup_without_a_scheduler_section(opt_run):
    lrs = dict(read_scalars(opt_run[0] / "tensorboard" / "training")["Train/lr"])
    assert len(lrs) == STEPS
    peak = max(lrs.values())
    assert peak == pytest.approx(2e-2, rel=1e-3)
    after = [lrs[s] for s in range(WARMUP + 1, STEPS)]
    assert min(after) > 0 and after == sorted(after, reverse=True)  # cosine over the planned 80 steps
    assert lrs[STEPS // 2 + WARMUP // 2] == pytest.approx(peak / 2, rel=0.1)


def test_caption_command_on_the_hub_checkpoint_and_adapter(opt_run, hub_opt_dir, one_caption):
    proc = run(
        "launch/caption.py",
        [
            "--model",
            str(hub_opt_dir),
            "--adapter",
            str(final_adapter(opt_run[0])),
            str(one_caption / "photos"),
            "--num-beams",
            "2",
            "--min-length",
            "1",
            "--json",
        ],
        nproc=1,
    )
    assert proc.returncode == 0, explain(proc)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 4 and {line["caption"] for line in lines} == {CAPTION}


def test_train_benchmark_command_on_the_hub_checkpoint(hub_t5_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run(
        "benchmarks/bench.py",
        [
            "train",
            "--model",
            str(hub_t5_dir),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--micro-batch",
            "10",
            "--repeat",
            "1",
            "--device",
            "cpu",
            "--no-isolate",
            "--json",
            str(out),
        ],
        nproc=1,
    )
    assert proc.returncode == 0, explain(proc)
    ours, baseline = read_json(out)["rows"]
    assert ours["samples_per_step"] == baseline["samples_per_step"] == 10
    # the real Q-Former dropout (0.1) keeps it per caption in train mode; the ViT still runs once per image
    assert ours["grouped_vision"] and not ours["grouped_qformer"]
