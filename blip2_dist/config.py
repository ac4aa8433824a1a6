"""Typed configuration: one dataclass per concern, defaults <- config file <- command line.

Every field has help text; the CLI flag is the field name with dashes (`--lora-r`), so a flag means
the same in every entry point. A config file (JSON or YAML) is nested by section
(`{"model": {"lora_r": 8}, "optim": {"lr": 1e-4}}`); unknown keys are rejected. The resolved
config is written into the run directory by the trainer.

A field's allowed range sits in its metadata (`min`, `gt`, `max`, `lt`); `check_values` checks
every field's type and range, for flags and config-file values alike, before anything is loaded.

DeepSpeed JSON files may hold "auto" values; `fill_deepspeed_config` replaces them from these
settings the way the Hugging Face Trainer does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from blip2_dist.errors import UsageError, UserError

DEFAULT_MODEL = "Salesforce/blip2-flan-t5-xl"  # the project default base


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    model: str = _f(DEFAULT_MODEL, "BLIP-2 to fine-tune: hub id, local directory, or tiny-t5 / tiny-opt")
    random_init: bool = _f(False, "build the named architecture with random weights, no download (benchmarks only)")
    lora_r: int = _f(16, "LoRA rank", min=1)
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)", min=1)
    lora_dropout: float = _f(0.05, "dropout on the LoRA path", min=0.0, lt=1.0)
    lora_targets: list[str] | None = _f(None, "language-model modules to adapt (default T5: q v; OPT: q_proj v_proj)", nargs="+")
    qformer_lora_targets: list[str] | None = _f(None, "Q-Former modules to adapt with LoRA too (e.g. query value)", nargs="+")
    vision_lora_targets: list[str] | None = _f(None, "vision-encoder modules to adapt with LoRA too (e.g. qkv)", nargs="+")
    train_qformer: bool = _f(False, "train the Q-Former, query tokens and projection fully")
    train_query_tokens: bool = _f(False, "train the query tokens (saved beside the adapter)")
    train_language_projection: bool = _f(False, "train the Q-Former -> language-model projection "
                                         "(saved beside the adapter)")
    group_images: bool = _f(True, "run the vision encoder (and a frozen Q-Former) once per image, not once per caption")
    grad_checkpointing: bool = _f(False, "activation checkpointing (non-reentrant) in every BLIP-2 part: less memory, more compute")


@dataclass
class DataArgs:
    data: str = _f("shards/flickr8k", "a shard folder with manifest.json (python -m blip2_dist.data.pack_cli); a "
                   "manifest's path or URL (http(s)://, file:, pipe:CMD); or shard URLs with {a..b} patterns; "
                   "several joined by '::' (docs/data.md)")
    data_retries: int = _f(5, "remote shards and manifests: failed reads in a row (dropped connection, 5xx, "
                           "pipe: command error, stall) retried with backoff before the run stops naming the URL",
                           min=0)
    train_split: str = _f("train", "split to train on")
    eval_split: str = _f("val", "split to evaluate on during training")
    micro_batch: int = _f(16, "captions per micro-batch per rank", min=1)
    num_workers: int = _f(2, "loader worker processes per rank (0 = in the main process)", min=0)
    caption_mode: str = _f("all", "all: every caption once per epoch; random: one random caption per image per epoch", choices=["all", "random"])
    prompt: str = _f("", 'text prompt before the caption (LAVIS uses "a photo of")')
    max_caption_tokens: int = _f(64, "captions longer than this many tokens are truncated (counted)", min=1)
    shuffle_buffer: int = _f(1000, "images in each worker's shuffle buffer", min=1)
    augment: bool = _f(False, "training-time image augmentation (off by default: flips contradict left/right captions)")


@dataclass
class OptimArgs:
    lr: float = _f(1e-4, "peak learning rate (fills DeepSpeed's \"auto\")", gt=0.0)
    weight_decay: float = _f(0.05, "AdamW weight decay; never applied to biases and norms", min=0.0)
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas", nargs=2, min=0.0, lt=1.0)
    adam_eps: float = _f(1e-8, "AdamW epsilon", gt=0.0)
    warmup_steps: int = _f(100, "linear warm-up steps (optimizer steps)", min=0)
    min_lr_ratio: float = _f(0.0, "cosine decays to lr * min_lr_ratio", min=0.0, max=1.0)
    grad_accum: int = _f(1, "micro-batches per optimizer step", min=1)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)", min=0.0)
    fused_adamw: str = _f("auto", "torch's fused AdamW kernel: auto (on CUDA), on, off", choices=["auto", "on", "off"])


@dataclass
class EvalArgs:
    num_beams: int = _f(5, "beam search width", min=1)
    max_new_tokens: int = _f(30, "longest caption generated", min=1)
    min_length: int = _f(8, "shortest caption generated, in tokens", min=0)
    repetition_penalty: float = _f(1.0, "generation repetition penalty", gt=0.0)
    length_penalty: float = _f(1.0, "beam search length penalty (> 1 favours longer captions, < 1 shorter)")
    eval_batch: int = _f(16, "images per generation batch per rank", min=1)
    max_eval_images: int = _f(0, "evaluate only the first N images of the split (0 = all)", min=0)
    best_metric: str = _f("CIDEr", "metric that picks the best checkpoint (loss: the validation loss, lower is better)")
    gallery_images: int = _f(24, "images shown in the HTML gallery and TensorBoard", min=0)

    def generation(self) -> dict[str, Any]:
        """The settings as `generate` keyword arguments (min_length counts caption tokens: min_new_tokens)."""
        return {key: getattr(self, name) for name, key in GENERATION_FIELDS.items()}


# EvalArgs field -> generate() keyword: what an adapter records and a flag may override.
GENERATION_FIELDS = {
    "num_beams": "num_beams",
    "max_new_tokens": "max_new_tokens",
    "min_length": "min_new_tokens",
    "repetition_penalty": "repetition_penalty",
    "length_penalty": "length_penalty",
}


@dataclass
class TrainArgs:
    output_dir: str = _f("runs/blip2", "run directory: checkpoints, adapters, TensorBoard, eval results")
    deepspeed: str = _f("ds_configs/zero2.json", "DeepSpeed JSON config (\"auto\" values are filled from these flags)")
    allow_fp16_t5: bool = _f(False, "train a FLAN-T5 model in fp16 although its activations overflow fp16 "
                             "(transformers issue 23918); without it fp16 + T5 is refused")
    epochs: int = _f(1, "epochs to train (ignored when --max-steps is set)", min=1)
    max_steps: int = _f(0, "optimizer steps to train (0 = use --epochs)", min=0)
    save_steps: int = _f(500, "checkpoint every N optimizer steps (and at the end)", min=1)
    eval_steps: int = _f(0, "evaluate every N optimizer steps (0 = only at the end)", min=0)
    keep_last: int = _f(2, "checkpoints kept (the best adapter is kept apart)", min=1)
    resume: str = _f("", "auto (the newest usable checkpoint in --output-dir, else a fresh start, said "
                     "loudly), a step number (its checkpoint in --output-dir), or a checkpoint path")
    seed: int = _f(42, "seed for data order, LoRA init and dropout")
    log_steps: int = _f(10, "TensorBoard scalars every N optimizer steps", min=1)
    max_nonfinite: int = _f(0, "micro-batches with a NaN/inf loss skipped before the run stops", min=0)
    skip_eval: bool = _f(False, "no evaluation during or after training")
    dist_timeout: float = _f(600.0, "seconds a collective waits for the other ranks before this rank fails (exit 76)",
                             gt=0.0)
    heartbeat_timeout: float = _f(
        60.0, "seconds a dead or cut-off rank is waited for before all ranks exit 76 (0 = off)", min=0.0)
    sample_log: bool = _f(False, "log every trained example (image id, caption) to OUTPUT_DIR/samples/rank-N.jsonl")
    early_stop_patience: int = _f(
        0, "stop after N evaluations in a row without a better --best-metric (0 = never); best/ keeps the best adapter")


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "optim": OptimArgs,
    "eval": EvalArgs,
    "train": TrainArgs,
}


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


RANGE_KEYS = {"min": ">=", "gt": ">", "max": "<=", "lt": "<"}
DEBUG_HELP = "print tracebacks of errors (also: BLIP2_DEBUG=1)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting: the entry point's
    `errors.run_main` prints it once, not once per rank."""

    def error(self, message: str):
        raise UsageError(f"{message} (usage: {self.prog} --help)")


def _check_type(flag: str, kind: Any, value: Any) -> None:
    text = str(kind)
    if value is None and "None" in text:
        return
    numeric = (int, float) if "float" in text else (int,) if "int" in text else None
    items = value if text.startswith("list") and isinstance(value, list) else [value]
    for item in items:
        if numeric is not None and (isinstance(item, bool) or not isinstance(item, numeric)):
            raise UsageError(f"{flag} must be {'a number' if float in numeric else 'an integer'}, got {item!r}")
        if kind is bool and not isinstance(item, bool):
            raise UsageError(f"{flag} must be true or false, got {item!r}")
        if kind is str and not isinstance(item, str):
            raise UsageError(f"{flag} must be a string, got {item!r}")


def check_values(section_obj: Any) -> None:
    """Type and range of every field of a section (flags and config-file values alike): a bad one
    is a UsageError naming the flag, before any model or process group exists."""
    hints = get_type_hints(type(section_obj))
    for f in dataclasses.fields(section_obj):
        flag, value = _flag(f.name), getattr(section_obj, f.name)
        _check_type(flag, hints[f.name], value)
        for item in value if isinstance(value, list) else [value]:
            for key, op in RANGE_KEYS.items():
                bound = f.metadata.get(key)
                if bound is None or item is None:
                    continue
                ok = {"min": item >= bound, "gt": item > bound, "max": item <= bound, "lt": item < bound}[key]
                if not ok:
                    raise UsageError(f"{flag} must be {op} {bound}, got {item}")


def add_section_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field, defaults suppressed so we can tell what the user actually set."""
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for key in RANGE_KEYS:
            meta.pop(key, None)
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif "nargs" in meta:
            kw["nargs"] = meta.pop("nargs")
            kw["type"] = float if "float" in str(kind) else str
        else:
            kw["type"] = kind if kind in (int, float, str) else str
        kw.update(meta)
        group.add_argument(_flag(f.name), **kw)


def build_parser(description: str, sections: tuple[str, ...] = tuple(SECTIONS)) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or YAML file with sections " + ", ".join(sections))
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for name in sections:
        add_section_args(parser, SECTIONS[name], name)
    return parser


def _read_file(path: str) -> dict:
    yaml_file = path.endswith((".yaml", ".yml"))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - json.JSONDecodeError or yaml.YAMLError
        kind = "YAML" if yaml_file else "JSON"
        raise UserError(f"--config {path}: not valid {kind} ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f'--config {path}: expected sections, like {{"optim": {{"lr": 0.0001}}}}')
    return data


def _apply(section_obj: Any, values: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in names:
            raise UsageError(f"{where}: unknown option {key!r} (known: {', '.join(sorted(names))})")
        setattr(section_obj, key, value)


def parse_config(argv: list[str] | None, description: str, sections: tuple[str, ...] = tuple(SECTIONS)) -> Config:
    """defaults <- --config file <- command-line flags; unknown keys in the file are errors."""
    args = build_parser(description, sections).parse_args(argv)
    cfg = Config()
    if args.config:
        for section, values in _read_file(args.config).items():
            if section not in sections:
                raise UsageError(f"{args.config}: unknown section {section!r} (known: {', '.join(sections)})")
            _apply(getattr(cfg, section), values, f"{args.config} [{section}]")
    given = {k: v for k, v in vars(args).items() if k not in ("config", "local_rank", "debug")}
    for section in sections:
        obj = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(obj)}
        _apply(obj, {k: v for k, v in given.items() if k in names}, "command line")
        check_values(obj)
    return cfg


# ---------------------------------------------------------------- DeepSpeed "auto" filling

def _fill(section: dict, key: str, value: Any, path: str) -> None:
    """Replace "auto" with our value; a concrete value that disagrees is an error, not a surprise."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value and not (isinstance(value, float) and isinstance(current, (int, float)) and abs(current - value) < 1e-12):
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
    """"bf16", "fp16" or "fp32" from the JSON's `bf16` / `fp16` sections and what the device can do.

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
            raise ValueError(f"DeepSpeed config enables {forced[0]} but this device has no {forced[0]} support: "
                             f'set {forced[0]}.enabled to "auto"')
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
            raise ValueError(f'{path}: optimizer.type {kind!r} is not supported: the trainer runs AdamW; set '
                             '"type": "AdamW" or remove the optimizer section (AdamW from the flags)')
        params = dict(opt.get("params", {}))
        if params.get("adam_w_mode", True) is not True:
            raise ValueError(f"{path}: optimizer.params.adam_w_mode=false (Adam with L2 regularisation) is not "
                             "supported: the trainer runs AdamW (decoupled weight decay)")
        params.pop("adam_w_mode", None)
        params.pop("torch_adam", None)  # the trainer's AdamW is torch's anyway
        unknown = sorted(set(params) - _ADAM_PARAMS)
        if unknown and not offloaded:
            raise ValueError(f"{path}: optimizer.params {unknown} would be ignored: the trainer builds "
                             f"torch.optim.AdamW from {sorted(_ADAM_PARAMS)} only; remove them")
    sched = ds.get("scheduler")
    if sched is not None:
        kind = str(sched.get("type", ""))
        if kind != "WarmupCosineLR":
            raise ValueError(f"{path}: scheduler.type {kind!r} is not supported: the trainer's schedule is a "
                             "linear warm-up then cosine (WarmupCosineLR); use that type or remove the "
                             "scheduler section (then --warmup-steps and --min-lr-ratio shape it)")
        params = dict(sched.get("params", {}))
        for key, same in (("warmup_type", "linear"), ("warmup_min_ratio", 0)):
            if key in params and params.pop(key) != same:
                raise ValueError(f"{path}: scheduler.params.{key} other than {same!r} is not supported: the "
                                 "trainer warms up linearly from 0 to the peak LR")
        unknown = sorted(set(params) - _COSINE_PARAMS)
        if unknown:
            raise ValueError(f"{path}: scheduler.params {unknown} would be ignored: the trainer reads "
                             f"{sorted(_COSINE_PARAMS)} only; remove them")


def fill_deepspeed_config(ds: dict, cfg: Config, world_size: int, total_steps: int | None, bf16_ok: bool,
                          fp16_ok: bool = False) -> dict:
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
        raise ValueError(f"DeepSpeed config: no value for \"auto\" at {', '.join(leftover)}")
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
