"""benchmarks/gpu_check.sh on CPU (--dry-run): the same steps as on a GPU with the tiny models: the training
benchmark per model, a run through the deepspeed launcher to a checkpoint, a resume to the end with one
evaluation, one JSON. (It has not run on a GPU yet: see docs/models.md.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_helpers import REPO, cpu_env

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_writes_one_complete_report(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)],
        cwd=REPO,
        env=cpu_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    why = json.dumps({k: report[k] for k in ("bench", "run")}, indent=1, default=str)[-6000:]
    assert proc.returncode == 0 and report["ok"], proc.stdout[-2000:] + proc.stderr[-2000:] + why
    assert report["environment"]["deepspeed"] and report["dry_run"] is True
    assert [(b["model"], b["micro_batch"]) for b in report["bench"]] == [("tiny-t5", 20)]
    for entry in report["bench"]:
        for side in ("ours", "baseline"):
            assert entry[side]["samples_per_s"] > 0 and entry[side]["peak_memory_gib"] > 0
            assert "mfu" in entry[side] and "tflops" in entry[side]
        assert entry["ours_vs_baseline"]["samples_per_s"] > 0
    resumed = report["run"]["resumed"]
    assert resumed["resumed_from_step"] == 3 and resumed["final_step"] == 5
    assert resumed["checkpoints"] == ["step_00000003", "step_00000005"]
    assert resumed["eval"]["images"] == 4 and "CIDEr" in resumed["eval"]["metrics"]
    assert resumed["precision"] == "bf16"
