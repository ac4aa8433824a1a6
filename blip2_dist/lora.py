"""LoRA on BLIP-2: which layers get adapters, what else trains, and the trainable count.

The settings are the model section of the configuration (`ModelArgs`: `--lora-r`, `--lora-targets`,
`--train-query-tokens`, ...); nothing copies them into a second class. Model code never sees a rank.

    peft_model = apply_lora(model, ModelArgs(lora_r=16, train_query_tokens=True))
    peft_model = apply_lora(model)                  # the defaults: r=16, alpha=32, dropout=0.05, q/v
    print(describe_trainable(peft_model))
    blip2 = unwrap_blip2(engine)                    # the Blip2ForConditionalGeneration inside
"""

from __future__ import annotations

import re

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Blip2ForConditionalGeneration

from blip2_dist.config import ModelArgs
from blip2_dist.errors import UserError
from blip2_dist.models import family_of

DEFAULT_TARGETS = {"t5": ["q", "v"], "opt": ["q_proj", "v_proj"]}
# BLIP-2 part -> the ModelArgs field naming its LoRA targets.
_PARTS = (
    ("language_model", "lora_targets"),
    ("qformer", "qformer_lora_targets"),
    ("vision_model", "vision_lora_targets"),
)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def target_names(value: list[str] | str | None) -> list[str] | None:
    """A target list as given: a list, None (not given), or "q,v" from a config file ("" = not given)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()] or None
    return None if value is None else list(value)


def check_lora(settings: ModelArgs) -> None:
    """The LoRA fields of the model section make sense together (UserError otherwise).

    The command line checks ranges already (config.check_values); this also covers ModelArgs built in
    Python and the one rule across fields."""
    if settings.lora_r <= 0 or settings.lora_alpha <= 0:
        raise UserError(f"LoRA r and alpha must be positive, got r={settings.lora_r} alpha={settings.lora_alpha}")
    if not 0.0 <= settings.lora_dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {settings.lora_dropout}")
    if settings.train_qformer and target_names(settings.qformer_lora_targets):
        raise UserError("--train-qformer trains the whole Q-Former: drop --qformer-lora-targets (LoRA on it)")


def trained_extras(settings: ModelArgs) -> list[str]:
    """Name prefixes (in Blip2ForConditionalGeneration) of the non-LoRA parameters trained."""
    prefixes = []
    if settings.train_qformer:
        prefixes.append("qformer.")
    if settings.train_qformer or settings.train_query_tokens:
        prefixes.append("query_tokens")
    if settings.train_qformer or settings.train_language_projection:
        prefixes.append("language_projection.")
    return prefixes


def lora_record(settings: ModelArgs) -> dict:
    """The "lora" entry of an adapter's blip2_dist_adapter.json (keys kept from its format 1)."""
    return {
        "r": settings.lora_r,
        "alpha": settings.lora_alpha,
        "dropout": settings.lora_dropout,
        "targets": target_names(settings.lora_targets),
        "qformer_targets": target_names(settings.qformer_lora_targets),
        "vision_targets": target_names(settings.vision_lora_targets),
        "train_qformer": settings.train_qformer,
        "train_query_tokens": settings.train_query_tokens,
        "train_language_projection": settings.train_language_projection,
    }


def unwrap_blip2(model: nn.Module) -> Blip2ForConditionalGeneration:
    """The Blip2ForConditionalGeneration inside a DeepSpeed engine / DDP / PeftModel (LoRA stays injected)."""
    while not isinstance(model, Blip2ForConditionalGeneration):
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            raise TypeError(f"no Blip2ForConditionalGeneration inside {type(model).__name__}")
    return model


def strip_engine(model: nn.Module) -> nn.Module:
    """The PeftModel or Blip2ForConditionalGeneration inside a DeepSpeed engine / DDP (itself if bare)."""
    while not isinstance(model, (PeftModel, Blip2ForConditionalGeneration)):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"no BLIP-2 model inside {type(model).__name__}")
        model = inner
    return model


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter."""
    for param in model.parameters():
        param.requires_grad_(False)


def linear_names(module: nn.Module) -> list[str]:
    """Distinct last names of the nn.Linear layers in `module` (the valid LoRA targets)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})


def lora_target_regex(model: Blip2ForConditionalGeneration, settings: ModelArgs) -> str:
    """A peft target_modules regex confined to each part, so "q"/"v" never reach the Q-Former/ViT.

    Raises ValueError naming the family and the valid names when a target matches nothing.
    """
    family = family_of(model)
    alternatives = []
    for part, field in _PARTS:
        names = target_names(getattr(settings, field))
        if part == "language_model" and names is None:
            names = DEFAULT_TARGETS[family]
        if not names:
            continue
        valid = [n for n in linear_names(getattr(model, part)) if n != "lm_head"]
        if names == ["all-linear"]:
            names = valid
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise UserError(
                f"LoRA {_flag(field)} {unknown} match no linear layer in the {part} of this {family.upper()} "
                f"BLIP-2 model; valid names there: {valid} (or ['all-linear'])"
            )
        alternatives.append(rf"{part}\..*\.(?:{'|'.join(re.escape(n) for n in names)})")
    if not alternatives:
        raise UserError(
            "LoRA settings target nothing: give --lora-targets, --qformer-lora-targets or --vision-lora-targets"
        )
    return rf"^(?:{'|'.join(alternatives)})$"


def apply_lora(model: nn.Module, settings: ModelArgs | None = None) -> PeftModel:
    """Freeze the base, add LoRA where the model section says, unfreeze the chosen extras; return the PeftModel.

    settings: the model section (its lora_* and train_* fields); None = the defaults, those of the HF
    BLIP-2 LoRA notebook (r=16, alpha=32, dropout=0.05, the language model's q and v)."""
    if isinstance(model, PeftModel):
        raise TypeError("model already has adapters (a PeftModel): apply_lora takes the plain base model")
    base = unwrap_blip2(model)
    settings = settings or ModelArgs()
    check_lora(settings)
    freeze_base(base)
    config = LoraConfig(  # no task_type: BLIP-2 is no CAUSAL_LM/SEQ_2_SEQ_LM for peft (peft issue 2528)
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias="none",
        target_modules=lora_target_regex(base, settings),
    )
    peft_model = get_peft_model(base, config)
    extras = [n for n, _ in base.named_parameters() if n.startswith(tuple(trained_extras(settings)))]
    for name in extras:
        base.get_parameter(name).requires_grad_(True)
    base.blip2_dist_lora = lora_record(settings)  # read by save_adapter
    base.blip2_dist_extras = extras
    return peft_model


def describe_trainable(model: nn.Module) -> str:
    """'trainable params: N || all params: M || trainable%: x' (peft's format; counts shared weights once)."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitions report their full size here
        total += n
        trainable += n if param.requires_grad else 0
    share = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
