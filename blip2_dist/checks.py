"""Everything that can be checked before the process group starts, in one place.

    plan = check_training(cfg, world_size, rank)   # the trainer, before init_distributed
    check_splits(data, {"--split": "val"})          # launch/evaluate.py and launch/caption.py use
    check_model(name) · check_adapter(path, model) · check_output_dir(path, "--output-dir")

A mistake found here costs a second and prints one line; found after the process group started it
costs a model load per rank, and on one rank only it used to leave the others waiting. Every check
raises UserError (UsageError for a flag out of range) naming the flag and the value or file. They
read files and, for a hub id not in the cache, ask the hub once; they never write outside the
output folder they probe.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from blip2_dist.checkpoint import ResumePlan, plan_resume
from blip2_dist.config import Config, check_values
from blip2_dist.data.reader import check_data, is_manifest, split_sources
from blip2_dist.data.shards import manifest_location, read_manifest, split_shards
from blip2_dist.data.urls import DEFAULT_RETRY, RetryPolicy, local_path
from blip2_dist.deepspeed_config import fill_deepspeed_config, load_deepspeed_config, precision_of
from blip2_dist.errors import UsageError, UserError
from blip2_dist.lora import check_lora
from blip2_dist.models import REAL_TEXT, TINY_MODELS


@dataclass
class TrainingPlan:
    """What the checks found out that the trainer needs: the raw DeepSpeed config, the precision it
    gives on this device, and the resume."""

    deepspeed: dict
    precision: str
    resume: ResumePlan


def check_training(
    cfg: Config, world_size: int, rank: int = 0, precisions: tuple[bool, bool] = (True, False)
) -> TrainingPlan:
    """Every check of a training run; see the module docstring. precisions: (bf16, fp16) the device
    has (blip2_dist.engine.device_precisions)."""
    for section in (cfg.model, cfg.data, cfg.optim, cfg.eval, cfg.train):
        check_values(section)
    check_lora(cfg.model)  # the rule across LoRA fields, before any rank waits on another
    splits = {"--train-split": cfg.data.train_split}
    if not cfg.train.skip_eval:
        splits["--eval-split"] = cfg.data.eval_split
    check_splits(cfg.data.data, splits, RetryPolicy(retries=cfg.data.data_retries))
    check_train_plan(cfg, world_size, rank)
    ds, precision = check_deepspeed(cfg, world_size, precisions)
    if cfg.model.random_init:
        check_random_init(cfg.model.model)
    else:
        check_model(cfg.model.model)
    out = check_output_dir(cfg.train.output_dir, "--output-dir")
    for name in ("checkpoints", "best", "eval", "tensorboard"):  # folders the run writes into
        if (out / name).exists() and not (out / name).is_dir():
            raise UserError(f"--output-dir {out}: {out / name} is a file, where the run keeps a folder")
        if (out / name).is_dir():
            check_output_dir(out / name, "--output-dir")
    return TrainingPlan(ds, precision, plan_resume(cfg.train.output_dir, cfg.train.resume))


def check_deepspeed(cfg: Config, world_size: int, precisions: tuple[bool, bool]) -> tuple[dict, str]:
    """The DeepSpeed JSON: readable, its sections ones the trainer honours, its explicit values
    agreeing with the flags and the device. Returns it raw, and the precision it gives."""
    try:
        ds = load_deepspeed_config(cfg.train.deepspeed)
        filled = fill_deepspeed_config(ds, cfg, world_size, None, *precisions)
    except (OSError, ValueError) as e:
        raise UserError(f"--deepspeed {cfg.train.deepspeed}: {e}") from None
    return ds, precision_of(filled)


# ---- data -------------------------------------------------------------------------------------


def check_splits(data: str, splits: dict[str, str], retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Every `--data` source can be read and holds every split asked for (flag -> split), as
    blip2_dist.data.reader.check_data checks it (manifests read, local shards of patterns there,
    remote ones counted); and every local shard a manifest lists is there and not empty."""
    try:
        check_data(data, list(splits.values()), retry)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(_data_message(str(e), splits)) from None
    for spec in split_sources(data):
        if not is_manifest(spec) or local_path(manifest_location(spec)) is None:
            continue  # shard patterns: check_data looked at them; remote manifests: not probed here
        manifest = read_manifest(spec)
        for split in splits.values():
            for shard in split_shards(manifest, split, spec):
                path = local_path(shard["path"])
                if path is not None and not path.is_file():
                    raise UserError(f"--data {data}: shard {path} is listed in {manifest_location(spec)} but missing")
                if path is not None and path.stat().st_size == 0:
                    raise UserError(f"--data {data}: shard {path} is empty (0 bytes)")


def _data_message(text: str, splits: dict[str, str]) -> str:
    """Name the flag whose split a manifest lacks; else the --data problem as it was found."""
    for flag, split in splits.items():
        if f"no split {split!r}" in text:
            return f"{flag} {split}: {text}" + ("; or pass --skip-eval" if flag == "--eval-split" else "")
    return f"--data: {text}"


def check_train_plan(cfg: Config, world_size: int, rank: int) -> None:
    """The loader's plan (steps per epoch) from the manifest alone, as every rank will compute it:
    a split too small for the launch shape fails here, not after the model is loaded."""
    from blip2_dist.data.stream import TrainStream  # torch, but no model and no process group

    try:
        stream = TrainStream(
            cfg.data.data,
            cfg.data.train_split,
            None,
            None,
            micro_batch=cfg.data.micro_batch,
            rank=rank,
            world_size=world_size,
            num_workers=cfg.data.num_workers,
            caption_mode=cfg.data.caption_mode,
            shuffle_buffer=cfg.data.shuffle_buffer,
            retry=RetryPolicy(retries=cfg.data.data_retries),
        )
    except ValueError as e:
        raise UserError(f"--data {cfg.data.data}: {e}") from None
    if stream.steps_per_epoch < cfg.optim.grad_accum:
        raise UserError(
            f"one epoch gives {stream.steps_per_epoch} micro-batches per rank, fewer than "
            f"--grad-accum {cfg.optim.grad_accum}"
        )


# ---- paths written ----------------------------------------------------------------------------


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A folder we can write into: created if missing (with its parents), probed with a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({e.strerror or e})") from None
    return out


# ---- models and adapters ----------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model(name: str, flag: str = "--model") -> None:
    """A tiny built-in, a saved BLIP-2 folder, or a hub id that is cached or exists on the hub.

    A hub id not in the cache costs one metadata request (no retries), so a typo fails in a second
    instead of after the download client's retries."""
    if name in TINY_MODELS:
        return
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise UserError(
                f"{flag} {name}: this folder has no config.json, so it is not a saved model "
                "(save_pretrained writes one)"
            )
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise UserError(f"{flag} {name}: {config} is not readable JSON ({e})") from None
        if model_type != "blip-2":
            raise UserError(f"{flag} {name}: a {model_type!r} model, not BLIP-2 (model_type 'blip-2')")
        return
    if path.exists():
        raise UserError(f"{flag} {name} is a file; pass a model folder or a hub id")
    if _looks_like_path(name):
        raise UserError(f"{flag} {name}: no such folder")
    _check_hub_id(name, flag)


def _check_hub_id(name: str, flag: str) -> None:
    import huggingface_hub
    from huggingface_hub import constants, errors

    try:
        huggingface_hub.utils.validate_repo_id(name)
    except errors.HFValidationError:
        raise UserError(
            f"{flag} {name}: neither a folder nor a valid hub id (like Salesforce/blip2-opt-2.7b)"
        ) from None
    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"{flag} {name}: not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
            f"is set: download it where the hub is reachable (hf download {name}) and pass the folder"
        )
    try:
        huggingface_hub.model_info(name, timeout=15)
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"{flag} {name}: no such model on the Hugging Face hub (or it is private: log in with `hf auth login`)"
        ) from None
    except errors.GatedRepoError:
        raise UserError(f"{flag} {name}: a gated model: accept its terms on the hub and log in") from None
    except Exception as e:  # noqa: BLE001 - no network, DNS, proxy, TLS: all mean "cannot reach the hub"
        raise UserError(
            f"{flag} {name}: not a local folder, not in the Hugging Face cache, and the hub cannot "
            f"be reached ({type(e).__name__}: {e}); download it elsewhere and pass the folder"
        ) from None


def check_random_init(name: str) -> None:
    if name in TINY_MODELS or name in REAL_TEXT:
        return
    if not (Path(os.path.expanduser(name)) / "config.json").is_file():
        raise UserError(
            f"--random-init --model {name}: not a known architecture ({', '.join(REAL_TEXT)}) "
            "nor a folder with a config.json"
        )


def check_adapter(path: str, model: str | None) -> None:
    """An adapter folder written by training (peft's adapter_config.json inside), and a base to
    load it on: --model, or the one the adapter records."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"--adapter {path}: no such folder")
    if not folder.is_dir():
        raise UserError(f"--adapter {path} is a file; pass the adapter folder")
    if not (folder / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {path}: not an adapter folder (no adapter_config.json); training writes "
            "them to OUTPUT_DIR/best and OUTPUT_DIR/checkpoints/step_N/adapter"
        )
    if model is None and not (folder / "blip2_dist_adapter.json").is_file():
        raise UserError(f"--adapter {path} records no base model (no blip2_dist_adapter.json): pass --model")


# ---- the step and evaluation plans (identical on every rank) ------------------------------------


@dataclass
class Plan:
    """Step counts decided before training, identical on every rank."""

    micro_per_epoch: int  # micro-batches each rank takes per epoch
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int


def plan_steps(cfg: Config, loader_steps: int) -> Plan:
    accum = cfg.optim.grad_accum
    steps_per_epoch = loader_steps // accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch gives {loader_steps} micro-batches per rank, fewer than --grad-accum {accum}")
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return Plan(steps_per_epoch * accum, steps_per_epoch, total)


# What --best-metric may name: the COCO toolkit's metrics and the validation loss.
EVAL_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "loss")


def validate_eval_plan(cfg: Config) -> None:
    """--best-metric names a metric; --early-stop-patience has evaluations to count."""
    if cfg.eval.best_metric not in EVAL_METRICS:
        raise UsageError(f"--best-metric {cfg.eval.best_metric!r} is not one of {', '.join(EVAL_METRICS)}")
    patience = cfg.train.early_stop_patience
    if patience < 0:
        raise UsageError(f"--early-stop-patience must be >= 0, got {patience}")
    if patience and (cfg.train.skip_eval or not cfg.train.eval_steps):
        raise UsageError("--early-stop-patience counts evaluations: it needs --eval-steps N and no --skip-eval")


def improved(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` beats `best`: the loss is better lower, every caption metric higher."""
    if best is None:
        return True
    return value < best if metric == "loss" else value > best
