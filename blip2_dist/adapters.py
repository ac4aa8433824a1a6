"""Adapters: export a LoRA-adapted BLIP-2 for reuse, and load base + adapter for inference.

    save_adapter(peft_model, processor, "runs/x/best", base_name="Salesforce/blip2-flan-t5-xl")
    model, processor = load_for_inference("Salesforce/blip2-flan-t5-xl", "runs/x/best")
    model, processor = load_for_inference(None, "runs/x/best")   # the base recorded in the adapter

An adapter directory is a standard peft adapter (`PeftModel.from_pretrained(base, dir)` loads it) plus
the processor, `blip2_dist_adapter.json` (base name, family, LoRA settings, and what training recorded:
the prompt and caption format, the generation settings it evaluated with, the step, the data, the
command, the metrics), a model card `README.md` and, only when parameters outside LoRA were trained
(query tokens, language projection, Q-Former), `extra_trainable.safetensors` holding them under their
`Blip2ForConditionalGeneration` names. Adapters of the tiny built-ins also carry their base in `base/`
(a `save_pretrained` directory), so they never depend on rebuilding random weights.

Inference uses what the adapter recorded unless told otherwise:

    recorded = recorded_inference("runs/x/best")       # {"prompt": ..., "generation": {...}}
    prompt, generation, notes = resolve_inference(recorded, prompt=None, given={"num_beams": 3})
    # notes: a warning for each given value that differs from the recorded (training) one
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from blip2_dist.cards import render_card
from blip2_dist.config import EvalArgs
from blip2_dist.errors import UserError
from blip2_dist.lora import freeze_base, strip_engine, unwrap_blip2
from blip2_dist.models import TINY_MODELS, family_of, load_model, reconcile_processor

logger = logging.getLogger(__name__)

ADAPTER_META = "blip2_dist_adapter.json"
EXPORT_META = "blip2_dist_export.json"  # in a merged export (blip2_dist.export)
EXTRAS_FILE = "extra_trainable.safetensors"
BASE_SUBDIR = "base"
CARD = "README.md"
# What an adapter records beside its weights (all optional; older adapters have none of them).
RECORD_KEYS = ("step", "caption_format", "generation", "training", "metrics")


def save_adapter(
    model: nn.Module,
    processor: Blip2Processor,
    out_dir: str | os.PathLike,
    base_name: str,
    *,
    seed: int | None = None,
    record: dict | None = None,
) -> Path:
    """Write a loadable adapter directory (see the module docstring); call on one rank only.

    model: the PeftModel from apply_lora, or a DeepSpeed engine / DDP around it. base_name: what
    load_model was given. seed: the tiny base's seed (default: the one load_model recorded).
    record: what training knows about it, keys RECORD_KEYS: step, caption_format (prompt,
    max_caption_tokens, end_of_caption, end_of_caption_ids: see `caption_format_record`),
    generation (generate() keyword arguments), training (data, splits, batch, command, ...),
    metrics ({"split", "step", "images", "values"}). It goes into the JSON and the model card.
    """
    unknown = sorted(set(record or {}) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"save_adapter: unknown record keys {unknown} (known: {list(RECORD_KEYS)})")
    peft_model = strip_engine(model)
    if not isinstance(peft_model, PeftModel):
        raise TypeError("save_adapter needs the PeftModel returned by apply_lora")
    base = peft_model.get_base_model()
    source = getattr(base, "blip2_dist_source", {})
    seed = source.get("seed", 0) if seed is None else seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    processor.save_pretrained(out)
    extras = getattr(base, "blip2_dist_extras", None)
    if extras is None:
        extras = [n for n, p in base.named_parameters() if p.requires_grad and "lora_" not in n]
    if extras:
        save_file({n: base.get_parameter(n).detach().cpu().contiguous() for n in extras}, out / EXTRAS_FILE)
    elif (out / EXTRAS_FILE).exists():
        (out / EXTRAS_FILE).unlink()  # stale, from an earlier export into the same directory
    base_dir = None
    if base_name in TINY_MODELS:
        _save_tiny_base(base, base_name, seed, out / BASE_SUBDIR, skip=set(extras))
        base_dir = BASE_SUBDIR
    meta = {
        "format": 1,
        "base_model": base_name,
        "base_dir": base_dir,
        "seed": seed,
        "random_init": bool(source.get("random_init", False)),
        "family": family_of(base),
        "dtype": str(base.query_tokens.dtype).removeprefix("torch."),
        "lora": getattr(base, "blip2_dist_lora", None),  # apply_lora's record of the LoRA settings
        "extras": extras,
        "extras_file": EXTRAS_FILE if extras else None,
        **(record or {}),
    }
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    # Replaces the empty template peft's save_pretrained leaves in README.md.
    (out / CARD).write_text(render_card(meta, kind="adapter"), encoding="utf-8")
    return out


def caption_format_record(fmt) -> dict:
    """What an adapter records of a CaptionFormat: the prompt, the caption cap and the token that ends
    captions (CaptionFormat.end_id: where the labels end and generation stops)."""
    return {
        "prompt": fmt.prompt,
        "max_caption_tokens": fmt.max_caption_tokens,
        "end_of_caption": fmt.tokenizer.decode([fmt.end_id]),
        "end_of_caption_ids": [int(fmt.end_id)],
    }


def read_meta(folder: str | os.PathLike) -> dict:
    """blip2_dist_adapter.json of an adapter, or blip2_dist_export.json of a merged export; {} if neither."""
    for name in (ADAPTER_META, EXPORT_META):
        path = Path(folder) / name
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


def recorded_inference(folder: str | os.PathLike | None) -> dict:
    """{"prompt", "generation"} as recorded in an adapter or export folder; {} when nothing is."""
    meta = read_meta(folder) if folder is not None and Path(folder).is_dir() else {}
    out = {}
    if "caption_format" in meta:
        out["prompt"] = meta["caption_format"].get("prompt", "")
    if meta.get("generation"):
        out["generation"] = dict(meta["generation"])
    return out


def resolve_inference(
    recorded: dict, *, prompt: str | None, given: dict[str, Any]
) -> tuple[str, dict[str, Any], list[str]]:
    """(prompt, generate kwargs, warnings): defaults <- recorded <- given (flags the user passed).

    given: generate() keyword arguments the user set explicitly. A given value that differs from a
    recorded one is used, with a warning: the recorded ones are what training evaluated with.
    """
    notes = []
    rec_prompt = recorded.get("prompt")
    if prompt is None:
        prompt = rec_prompt if rec_prompt is not None else ""
    elif rec_prompt is not None and prompt != rec_prompt:
        notes.append(
            f"--prompt {prompt!r} differs from the prompt the adapter was trained with ({rec_prompt!r}): "
            "captions and scores usually get worse"
        )
    rec_gen = recorded.get("generation") or {}
    generation = {**EvalArgs().generation(), **rec_gen}
    for key, value in given.items():
        if key in rec_gen and rec_gen[key] != value:
            notes.append(
                f"{key}={value!r} differs from the recorded {key}={rec_gen[key]!r} (what training evaluated with)"
            )
        generation[key] = value
    return prompt, generation, notes


def _base_state_dict(base: Blip2ForConditionalGeneration) -> dict[str, torch.Tensor]:
    # The state dict without LoRA: drop lora_* tensors, peft's ".base_layer." back to the plain name.
    return {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}


def _save_tiny_base(base, name: str, seed: int, dest: Path, skip: set[str]) -> None:
    # Rebuild the untrained tiny base and check it equals the frozen weights trained against, so
    # `base/` holds the true base (trained extras are restored by the extras file, not baked in).
    dtype = base.vision_model.embeddings.patch_embedding.weight.dtype
    fresh, fresh_processor = load_model(name, dtype=dtype, seed=seed)
    current = _base_state_dict(base)
    for key, value in fresh.state_dict().items():
        if key not in skip and not torch.equal(current[key].cpu(), value):
            raise RuntimeError(
                f"tiny base {name!r} rebuilt with seed={seed} differs from the trained one at {key}: "
                "pass the seed given to load_model"
            )
    fresh.save_pretrained(dest)
    fresh_processor.save_pretrained(dest)


def load_extras(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy extra_trainable.safetensors into the model's parameters; return the names loaded."""
    base = unwrap_blip2(model)
    params = dict(base.named_parameters())
    tensors = load_file(str(path))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise KeyError(f"{path}: parameters not in this model: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return sorted(tensors)


def load_for_inference(
    base: str | None,
    adapter_dir: str | os.PathLike | None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    merge: bool = False,
    device: str | torch.device | None = None,
    dispatch: dict | None = None,
) -> tuple[nn.Module, Blip2Processor]:
    """Base (via load_model) + adapter + extras, in eval mode with nothing trainable.

    base: hub id, local dir or tiny name; None takes the one recorded in the adapter. Tiny bases
    come from the adapter's `base/`. merge: fold LoRA into the weights (returns the plain model).
    dispatch: a device map for a model larger than one device (see `load_model`). With an adapter,
    layers may go to GPUs and CPU but not to disk: peft cannot load LoRA into disk-offloaded layers
    of BLIP-2; export a merged model (blip2_dist.export) and dispatch that instead.
    """
    if adapter_dir is None:
        if base is None:
            raise ValueError("load_for_inference needs a base or an adapter_dir")
        model, processor = load_model(base, dtype=dtype, device=device, dispatch=dispatch)
        return _frozen(model), processor
    adapter = Path(adapter_dir)
    meta = json.loads((adapter / ADAPTER_META).read_text()) if (adapter / ADAPTER_META).exists() else {}
    if meta.get("random_init"):
        raise UserError(f"{adapter} was trained on a random-init base (benchmarks only): it can't be reloaded")
    recorded = meta.get("base_model")
    if base is None and recorded is None:
        raise UserError(f"{adapter} records no base model ({ADAPTER_META} missing): pass base")
    if base is not None and recorded is not None and base != recorded:
        logger.warning("adapter %s was trained on %s; loading it on %s", adapter, recorded, base)
    base = base if base is not None else recorded
    if meta.get("base_dir") and base == recorded:
        base = str(adapter / meta["base_dir"])
    model, processor = load_model(base, dtype=dtype, seed=meta.get("seed", 0), device=device, dispatch=dispatch)
    if "disk" in getattr(model, "hf_device_map", {}).values():
        raise UserError(
            f"the device map put part of {base} on disk; peft cannot load the adapter {adapter} into "
            "disk-offloaded layers. Give it more GPU/CPU memory (max_memory), or merge first "
            "(python launch/export.py --adapter ADAPTER --out DIR) and load DIR with the device map"
        )
    # Keep the adapter in the base's dtype (peft would upcast it to fp32): a bf16 DeepSpeed engine
    # trained and evaluated it in bf16, and only the same dtype reproduces its generations.
    model = PeftModel.from_pretrained(model, str(adapter), autocast_adapter_dtype=False)
    if (adapter / EXTRAS_FILE).exists():
        load_extras(model, adapter / EXTRAS_FILE)
    if (adapter / "processor_config.json").exists():  # what training used (image size, tokenizer)
        processor = Blip2Processor.from_pretrained(str(adapter))
        reconcile_processor(unwrap_blip2(model), processor)
    if merge:
        model = model.merge_and_unload()
    return _frozen(model), processor


def _frozen(model: nn.Module) -> nn.Module:
    freeze_base(model)
    return model.eval()
