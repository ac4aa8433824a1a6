"""DeepSpeed JSON configs: "auto" values filled from the run's settings the way the Hugging Face Trainer does.

`fill_deepspeed_config` resolves batch sizes, learning rate, warm-up, steps, clipping and precision
from a config.Config; `check_optimizer_sections` rejects what the trainer would silently ignore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip2_dist.config import Config


def _fill(section: dict, key: str, value: Any, path: str) -> None:
    """Replace "auto" with our value; a concrete value that disagrees is an error, not a surprise."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value and not (
        isinstance(value, float) and isinstance(current, (int, float)) and abs(current - value) < 1e-12
    ):
        raise ValueError(
            f"DeepSpeed config sets {path}.{key}={current!r} but the run's settings give {value!r}: "
            f'set it to "auto" or make the flags agree'
        )


def load_deepspeed_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (the shipped ones are in ds_configs/)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: line {e.lineno}: {e.msg}") from None


PRECISIONS = ("bf16", "fp16", "fp32")


def choose_precision(ds: dict, bf16_ok: bool, fp16_ok: bool) -> str:
    """ "bf16", "fp16" or "fp32" from the JSON's `bf16` / `fp16` sections and what the device can do.

    "auto" picks bf16 where the device has it, else fp16 (V100, T4: no bf16) where the JSON's fp16
    section says "auto", else fp32. An explicit true is taken as is, and is an error on a device
    without that precision."""
    wanted = {p: ds.get(p, {}).get("enabled", False) for p in ("bf16", "fp16")}
    able = {"bf16": bf16_ok, "fp16": fp16_ok}
    forced = [p for p, v in wanted.items() if v is True]
    if len(forced) == 2:
        raise ValueError('DeepSpeed config enables both bf16 and fp16: enable one (or set both to "auto")')
    if forced:
        if not able[forced[0]]:
            raise ValueError(
                f"DeepSpeed config enables {forced[0]} but this device has no {forced[0]} support: "
                f'set {forced[0]}.enabled to "auto"'
            )
        return forced[0]
    for p in ("bf16", "fp16"):
        if wanted[p] == "auto" and able[p]:
            return p
    return "fp32"


# What the trainer realises from the optimizer and scheduler sections (see check_optimizer_sections).
_ADAM_TYPES = ("adam", "adamw")
_ADAM_PARAMS = {"lr", "betas", "eps", "weight_decay"}
_COSINE_PARAMS = {"total_num_steps", "warmup_num_steps", "cos_min_ratio"}


def check_optimizer_sections(ds: dict, path: str = "DeepSpeed config") -> None:
    """Reject what the trainer would otherwise ignore in the `optimizer` and `scheduler` sections.

    The optimizer section becomes torch.optim.AdamW over the trainable parameters (its lr, betas, eps,
    weight_decay); with the optimizer offloaded DeepSpeed builds its CPU Adam from the section, which
    honours every Adam parameter. The scheduler section becomes the trainer's linear warm-up + cosine
    (WarmupCosineLR's total_num_steps, warmup_num_steps, cos_min_ratio). Anything else would be
    dropped without a word, so it is an error naming the key."""
    offloaded = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    opt = ds.get("optimizer")
    if opt is not None:
        kind = str(opt.get("type", ""))
        if kind.lower() not in _ADAM_TYPES:
            raise ValueError(
                f"{path}: optimizer.type {kind!r} is not supported: the trainer runs AdamW; set "
                '"type": "AdamW" or remove the optimizer section (AdamW from the flags)'
            )
        params = dict(opt.get("params", {}))
        if params.get("adam_w_mode", True) is not True:
            raise ValueError(
                f"{path}: optimizer.params.adam_w_mode=false (Adam with L2 regularisation) is not "
                "supported: the trainer runs AdamW (decoupled weight decay)"
            )
        params.pop("adam_w_mode", None)
        params.pop("torch_adam", None)  # the trainer's AdamW is torch's anyway
        unknown = sorted(set(params) - _ADAM_PARAMS)
        if unknown and not offloaded:
            raise ValueError(
                f"{path}: optimizer.params {unknown} would be ignored: the trainer builds "
                f"torch.optim.AdamW from {sorted(_ADAM_PARAMS)} only; remove them"
            )
    sched = ds.get("scheduler")
    if sched is not None:
        kind = str(sched.get("type", ""))
        if kind != "WarmupCosineLR":
            raise ValueError(
                f"{path}: scheduler.type {kind!r} is not supported: the trainer's schedule is a "
                "linear warm-up then cosine (WarmupCosineLR); use that type or remove the "
                "scheduler section (then --warmup-steps and --min-lr-ratio shape it)"
            )
        params = dict(sched.get("params", {}))
        for key, same in (("warmup_type", "linear"), ("warmup_min_ratio", 0)):
            if key in params and params.pop(key) != same:
                raise ValueError(
                    f"{path}: scheduler.params.{key} other than {same!r} is not supported: the "
                    "trainer warms up linearly from 0 to the peak LR"
                )
        unknown = sorted(set(params) - _COSINE_PARAMS)
        if unknown:
            raise ValueError(
                f"{path}: scheduler.params {unknown} would be ignored: the trainer reads "
                f"{sorted(_COSINE_PARAMS)} only; remove them"
            )


def fill_deepspeed_config(
    ds: dict, cfg: Config, world_size: int, total_steps: int | None, bf16_ok: bool, fp16_ok: bool = False
) -> dict:
    """Resolve every "auto" the way the HF Trainer does (batch sizes, lr, warm-up, steps, clipping,
    precision: see choose_precision). total_steps None: not known yet (checks only)."""
    ds = json.loads(json.dumps(ds))  # deep copy
    check_optimizer_sections(ds, cfg.train.deepspeed)
    o = cfg.optim
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.data.micro_batch, "")
    _fill(ds, "gradient_accumulation_steps", o.grad_accum, "")
    _fill(ds, "train_batch_size", cfg.data.micro_batch * o.grad_accum * world_size, "")
    _fill(ds, "gradient_clipping", float(o.max_grad_norm), "")
    precision = choose_precision(ds, bf16_ok, fp16_ok)
    for name in ("bf16", "fp16"):
        if name in ds:
            ds[name]["enabled"] = precision == name
    if "fp16" in ds and ds["fp16"].get("loss_scale") == "auto":
        ds["fp16"]["loss_scale"] = 0  # dynamic loss scaling
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", o.lr, "optimizer.params")
        _fill(params, "betas", list(o.adam_betas), "optimizer.params")
        _fill(params, "eps", o.adam_eps, "optimizer.params")
        _fill(params, "weight_decay", o.weight_decay, "optimizer.params")
    if "scheduler" in ds:
        params = ds["scheduler"].setdefault("params", {})
        if total_steps is not None:
            _fill(params, "total_num_steps", total_steps, "scheduler.params")
            _fill(params, "warmup_num_steps", min(o.warmup_steps, total_steps), "scheduler.params")
        _fill(params, "cos_min_ratio", o.min_lr_ratio, "scheduler.params")
    leftover = [k for k, v in _walk(ds) if v == "auto" and not (total_steps is None and k.startswith("scheduler."))]
    if leftover:
        raise ValueError(f'DeepSpeed config: no value for "auto" at {", ".join(leftover)}')
    return ds


def precision_of(ds: dict) -> str:
    """The precision a filled DeepSpeed config runs in."""
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled") is True:
            return name
    return "fp32"


def _walk(obj: Any, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, obj
