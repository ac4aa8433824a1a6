"""The training benchmark: its FLOP formula against torch's FlopCounterMode, the real architectures'
counts, the device-peak table, its micro-batches, and `benchmarks/bench.py train` end to end (CPU, tiny).

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_bench.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blip2_dist.captioning import caption_loss, image_sharing
from blip2_dist.config import ModelArgs
from blip2_dist.data.synthetic import synthetic_batches
from blip2_dist.flops import FlopModel, batch_counts, peak_bf16_tflops
from blip2_dist.lora import apply_lora
from blip2_dist.models import family_of, load_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    ModelArgs(),
    ModelArgs(train_query_tokens=True),
    ModelArgs(qformer_lora_targets=["query", "value"]),
    ModelArgs(train_qformer=True),
    ModelArgs(vision_lora_targets=["qkv"], lora_dropout=0.0),
    ModelArgs(lora_targets=["all-linear"]),
]


@pytest.mark.parametrize("family", ["t5", "opt"])
@pytest.mark.parametrize(
    "settings", SETTINGS, ids=["lm", "query_tokens", "qformer_lora", "train_qformer", "vision_lora", "all_linear"]
)
def test_flop_formula_matches_flop_counter(family, settings):
    """The documented formula, term by term, equals what FlopCounterMode sees for a real forward and
    backward (eager attention, so the attention products are visible as matmuls)."""
    model, processor = load_model(f"tiny-{family}", dtype=torch.float32)
    model.set_attn_implementation("eager")
    peft_model = apply_lora(model, settings).train()
    batch = synthetic_batches(processor, model.config, n_batches=1, micro_batch=7, captions_per_image=3, seed=1)[0]
    counts = batch_counts(batch)
    flops = FlopModel(peft_model)
    for group_images in (True, False):
        share_vision, share_qformer = image_sharing(peft_model) if group_images else (False, False)
        with FlopCounterMode(display=False) as counter:
            caption_loss(peft_model, batch, group_images=group_images).backward()
        peft_model.zero_grad()
        formula = flops.count(
            batch,
            n_vision=counts["images"] if share_vision else counts["samples"],
            n_qformer=counts["images"] if share_vision and share_qformer else counts["samples"],
        )
        assert formula["total"] == pytest.approx(counter.get_total_flops(), rel=1e-3), group_images


@pytest.mark.parametrize(
    "name, vit_tflop, lm_low, lm_high",
    [
        ("Salesforce/blip2-opt-2.7b", 0.52, 7.5, 8.5),
        ("Salesforce/blip2-flan-t5-xl", 0.52, 4.0, 4.6),
    ],
)
def test_real_architecture_counts(name, vit_tflop, lm_low, lm_high):
    """Built on the meta device (no memory). ViT-g: 2 x 0.99B params x 257 tokens + attention, ~0.52
    TFLOP per image; LM with LoRA: ~4 x P_lm x tokens for 16 captions of 47 (OPT) / 33+15 (T5) tokens."""
    model, _ = load_model(name, random_init=True, device="meta")
    flops = FlopModel(apply_lora(model))
    n = 16
    width = 47 if family_of(model) == "opt" else 33
    batch = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "labels": torch.zeros(n, width if width == 47 else 15, dtype=torch.long),
    }
    one_image = flops.count(batch, n_vision=1, n_qformer=1)
    assert one_image["vision"] / 1e12 == pytest.approx(vit_tflop, rel=0.02)
    p_vit = sum(p.numel() for p in model.vision_model.parameters())
    assert one_image["vision"] > 2 * p_vit * 257  # the linear part, plus attention
    assert lm_low < one_image["language"] / 1e12 < lm_high
    ours, baseline = (flops.count(batch, n_vision=k, n_qformer=n) for k in (4, 16))
    assert baseline["vision"] == pytest.approx(4 * ours["vision"])
    assert baseline["language"] == ours["language"]


def test_peak_table():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None  # unknown: MFU n/a unless --peak-tflops


def test_synthetic_batches_keep_caption_groups():
    model, processor = load_model("tiny-opt", dtype=torch.float32)
    batches = synthetic_batches(processor, model.config, n_batches=4, micro_batch=16, captions_per_image=5)
    for b in batches:
        assert len(b["input_ids"]) == 16 and b["image_index"].max() == len(b["pixel_values"]) - 1
        assert (b["image_index"].diff() >= 0).all()  # groups in order
    assert torch.equal(batches[0]["pixel_values"][-1], batches[1]["pixel_values"][0])  # 16 = 3x5 + 1


def test_train_benchmark_command(tmp_path):
    """`benchmarks/bench.py train` runs both sides (each in its own process) and prints the ratio line."""
    out = tmp_path / "train.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench.py",
            "train",
            "--model",
            "tiny-t5",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--micro-batch",
            "8",
            "--repeat",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours/baseline: samples/s x" in proc.stdout
    report = json.loads(out.read_text())
    ours, baseline = report["rows"]
    assert ours["side"] == "ours" and baseline["side"] == "baseline"
    assert ours["grouped_vision"] and ours["deepspeed"]["zero_stage"] == 2 and ours["deepspeed"]["bf16"]
    for row in report["rows"]:
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_memory_gib"] > 0
        assert row["mfu"] is None and row["steps"] == 2 and row["samples_per_step"] == 8
    # same captions on both sides; the baseline runs the ViT once per caption, ours once per image
    assert ours["model_flops_per_step"] == pytest.approx(baseline["model_flops_per_step"])
    assert baseline["flops_per_step"] > ours["flops_per_step"] == pytest.approx(ours["model_flops_per_step"])
    assert report["ratio"]["samples_per_s"] == pytest.approx(ours["samples_per_s"] / baseline["samples_per_s"])


def test_loader_benchmark_packs_and_reads_through_the_library(tmp_path):
    """`benchmarks/bench.py loader` packs a JPEG folder with the packer, streams every image and caption
    once through TrainStream, times the webdataset reader alone, and compares with the notebook loader
    reading the same files."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/bench.py"),
        "loader",
        "--synthesize",
        "24",
        "--images",
        str(tmp_path / "jpgs"),
        "--repeat",
        "1",
        "--micro-batch",
        "8",
        "--workers",
        "1",
        "--baseline-items",
        "16",
        "--shards-out",
        str(tmp_path / "shards"),
        "--json",
        str(tmp_path / "r.json"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    stream, baseline = report["rows"]
    assert stream["name"] == "stream (all)" and (stream["images"], stream["examples"]) == (24, 120)
    assert baseline["name"] == "baseline (notebook)" and baseline["examples"] == 16
    assert report["ratio"]["steady_images_per_cpu_s"] > 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())  # written by the packer
    assert manifest["splits"]["train"]["images"] == 24 and manifest["source"]["layout"] == "bench"
    reader = report["reader"]
    assert reader["images"] == 24 and reader["skip_ms"] > 0 and reader["cpu_us_per_image"] > 0
    assert report["config"]["images"] == str(tmp_path / "jpgs") and report["config"]["micro_batch"] == 8
    assert "stream / baseline per CPU-second" in proc.stdout


def test_library_and_tests_import_no_benchmark_code():
    """benchmarks/ stays outside the library's import graph, and the tests only run it as a subprocess."""
    import ast

    bench_modules = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {"benchmarks"}
    offenders = []
    for path in [*(ROOT / "blip2_dist").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in bench_modules]
    assert len(bench_modules) > 4 and not offenders, offenders
