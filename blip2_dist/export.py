"""Merged export: a trained adapter folded into its base, saved as a full BLIP-2 folder that plain
transformers loads (`Blip2ForConditionalGeneration.from_pretrained(DIR)`, `Blip2Processor.from_pretrained(DIR)`).

    export_merged("runs/ft5xl/best", "exports/ft5xl", dtype=torch.bfloat16)

What the folder holds:
  config.json, model.safetensors   the merged weights in `dtype` (LoRA folded in, trained extras in place)
  processor files                  the processor training used (image size, tokenizer, `<image>` token)
  generation_config.json           the generation settings the adapter recorded (beam width, lengths,
                                   penalties) and the end-of-caption token as eos_token_id
  README.md                        the model card (base, data, LoRA, prompt, settings, metrics, commands)
  blip2_dist_export.json           the same facts for our own tools (caption.py --model DIR uses the prompt)

Where the training prompt goes: transformers has no field for it (a processor has no default text, and
generation_config.json entries are generate() arguments). It is in the model card, whose usage code
passes it as the processor's `text`, and in blip2_dist_export.json, which our caption and evaluate
commands read. The end-of-caption token also goes into config.json's text_config.eos_token_id: BLIP-2's
generate() hands generation to its language model, whose defaults come from text_config, not from
generation_config.json, so a bare `model.generate(**inputs)` still stops where training ended captions.

The merge runs in float32 (one rounding to `dtype` at the end, as close to the adapter as `dtype`
allows): it needs about 4 bytes of CPU memory per parameter (~16 GB for the 3.9B models).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig

from blip2_dist.adapters import ADAPTER_META, CARD, EXPORT_META, load_for_inference, read_meta
from blip2_dist.cards import render_card
from blip2_dist.config import EvalArgs
from blip2_dist.data.transforms import end_of_caption_id
from blip2_dist.errors import UserError
from blip2_dist.models import family_of

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Copied from the adapter's record into the export's; the card is rendered from them.
CARRIED = ("base_model", "family", "lora", "extras", "step", "caption_format", "generation", "training", "metrics")


def export_merged(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """Write the merged model folder (see the module docstring) and return its path.

    The folder appears complete or not at all (written beside it, then renamed). An existing
    `out_dir` is replaced only with overwrite=True, and only if it is an earlier export (it holds
    blip2_dist_export.json): nothing this did not write is ever deleted.
    """
    adapter, out = Path(adapter_dir), Path(out_dir)
    meta = _adapter_meta(adapter)
    _check_destination(out, overwrite)
    if dtype == torch.float16 and meta.get("family") == "t5":
        logger.warning("FlanT5 overflows in float16 (transformers issue 23918); bfloat16 or float32 is safer")
    model, processor = load_for_inference(None, adapter, dtype=torch.float32, merge=True)
    end_ids = end_of_caption_ids(meta, processor, model.config)
    model.generation_config = merged_generation_config(model, processor, meta.get("generation"), end_ids)
    _align_text_eos(model, end_ids)
    export_meta = {
        "format": 1,
        "kind": "merged",
        "dtype": str(dtype).removeprefix("torch."),
        "adapter": str(adapter),
        "command": command,
        **{k: meta[k] for k in CARRIED if k in meta},
    }
    export_meta.setdefault("caption_format", {}).setdefault("end_of_caption_ids", end_ids)
    tmp = out.with_name(f".{out.name}.export-tmp-{os.getpid()}")
    try:
        model.to(dtype).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / EXPORT_META).write_text(json.dumps(export_meta, indent=2, ensure_ascii=False) + "\n")
        (tmp / CARD).write_text(render_card(export_meta, kind="merged"), encoding="utf-8")
        old = out.with_name(f".{out.name}.export-old-{os.getpid()}")
        if out.exists():  # an earlier export (checked above): moved aside, deleted once the new one is in place
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _adapter_meta(adapter: Path) -> dict:
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {adapter}: no adapter_config.json there (expected a folder saved by "
            "training, e.g. RUN/best or RUN/checkpoints/step_N/adapter)"
        )
    if not (adapter / ADAPTER_META).is_file():
        raise UserError(
            f"--adapter {adapter}: no {ADAPTER_META}, so its base model is unknown "
            "(export adapters saved by blip2-dist training)"
        )
    meta = read_meta(adapter)
    if meta.get("random_init"):
        raise UserError(f"--adapter {adapter} was trained on a random-init base (benchmarks only): nothing to export")
    return meta


def _check_destination(out: Path, overwrite: bool) -> None:
    if not out.exists():
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: its parent folder {out.parent} does not exist")
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder holds nothing to lose
        return
    if not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace an earlier export, or choose a new folder")
    if not (out / EXPORT_META).is_file():
        raise UserError(
            f"--out {out} exists and is not an export of ours (no {EXPORT_META}); "
            "--overwrite replaces only earlier exports"
        )


def end_of_caption_ids(meta: dict, processor, config) -> list[int]:
    """The token id(s) that end captions: as recorded, else end_of_caption_id, the rule labels and generation use."""
    recorded = (meta.get("caption_format") or {}).get("end_of_caption_ids")
    if recorded:
        return [int(i) for i in recorded]
    return [end_of_caption_id(config, processor.tokenizer)]


def merged_generation_config(model, processor, generation: dict | None, end_ids: list[int]) -> GenerationConfig:
    """The recorded generate() settings (or the evaluation defaults), stopping at the end-of-caption token."""
    text = model.config.text_config
    settings = {**EvalArgs().generation(), **(generation or {})}
    config = GenerationConfig(
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=end_ids[0] if len(end_ids) == 1 else end_ids,
        pad_token_id=processor.tokenizer.pad_token_id,
        **settings,
    )
    if family_of(model) == "t5":
        config.decoder_start_token_id = text.decoder_start_token_id
    config.validate(strict=True)
    return config


def _align_text_eos(model, end_ids: list[int]) -> None:
    # The language model's own generation defaults come from text_config (see the module docstring).
    if len(end_ids) == 1 and model.config.text_config.eos_token_id != end_ids[0]:
        model.config.text_config.eos_token_id = end_ids[0]
        model.language_model.generation_config.eos_token_id = end_ids[0]
