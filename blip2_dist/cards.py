"""Model cards: the README.md written into every adapter and every merged export.

    text = render_card(meta, kind="adapter")   # meta: what blip2_dist_adapter.json holds
    text = render_card(meta, kind="merged")    # meta: what blip2_dist_export.json holds

A card says what the folder is (base model, data and split, LoRA settings, the prompt, the
end-of-caption token, the generation settings), how good it is (metrics with their split and
step) and how it was made (the training command, and the export command for a merged model),
then how to use it: with blip2-dist, and with plain transformers (+ peft for an adapter).
The YAML header is what the Hugging Face hub reads when the folder is uploaded.
"""

from __future__ import annotations

import json
from typing import Any

HUB_TAGS = ["blip-2", "image-captioning", "image-to-text", "lora", "blip2-dist"]


def render_card(meta: dict[str, Any], kind: str) -> str:
    """Markdown for an adapter folder (kind="adapter") or a merged export (kind="merged")."""
    if kind not in ("adapter", "merged"):
        raise ValueError(f"card kind must be 'adapter' or 'merged', got {kind!r}")
    parts = [_header(meta, kind), _title(meta, kind), _facts(meta, kind), _metrics(meta), _usage(meta, kind)]
    return "\n".join(p for p in parts if p) + "\n"


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _header(meta: dict, kind: str) -> str:
    lines = ["---", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}"]
    if _is_hub_id(meta.get("base_model")):
        lines.append(f"base_model: {meta['base_model']}")
    lines += ["pipeline_tag: image-to-text", "tags:"] + [f"- {t}" for t in HUB_TAGS] + ["---", ""]
    return "\n".join(lines)


def _title(meta: dict, kind: str) -> str:
    base = meta.get("base_model") or "BLIP-2"
    what = "LoRA adapter" if kind == "adapter" else f"merged model ({meta.get('dtype', '?')})"
    step = meta.get("step")
    trained = f", fine-tuned for {step} optimizer steps" if step is not None else ""
    return f"# BLIP-2 image captioning: {what} for {base}\n\nMade with blip2-dist{trained}.\n"


def _code(value: Any) -> str:
    return f"`{value}`"


def _quoted(text: str) -> str:
    """A string that may be empty or hold "\n": shown JSON-quoted, so both are visible."""
    return "`" + json.dumps(text, ensure_ascii=False) + "`"


def _lora_line(lora: dict | None, extras: list[str]) -> str:
    if not lora:
        return "—"
    targets = lora.get("targets") or "family default"
    text = f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, language model: {targets}"
    for part in ("qformer_targets", "vision_targets"):
        if lora.get(part):
            text += f", {part.split('_')[0]}: {lora[part]}"
    if extras:
        text += f"; also trained: {', '.join(sorted({e.split('.')[0] for e in extras}))}"
    return text


def _facts(meta: dict, kind: str) -> str:
    fmt = meta.get("caption_format") or {}
    training = meta.get("training") or {}
    rows = [("base model", _code(meta.get("base_model"))), ("family", meta.get("family", "?"))]
    if training:
        rows.append(
            (
                "data",
                f"{_code(training.get('data'))}, trained on split `{training.get('train_split')}`, "
                f"evaluated on `{training.get('eval_split')}`",
            )
        )
        batch = (
            f"{training.get('micro_batch')} captions x {training.get('grad_accum')} accumulation x "
            f"{training.get('world_size')} ranks = {training.get('global_batch')} per step"
        )
        rows.append(("batch", batch))
        rows.append(
            (
                "optimizer",
                f"lr {training.get('lr')}, {training.get('precision')}, DeepSpeed {_code(training.get('deepspeed'))}",
            )
        )
    rows.append(("LoRA", _lora_line(meta.get("lora"), meta.get("extras") or [])))
    rows.append(("prompt", _quoted(fmt.get("prompt", "")) + " (pass it as the processor's `text`)"))
    if "end_of_caption" in fmt:
        rows.append(("end of caption", f"{_quoted(fmt['end_of_caption'])} (token ids {fmt.get('end_of_caption_ids')})"))
    if meta.get("generation"):
        rows.append(("generation", ", ".join(f"{k}={v}" for k, v in meta["generation"].items())))
    if training.get("command"):
        rows.append(("trained with", _code(training["command"])))
    if kind == "merged":
        rows.append(("merged from", _code(meta.get("adapter"))))
        rows.append(("exported with", _code(meta.get("command"))))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## What it is\n\n| | |\n|---|---|\n{table}\n"


def _metrics(meta: dict) -> str:
    metrics = meta.get("metrics")
    if not metrics or not metrics.get("values"):
        return "## Metrics\n\nNot evaluated at this step (a training run's `best/` adapter carries its metrics).\n"
    values = metrics["values"]
    head = "| " + " | ".join(values) + " |"
    sep = "|" + "---|" * len(values)
    row = "| " + " | ".join(f"{v:.4f}" for v in values.values()) + " |"
    note = (
        f"Split `{metrics.get('split')}`, {metrics.get('images', '?')} images, step {metrics.get('step')}; "
        'COCO caption toolkit (fractions: BLEU-4 0.438 = "43.8")'
    )
    note += "; `loss`: teacher-forced loss on the split's reference captions." if "loss" in values else "."
    return f"## Metrics\n\n{note}\n\n{head}\n{sep}\n{row}\n"


def _usage(meta: dict, kind: str) -> str:
    prompt = json.dumps((meta.get("caption_format") or {}).get("prompt", ""), ensure_ascii=False)
    if kind == "adapter":
        ours = "python launch/caption.py --adapter THIS_FOLDER photos/   # uses the prompt and settings recorded here"
        imports = "from peft import PeftModel\nfrom safetensors.torch import load_file\n"
        load = (
            "base = Blip2ForConditionalGeneration.from_pretrained(BASE, dtype=torch.bfloat16)\n"
            "model = PeftModel.from_pretrained(base, FOLDER).eval()\n"
            "# if FOLDER has extra_trainable.safetensors (trained query tokens, projection, Q-Former):\n"
            '# base.load_state_dict(load_file(f"{FOLDER}/extra_trainable.safetensors"), strict=False)\n'
            "processor = Blip2Processor.from_pretrained(FOLDER)"
        )
        settings = ", ".join(f"{k}={v!r}" for k, v in (meta.get("generation") or {}).items())
        call = f"ids = model.generate(**inputs, {settings})" if settings else "ids = model.generate(**inputs)"
    else:
        ours = "python launch/caption.py --model THIS_FOLDER photos/   # uses the prompt and settings recorded here"
        imports = ""
        load = (
            "model = Blip2ForConditionalGeneration.from_pretrained(FOLDER, dtype=torch.bfloat16).eval()\n"
            "processor = Blip2Processor.from_pretrained(FOLDER)"
        )
        call = (
            "# Pass the generation config explicitly: BLIP-2's generate() hands generation to its language\n"
            "# model, which does not read this folder's generation_config.json (transformers 5).\n"
            "ids = model.generate(**inputs, generation_config=model.generation_config)"
        )
    decoder_only = meta.get("family") == "opt"
    cut = 'ids = ids[:, inputs["input_ids"].shape[1]:]  # OPT returns the prompt first\n' if decoder_only else ""
    return f"""## Use

With blip2-dist:
```
{ours}
```
With plain transformers:
```python
import torch
from PIL import Image
{imports}from transformers import Blip2ForConditionalGeneration, Blip2Processor

{load}
PROMPT = {prompt}  # the training prompt
inputs = processor(images=Image.open("photo.jpg").convert("RGB"), text=PROMPT, return_tensors="pt")
{call}
{cut}print(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
```
"""
