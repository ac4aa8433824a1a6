"""Config: defaults <- file <- CLI, unknown keys rejected, DeepSpeed "auto" filling."""

import json

import pytest

from blip2_dist.config import Config, parse_config
from blip2_dist.deepspeed_config import fill_deepspeed_config, load_deepspeed_config
from blip2_dist.errors import UsageError


def test_cli_overrides_file_overrides_defaults(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"model": {"lora_r": 4, "model": "tiny-opt"}, "optim": {"lr": 0.5}}))
    cfg = parse_config(
        ["--config", str(f), "--lr", "0.25", "--lora-targets", "q_proj", "k_proj", "--local_rank=1", "--no-augment"],
        "t",
    )
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
    ds = fill_deepspeed_config(
        load_deepspeed_config(f"ds_configs/{name}.json"), cfg, world_size=8, total_steps=1000, bf16_ok=True
    )
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


# ---- the generator, for every command --------------------------------------------------------------


def test_a_command_takes_only_its_fields_of_a_shared_section_and_knows_what_was_given(tmp_path):
    from blip2_dist.commands import sections_of
    from blip2_dist.config import DataArgs, parse_sections

    f = tmp_path / "eval.yaml"
    f.write_text("eval:\n  num_beams: 3\n")
    p = parse_sections(["--config", str(f), "--num-workers", "0", "--data", "d"], "t", *sections_of("evaluate"))
    assert p.sections["data"].num_workers == 0 and p.sections["eval"].num_beams == 3
    assert p.given == {"num_workers", "data", "num_beams"}  # the file's values count as given
    assert p.sections["data"].prompt == DataArgs().prompt and p.sections["model"].model == Config().model.model
    with pytest.raises(UsageError, match="unrecognized arguments: --lr"):  # a training flag evaluate does not take
        parse_sections(["--lr", "1"], "t", *sections_of("evaluate"))
    f.write_text("data:\n  micro_batch: 3\n")
    with pytest.raises(UsageError, match=r"\[data\]: unknown option 'micro_batch'"):
        parse_sections(["--config", str(f)], "t", *sections_of("evaluate"))
    with pytest.raises(UsageError, match="--num-workers must be >= 0, got -1"):  # the one range, from DataArgs
        parse_sections(["--num-workers", "-1"], "t", *sections_of("evaluate"))


def test_required_and_positional_options_and_the_saved_configuration(tmp_path):
    from blip2_dist.commands import sections_of
    from blip2_dist.config import parse_sections, save_config

    with pytest.raises(UsageError, match="required: --adapter, --out"):
        parse_sections([], "t", *sections_of("export"))
    p = parse_sections(
        ["a.jpg", "b/", "--batch-size", "2", "--top-p", "0.5", "--do-sample"], "t", *sections_of("caption")
    )
    assert p.sections["caption"].images == ["a.jpg", "b/"] and p.sections["sampling"].top_p == 0.5
    saved = json.loads(save_config(tmp_path / "c.json", p.sections, p.only, extra={"x": 1}).read_text())
    assert saved["caption"] == {"images": ["a.jpg", "b/"], "batch_size": 2, "json": False}
    assert saved["sampling"]["do_sample"] is True and saved["extra"] == {"x": 1}
    assert saved["data"] == {"prompt": ""} and "gallery_images" not in saved["eval"]  # only what caption takes
