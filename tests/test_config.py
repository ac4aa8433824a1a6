"""Config: defaults <- file <- CLI, unknown keys rejected, DeepSpeed "auto" filling."""

import json

import pytest

from blip2_dist.config import Config, parse_config
from blip2_dist.deepspeed_config import fill_deepspeed_config, load_deepspeed_config
from blip2_dist.errors import UsageError


def test_cli_overrides_file_overrides_defaults(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"model": {"lora_r": 4, "model": "tiny-opt"}, "optim": {"lr": 0.5}}))
    cfg = parse_config(["--config", str(f), "--lr", "0.25", "--lora-targets", "q_proj", "k_proj",
                        "--local_rank=1", "--no-augment"], "t")
    assert cfg.model.lora_r == 4 and cfg.model.model == "tiny-opt"
    assert cfg.optim.lr == 0.25
    assert cfg.model.lora_targets == ["q_proj", "k_proj"]
    assert cfg.data.augment is False
    assert cfg.optim.warmup_steps == Config().optim.warmup_steps


def test_yaml_and_unknown_keys(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("data:\n  micro_batch: 3\n")
    assert parse_config(["--config", str(y)], "t").data.micro_batch == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"learning_rate": 1}}))
    with pytest.raises(UsageError, match="unknown option 'learning_rate'"):
        parse_config(["--config", str(bad)], "t")
    bad.write_text(json.dumps({"optimizer": {}}))
    with pytest.raises(UsageError, match="unknown section 'optimizer'"):
        parse_config(["--config", str(bad)], "t")
    with pytest.raises(UsageError, match="unrecognized arguments: --no-such-flag"):
        parse_config(["--no-such-flag"], "t")


@pytest.mark.parametrize("name", ["zero2", "zero2_offload", "zero3"])
def test_shipped_configs_fill_completely(name):
    cfg = parse_config(["--micro-batch", "4", "--grad-accum", "3", "--max-grad-norm", "0.5"], "t")
    ds = fill_deepspeed_config(load_deepspeed_config(f"ds_configs/{name}.json"), cfg, world_size=8,
                               total_steps=1000, bf16_ok=True)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    assert ds["scheduler"]["params"]["total_num_steps"] == 1000
    assert "auto" not in json.dumps(ds)


def test_conflicting_explicit_value_is_an_error(tmp_path):
    cfg = parse_config(["--micro-batch", "4"], "t")
    ds = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto"}
    with pytest.raises(ValueError, match="train_batch_size=64"):
        fill_deepspeed_config(ds, cfg, world_size=2, total_steps=10, bf16_ok=True)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_deepspeed_config(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("{\n  'x': 1\n}")
    with pytest.raises(ValueError, match="line 2"):
        load_deepspeed_config(str(tmp_path / "broken.json"))
