"""DeepSpeed JSON handling: precision chosen from the device ("auto"), fp16 refused for FLAN-T5 unless
forced, and optimizer / scheduler sections honoured or rejected, never silently dropped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from launch_helpers import REPO, cpu_env

from blip2_dist import train as T
from blip2_dist.config import parse_config
from blip2_dist.deepspeed_config import choose_precision, fill_deepspeed_config, load_deepspeed_config
from blip2_dist.engine import build_model
from blip2_dist.errors import UserError
from blip2_dist.models import family_from_name

SHIPPED = ["zero2", "zero2_offload", "zero3"]


def filled(name: str, bf16_ok: bool, fp16_ok: bool, *flags: str) -> dict:
    cfg = parse_config(["--deepspeed", f"ds_configs/{name}.json", *flags], "t")
    return fill_deepspeed_config(load_deepspeed_config(cfg.train.deepspeed), cfg, 2, 100, bf16_ok, fp16_ok)


@pytest.mark.parametrize("name", SHIPPED)
def test_auto_precision_follows_the_device(name):
    ampere = filled(name, bf16_ok=True, fp16_ok=True)
    assert ampere["bf16"]["enabled"] is True and ampere["fp16"]["enabled"] is False
    volta = filled(name, bf16_ok=False, fp16_ok=True)  # V100 / T4: fp16 with dynamic loss scaling
    assert volta["bf16"]["enabled"] is False and volta["fp16"]["enabled"] is True
    assert volta["fp16"]["loss_scale"] == 0  # 0 = dynamic in DeepSpeed
    neither = filled(name, bf16_ok=False, fp16_ok=False)
    assert neither["bf16"]["enabled"] is False and neither["fp16"]["enabled"] is False


def test_explicit_precision_is_checked_against_the_device():
    ds = {"bf16": {"enabled": False}, "fp16": {"enabled": True}}
    assert choose_precision(ds, bf16_ok=True, fp16_ok=True) == "fp16"
    with pytest.raises(ValueError, match="no fp16 support"):
        choose_precision(ds, bf16_ok=True, fp16_ok=False)
    with pytest.raises(ValueError, match="both bf16 and fp16"):
        choose_precision({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, True, True)
    assert choose_precision({}, bf16_ok=True, fp16_ok=True) == "fp32"  # no section: fp32, as DeepSpeed


def test_flan_t5_is_refused_in_fp16_unless_forced(hub_t5_dir, hub_opt_dir, monkeypatch, tmp_path):
    from blip2_dist.data.synthetic import write_synthetic

    write_synthetic(tmp_path, n_train=4, n_val=2, n_test=0, samples_per_shard=10)
    monkeypatch.setattr(T, "device_precisions", lambda: (False, True))  # a GPU without bf16 (V100, T4)
    assert family_from_name(str(hub_t5_dir)) == "t5" and family_from_name(str(hub_opt_dir)) == "opt"
    base = ["--data", str(tmp_path), "--micro-batch", "2", "--num-workers", "1", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(UserError, match="FLAN-T5.*fp16.*23918.*--allow-fp16-t5"):
        T.validate(parse_config([*base, "--model", str(hub_t5_dir)], "t"), world_size=1)
    for flags in (["--model", str(hub_t5_dir), "--allow-fp16-t5"], ["--model", str(hub_opt_dir)]):
        checked = T.validate(parse_config([*base, *flags], "t"), world_size=1)
        assert checked.deepspeed["fp16"]["enabled"] == "auto"  # the raw config comes back
        assert checked.precision == "fp16"  # which fills to fp16 on this device
    monkeypatch.setattr(T, "device_precisions", lambda: (True, True))
    T.validate(parse_config([*base, "--model", str(hub_t5_dir)], "t"), world_size=1)  # bf16: fine


@pytest.mark.parametrize(
    "section, message",
    [
        ({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}, "optimizer.type 'Lamb' is not supported"),
        (
            {"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}},
            r"optimizer.params \['amsgrad'\] would be ignored",
        ),
        ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "adam_w_mode=false"),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "scheduler.type 'WarmupDecayLR' is not supported"),
        (
            {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_type": "log"}}},
            "warmup_type other than 'linear'",
        ),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"last_batch_iteration": 5}}}, "would be ignored"),
    ],
)
def test_sections_that_would_be_ignored_are_rejected(section, message):
    cfg = parse_config([], "t")
    with pytest.raises(ValueError, match=message):
        fill_deepspeed_config(section, cfg, 1, 10, bf16_ok=True)


def test_honoured_sections_pass():
    cfg = parse_config(["--lr", "0.001"], "t")
    ds = {
        "optimizer": {"type": "adam", "params": {"lr": 0.001, "adam_w_mode": True, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"warmup_type": "linear", "warmup_min_ratio": 0, "total_num_steps": "auto"},
        },
    }
    out = fill_deepspeed_config(ds, cfg, 1, 10, bf16_ok=True)
    assert out["scheduler"]["params"]["total_num_steps"] == 10
    offload = {
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW", "params": {"bias_correction": True}},
    }  # DeepSpeed's CPU Adam reads it
    fill_deepspeed_config(offload, cfg, 1, 10, bf16_ok=True)


def test_a_rejected_section_stops_train_before_start(tmp_path):
    from blip2_dist.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "data", n_train=4, n_val=2, n_test=0, samples_per_shard=10)
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["scheduler"]["type"] = "OneCycle"
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--deepspeed",
            str(tmp_path / "ds.json"),
            "--model",
            "tiny-t5",
            "--data",
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "run"),
            "--micro-batch",
            "2",
            "--num-workers",
            "1",
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "scheduler.type 'OneCycle' is not supported" in proc.stderr and "ds.json" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_train_language_projection_flag(hub_opt_dir):
    cfg = parse_config(["--model", str(hub_opt_dir), "--train-language-projection"], "t")
    model, _ = build_model(cfg, torch.float32)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert cfg.model.train_language_projection and trained and all("language_projection" in n for n in trained)
    assert not parse_config([], "t").model.train_language_projection
