"""One-shot GPU check: the training benchmark on both real architectures and a short real run, one JSON.

    bash benchmarks/gpu_check.sh [OUT_DIR]            # or `make gpu-check`; one GPU, <= 9 minutes
    bash benchmarks/gpu_check.sh --dry-run OUT_DIR    # CPU: the same steps with the tiny models (tests)

(b) a short real run through the `deepspeed` launcher on one GPU (NCCL): the flan-t5-xl architecture
    with random weights on synthetic shards, 20 steps with a checkpoint, then `--resume auto` to 30
    steps and one evaluation (generation, gather, COCO scoring). It runs first.
(a) `benchmarks/bench.py train` for Salesforce/blip2-opt-2.7b and Salesforce/blip2-flan-t5-xl, built with
    random weights on the GPU (no download), bf16, micro-batch 20 and 40 captions: ours vs the HF PEFT
    notebook's loop, each side in its own process; samples/s, TFLOP/s, MFU and peak memory per side.
Every part runs in a subprocess under a timeout taken from what is left of --budget-s, and the JSON is
rewritten after each part, so a part that fails or runs out of time is recorded and the rest still runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLANS = {
    "gpu": dict(
        models=["Salesforce/blip2-opt-2.7b", "Salesforce/blip2-flan-t5-xl"],
        random_init=True,
        micro_batches=[20, 40],
        bench_steps=8,
        bench_warmup=3,
        device="cuda",
        isolate=True,
        run_model="Salesforce/blip2-flan-t5-xl",
        checkpoint_step=20,
        total_steps=30,
        train_micro=8,
        eval_images=16,
        n_train=400,
    ),
    "dry": dict(
        models=["tiny-t5"],
        random_init=False,
        micro_batches=[20],
        bench_steps=2,
        bench_warmup=1,
        device="cpu",
        isolate=False,
        run_model="tiny-t5",
        checkpoint_step=3,
        total_steps=5,
        train_micro=4,
        eval_images=4,
        n_train=24,
    ),
}
ROW_KEYS = (
    "samples_per_s",
    "images_per_s",
    "sec_per_step",
    "tflops",
    "model_tflops",
    "mfu",
    "peak_memory_gib",
    "peak_tflops",
    "trainable",
    "first_loss",
    "last_loss",
)


class Check:
    """The report being built, its deadline, and the subprocess runner."""

    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget_s
        self.started = time.monotonic()
        self.report: dict = {"dry_run": dry, "ok": False, "environment": environment(dry), "bench": [], "run": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], log: Path, max_s: float) -> dict:
        """Run a command with stdout+stderr in `log`; never longer than max_s or what the budget has left."""
        timeout = max(1.0, min(max_s, self.left()))
        t0 = time.monotonic()
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if self.dry:
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        with open(log, "w") as sink:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the launcher and every rank it started
                proc.wait()
                code = "timeout"
        result = {"exit": code, "seconds": round(time.monotonic() - t0, 1), "log": str(log)}
        if code != 0:
            result["log_tail"] = log.read_text(errors="replace")[-3000:]
        return result

    def save(self) -> None:
        self.report["seconds"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2))
        os.replace(tmp, self.out / "gpu_check.json")


def environment(dry: bool) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu (dry run)" if dry else None,
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
    for name in ("transformers", "peft", "deepspeed", "accelerate", "webdataset", "pycocoevalcap"):
        try:
            env[name] = importlib.metadata.version(name)
        except Exception as err:  # noqa: BLE001 - recorded: what is missing is the first thing to know
            env[name] = f"missing ({type(err).__name__})"
    return env


def bench(check: Check, plan: dict) -> None:
    """(a): one bench.py train per model and micro-batch."""
    for model in plan["models"]:
        for micro in plan["micro_batches"]:
            name = f"{model.rsplit('/', 1)[-1]}-mb{micro}"
            out = check.out / f"bench-{name}.json"
            cmd = [
                sys.executable,
                "benchmarks/bench.py",
                "train",
                "--model",
                model,
                "--device",
                plan["device"],
                "--dtype",
                "bf16",
                "--micro-batch",
                str(micro),
                "--steps",
                str(plan["bench_steps"]),
                "--warmup",
                str(plan["bench_warmup"]),
                "--repeat",
                "1",
                "--json",
                str(out),
                "--isolate" if plan["isolate"] else "--no-isolate",
            ]
            if plan["random_init"]:
                cmd.append("--random-init")
            entry = {"model": model, "micro_batch": micro, **check.run(cmd, check.out / f"bench-{name}.log", 110)}
            if entry["exit"] == 0:
                report = json.loads(out.read_text())
                for row in report["rows"]:
                    entry[row["side"]] = {k: row.get(k) for k in ROW_KEYS}
                entry["ours_vs_baseline"] = report.get("ratio")
            check.report["bench"].append(entry)
            check.save()


def real_run(check: Check, plan: dict) -> None:
    """(b): shards, a run to the checkpoint step, then --resume auto to the end with one evaluation."""
    from blip2_dist.data.synthetic import write_synthetic

    shards, run_dir = check.out / "shards", check.out / "run"
    write_synthetic(shards, n_train=plan["n_train"], n_val=plan["eval_images"], n_test=0, samples_per_shard=100)
    from blip2_dist.dist import free_port

    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--master_port",
        str(free_port()),
        "launch/train.py",
    ]
    common = [
        "--deepspeed",
        "ds_configs/zero2.json",
        "--model",
        plan["run_model"],
        "--data",
        str(shards),
        "--output-dir",
        str(run_dir),
        "--micro-batch",
        str(plan["train_micro"]),
        "--num-workers",
        "2",
        "--save-steps",
        str(plan["checkpoint_step"]),
        "--warmup-steps",
        "5",
        "--log-steps",
        "5",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "20",
        "--min-length",
        "1",
        "--eval-batch",
        "8",
    ]
    if plan["random_init"]:
        common.append("--random-init")
    first = check.run(
        [*launcher, *common, "--max-steps", str(plan["checkpoint_step"]), "--skip-eval"],
        check.out / "run-first.log",
        150,
    )
    check.report["run"]["first"] = first
    check.save()
    if first["exit"] != 0:
        return
    second = check.run(
        [*launcher, *common, "--max-steps", str(plan["total_steps"]), "--resume", "auto"],
        check.out / "run-resumed.log",
        150,
    )
    log = Path(second["log"]).read_text(errors="replace")
    second["resumed_from_step"] = plan["checkpoint_step"] if f"at step {plan['checkpoint_step']}" in log else None
    final = run_dir / "final_state.json"
    if final.is_file():
        state = json.loads(final.read_text())
        second["final_step"], second["loss_history"] = state["step"], state["loss_history"]
    results = run_dir / "eval" / f"{plan['total_steps']:08d}" / "results.json"
    if results.is_file():
        r = json.loads(results.read_text())
        second["eval"] = {"images": r["images"], "metrics": r["metrics"], "scoring": r["scoring"].get("tokenizer")}
    resolved = run_dir / "config.json"
    if resolved.is_file():
        ds = json.loads(resolved.read_text())["deepspeed_resolved"]
        second["precision"] = (
            "bf16" if ds.get("bf16", {}).get("enabled") else ("fp16" if ds.get("fp16", {}).get("enabled") else "fp32")
        )
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    second["checkpoints"] = checkpoints
    check.report["run"]["resumed"] = second
    check.save()


def passed(report: dict, plan: dict) -> bool:
    bench_ok = len(report["bench"]) == len(plan["models"]) * len(plan["micro_batches"]) and all(
        e["exit"] == 0 for e in report["bench"]
    )
    second = report["run"].get("resumed", {})
    run_ok = (
        second.get("exit") == 0
        and second.get("resumed_from_step") == plan["checkpoint_step"]
        and second.get("final_step") == plan["total_steps"]
        and "eval" in second
    )
    return bench_ok and run_ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="runs/gpu_check", help="folder for gpu_check.json and the logs")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: the same steps, for tests")
    p.add_argument("--budget-s", type=float, default=540, help="wall-clock seconds for everything (default 9 min)")
    args = p.parse_args(argv)
    plan = PLANS["dry" if args.dry_run else "gpu"]
    check = Check(Path(args.out), args.budget_s, args.dry_run)
    if not args.dry_run and check.report["environment"]["device"] is None:
        print("gpu_check: no CUDA device visible (--dry-run runs the same steps on a CPU)", file=sys.stderr)
        check.save()
        return 2
    real_run(check, plan)  # first: the correctness check; the benchmark takes what time is left
    bench(check, plan)
    check.report["ok"] = passed(check.report, plan)
    check.save()
    print(
        f"gpu_check: {'ok' if check.report['ok'] else 'FAILED'} in {check.report['seconds']} s; "
        f"report: {check.out / 'gpu_check.json'}"
    )
    return 0 if check.report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
