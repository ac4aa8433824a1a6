"""Typed configuration: one dataclass per concern, defaults <- config file <- command line.

Every field has help text; the CLI flag is the field name with dashes (`--lora-r`), so a flag means
the same in every entry point. A config file (JSON or YAML) is nested by section
(`{"model": {"lora_r": 8}, "optim": {"lr": 1e-4}}`); unknown keys are rejected. The resolved
config is written into the run directory by the trainer.

A field's allowed range sits in its metadata (`min`, `gt`, `max`, `lt`); `check_values` checks
every field's type and range, for flags and config-file values alike, before anything is loaded.

The generator, for every command (training's sections are below; the others' in commands.py):
    option(default, help, **meta)            a section field (MISSING default: required; positional=True)
    parse_sections(argv, doc, sections, only) -> Parsed(sections, given, args): --config, --debug, flags
    add_section_args(parser, cls, title, only) + section_from(cls, args)   the same on a parser of your
                                             own (subcommands: blip2_dist/data/pack_cli.py)
    save_config(path, sections, **extra)     the resolved options as JSON beside a command's outputs
    markdown_reference(commands)             docs/configuration.md (python -m blip2_dist.commands --markdown)

The DeepSpeed JSON's "auto" values are filled from these settings in deepspeed_config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from blip2_dist.errors import UsageError, UserError

DEFAULT_MODEL = "Salesforce/blip2-flan-t5-xl"  # the project default base


def option(default: Any, help: str, **meta: Any) -> Any:
    """A section field with its help text. `default` dataclasses.MISSING: a required option. meta: the
    allowed range (`min`, `gt`, `max`, `lt`), argparse's `choices`, `nargs`, `metavar`, `positional=True`
    (an argument without a flag), `aliases` (more flags for the same option)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": help, **meta})
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ModelArgs:
    model: str = option(
        DEFAULT_MODEL,
        "BLIP-2 to fine-tune: hub id, local directory, or tiny-t5 / tiny-opt "
        "(evaluate, caption: the adapter's base when --adapter is given without --model)",
    )
    random_init: bool = option(False, "build the named architecture with random weights, no download (benchmarks only)")
    lora_r: int = option(16, "LoRA rank", min=1)
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r)", min=1)
    lora_dropout: float = option(0.05, "dropout on the LoRA path", min=0.0, lt=1.0)
    lora_targets: list[str] | None = option(
        None, "language-model modules to adapt (default T5: q v; OPT: q_proj v_proj)", nargs="+"
    )
    qformer_lora_targets: list[str] | None = option(
        None, "Q-Former modules to adapt with LoRA too (e.g. query value)", nargs="+"
    )
    vision_lora_targets: list[str] | None = option(
        None, "vision-encoder modules to adapt with LoRA too (e.g. qkv)", nargs="+"
    )
    train_qformer: bool = option(False, "train the Q-Former, query tokens and projection fully")
    train_query_tokens: bool = option(False, "train the query tokens (saved beside the adapter)")
    train_language_projection: bool = option(
        False, "train the Q-Former -> language-model projection (saved beside the adapter)"
    )
    group_images: bool = option(
        True, "run the vision encoder (and a frozen Q-Former) once per image, not once per caption"
    )
    grad_checkpointing: bool = option(
        False, "activation checkpointing (non-reentrant) in every BLIP-2 part: less memory, more compute"
    )


@dataclass
class DataArgs:
    data: str = option(
        "shards/flickr8k",
        "a shard folder with manifest.json (python -m blip2_dist.data.pack_cli); a "
        "manifest's path or URL (http(s)://, file:, pipe:CMD); or shard URLs with {a..b} patterns; "
        "several joined by '::' (docs/data.md)",
    )
    data_retries: int = option(
        5,
        "remote shards and manifests: failed reads in a row (dropped connection, 5xx, "
        "pipe: command error, stall) retried with backoff before the run stops naming the URL",
        min=0,
    )
    train_split: str = option("train", "split to train on")
    eval_split: str = option("val", "split to evaluate on during training")
    micro_batch: int = option(16, "captions per micro-batch per rank", min=1)
    num_workers: int = option(2, "loader worker processes per rank (0 = in the main process)", min=0)
    caption_mode: str = option(
        "all",
        "all: every caption once per epoch; random: one random caption per image per epoch",
        choices=["all", "random"],
    )
    prompt: str = option(
        "",
        'text prompt before the caption (LAVIS uses "a photo of"; evaluate, caption: the '
        "adapter's recorded prompt when not given)",
    )
    max_caption_tokens: int = option(64, "captions longer than this many tokens are truncated (counted)", min=1)
    shuffle_buffer: int = option(1000, "images in each worker's shuffle buffer", min=1)
    augment: bool = option(
        False, "training-time image augmentation (off by default: flips contradict left/right captions)"
    )


@dataclass
class OptimArgs:
    lr: float = option(1e-4, 'peak learning rate (fills DeepSpeed\'s "auto")', gt=0.0)
    weight_decay: float = option(0.05, "AdamW weight decay; never applied to biases and norms", min=0.0)
    adam_betas: list[float] = option([0.9, 0.999], "AdamW betas", nargs=2, min=0.0, lt=1.0)
    adam_eps: float = option(1e-8, "AdamW epsilon", gt=0.0)
    warmup_steps: int = option(100, "linear warm-up steps (optimizer steps)", min=0)
    min_lr_ratio: float = option(0.0, "cosine decays to lr * min_lr_ratio", min=0.0, max=1.0)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)", min=0.0)
    fused_adamw: str = option(
        "auto", "torch's fused AdamW kernel: auto (on CUDA), on, off", choices=["auto", "on", "off"]
    )


@dataclass
class EvalArgs:
    num_beams: int = option(5, "beam search width", min=1)
    max_new_tokens: int = option(30, "longest caption generated", min=1)
    min_length: int = option(8, "shortest caption generated, in tokens", min=0)
    repetition_penalty: float = option(1.0, "generation repetition penalty", gt=0.0)
    length_penalty: float = option(1.0, "beam search length penalty (> 1 favours longer captions, < 1 shorter)")
    eval_batch: int = option(16, "images per generation batch per rank", min=1)
    max_eval_images: int = option(0, "evaluate only the first N images of the split (0 = all)", min=0)
    best_metric: str = option(
        "CIDEr", "metric that picks the best checkpoint (loss: the validation loss, lower is better)"
    )
    gallery_images: int = option(24, "images shown in the HTML gallery and TensorBoard", min=0)

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
    output_dir: str = option("runs/blip2", "run directory: checkpoints, adapters, TensorBoard, eval results")
    deepspeed: str = option(
        "ds_configs/zero2.json", 'DeepSpeed JSON config ("auto" values are filled from these flags)'
    )
    allow_fp16_t5: bool = option(
        False,
        "train a FLAN-T5 model in fp16 although its activations overflow fp16 "
        "(transformers issue 23918); without it fp16 + T5 is refused",
    )
    epochs: int = option(1, "epochs to train (ignored when --max-steps is set)", min=1)
    max_steps: int = option(0, "optimizer steps to train (0 = use --epochs)", min=0)
    save_steps: int = option(500, "checkpoint every N optimizer steps (and at the end)", min=1)
    eval_steps: int = option(0, "evaluate every N optimizer steps (0 = only at the end)", min=0)
    keep_last: int = option(2, "checkpoints kept (the best adapter is kept apart)", min=1)
    resume: str = option(
        "",
        "auto (the newest usable checkpoint in --output-dir, else a fresh start, said "
        "loudly), a step number (its checkpoint in --output-dir), or a checkpoint path",
    )
    seed: int = option(42, "seed for data order, LoRA init and dropout")
    log_steps: int = option(10, "TensorBoard scalars every N optimizer steps", min=1)
    max_nonfinite: int = option(0, "micro-batches with a NaN/inf loss skipped before the run stops", min=0)
    skip_eval: bool = option(False, "no evaluation during or after training")
    dist_timeout: float = option(
        600.0, "seconds a collective waits for the other ranks before this rank fails (exit 76)", gt=0.0
    )
    heartbeat_timeout: float = option(
        60.0, "seconds a dead or cut-off rank is waited for before all ranks exit 76 (0 = off)", min=0.0
    )
    sample_log: bool = option(False, "log every trained example (image id, caption) to OUTPUT_DIR/samples/rank-N.jsonl")
    early_stop_patience: int = option(
        0, "stop after N evaluations in a row without a better --best-metric (0 = never); best/ keeps the best adapter"
    )


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


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _base_type(kind: Any) -> Any:
    """int for `int | None`, float for `list[float]`: what argparse converts each value to."""
    args = [a for a in get_args(kind) if a is not type(None)]
    return _base_type(args[0]) if args else kind


def _fields(cls: type, only: Sequence[str] | None) -> list[dataclasses.Field]:
    fields = dataclasses.fields(cls)
    if only is None:
        return list(fields)
    by_name = {f.name: f for f in fields}
    return [by_name[name] for name in only]


def add_section_args(parser: argparse.ArgumentParser, cls: type, title: str, only: Sequence[str] | None = None) -> None:
    """One flag per field of `cls` (or of the fields named in `only`), defaults suppressed so that what
    the user set is told apart from the defaults (section_from, given_options)."""
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in _fields(cls, only):
        meta = dict(f.metadata)
        help_text, kind, default = meta.pop("help"), hints[f.name], _default(f)
        positional, aliases = meta.pop("positional", False), meta.pop("aliases", ())
        for key in RANGE_KEYS:
            meta.pop(key, None)
        shown = "" if default in (dataclasses.MISSING, None) or positional else f" (default: {default})"
        kw: dict[str, Any] = dict(help=help_text + shown)
        if not positional:
            kw["default"] = argparse.SUPPRESS
            kw["required"] = default is dataclasses.MISSING
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _base_type(kind) if _base_type(kind) in (int, float) else str
        kw.update(meta)
        names = [f.name] if positional else [_flag(f.name), *aliases]
        group.add_argument(*names, **kw)


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` set on the command line (parsed with add_section_args)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def section_from(cls: type, args: argparse.Namespace, file_values: dict | None = None) -> Any:
    """A section: its defaults <- `file_values` (a config file's section) <- the flags given, checked
    (check_values)."""
    values = {**(file_values or {}), **given_options(args, cls)}
    required = [f.name for f in dataclasses.fields(cls) if _default(f) is dataclasses.MISSING]
    obj = cls(**{name: values.pop(name) for name in required if name in values})
    _apply(obj, values, "command line")
    check_values(obj)
    return obj


def build_parser(
    description: str,
    sections: tuple[str, ...] | dict[str, type] = tuple(SECTIONS),
    only: dict[str, Sequence[str]] | None = None,
) -> argparse.ArgumentParser:
    """--config, --debug and the flags of every section: training's (names in SECTIONS) or a command's
    own `{title: dataclass}`; `only`: {title: the fields of that section this command takes}."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = _section_types(sections)
    parser.add_argument("--config", help="JSON or YAML file with sections " + ", ".join(sections))
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for name, cls in sections.items():
        add_section_args(parser, cls, name, (only or {}).get(name))
    return parser


def _section_types(sections: tuple[str, ...] | dict[str, type]) -> dict[str, type]:
    return dict(sections) if isinstance(sections, dict) else {name: SECTIONS[name] for name in sections}


@dataclass
class Parsed:
    """What parse_sections returns: one object per section, and the names the user set (flags or file)."""

    sections: dict[str, Any]
    given: set[str]
    args: argparse.Namespace
    only: dict[str, Sequence[str]]  # per section title: the fields the command takes (absent: all)


def parse_sections(
    argv: Sequence[str] | None,
    description: str,
    sections: dict[str, type],
    only: dict[str, Sequence[str]] | None = None,
) -> Parsed:
    """A command's options: defaults <- --config file <- command-line flags, each section checked."""
    args = build_parser(description, sections, only).parse_args(argv)
    file = _read_file(args.config) if args.config else {}
    for name in file:
        if name not in sections:
            raise UsageError(f"{args.config}: unknown section {name!r} (known: {', '.join(sections)})")
    given: set[str] = set()
    objs = {}
    for name, cls in sections.items():
        allowed = set((only or {}).get(name) or [f.name for f in dataclasses.fields(cls)])
        values = {k.replace("-", "_"): v for k, v in file.get(name, {}).items()}
        for key in values:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise UsageError(f"{args.config} [{name}]: unknown option {key!r} (known: {known})")
        objs[name] = section_from(cls, args, values)
        given |= set(values) | set(given_options(args, cls))
    return Parsed(objs, given, args, dict(only or {}))


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
    """Training's options: defaults <- --config file <- command-line flags; unknown keys in the file are errors."""
    parsed = parse_sections(argv, description, _section_types(sections))
    return Config(**parsed.sections)


def save_config(
    path: str | Path, sections: dict[str, Any], only: dict[str, Sequence[str]] | None = None, **extra: Any
) -> Path:
    """A command's resolved options as JSON, nested by section like a --config file (`only`: the fields
    the command takes, per section; `extra`: what it resolved beyond its flags), written atomically."""
    from blip2_dist.io import write_json_atomic

    resolved = {}
    for name, obj in sections.items():
        values = dataclasses.asdict(obj)
        keep = (only or {}).get(name)
        resolved[name] = {k: v for k, v in values.items() if keep is None or k in keep}
    write_json_atomic(Path(path), {**resolved, **extra})
    return Path(path)


def markdown_reference(commands: dict[str, dict[str, tuple[type, Sequence[str] | None]]], intro: str = "") -> str:
    """The configuration reference: per command, per section (title: (dataclass, the fields the command
    takes, None for all)), a table of flag, type, default and help read from the dataclasses."""
    lines = [intro.strip(), ""] if intro else []
    for command, sections in commands.items():
        lines += [f"## {command}", ""]
        for title, (cls, only) in sections.items():
            lines += [f"### {title} (`{cls.__name__}`)", "", "| flag | type | default | help |", "|---|---|---|---|"]
            hints = get_type_hints(cls)
            lines += [_reference_row(f, hints[f.name]) for f in _fields(cls, only)]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _reference_row(f: dataclasses.Field, kind: Any) -> str:
    meta, default = f.metadata, _default(f)
    flags = [_flag(f.name), *meta.get("aliases", ())]
    name = f.name if meta.get("positional") else " ".join(f"`{flag}`" for flag in flags)
    kind_text = (str(kind).replace("typing.", "") if not isinstance(kind, type) else kind.__name__).replace("|", "or")
    if meta.get("choices"):
        kind_text += " (" + ", ".join(map(str, meta["choices"])) + ")"
    ranges = ", ".join(f"{op} {meta[key]}" for key, op in RANGE_KEYS.items() if key in meta)
    default_text = "required" if default is dataclasses.MISSING else f"`{default!r}`"
    help_text = (meta["help"] + (f" ({ranges})" if ranges else "")).replace("|", "\\|").replace("<", "&lt;")
    return f"| {name} | {kind_text} | {default_text} | {help_text} |"
