"""Caption a split on every rank and score it once with the COCO toolkit.

    deepspeed launch/evaluate.py --adapter runs/ft5xl/best --data shards/flickr8k --split test \
        --output-dir runs/ft5xl/test
    python launch/evaluate.py --model Salesforce/blip2-opt-2.7b --data shards/flickr8k   # zero-shot, 1 GPU
CPU, 2 ranks:  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/evaluate.py \
        --adapter runs/demo/best --data shards/synthetic --num-beams 1
With --adapter (or a merged export as --model) the prompt and generation settings recorded at training
are used; a flag overrides one, with a warning when it differs. Every option: docs/configuration.md.
Writes eval_config.json (the resolved options), predictions.json, results.json (metrics and the
validation loss), gallery.html and TensorBoard scalars and caption cards into --output-dir; inside a
run folder it also refreshes the run's side-by-side page RUN/gallery.html.
Exit codes as launch/train.py's: 0 done, 1 error (one line; --debug for the traceback), 2 bad
command line, 76 another rank failed or was lost.
"""

from pathlib import Path

import torch

from blip2_dist import dist
from blip2_dist.adapters import load_for_inference, read_meta, recorded_inference, resolve_inference
from blip2_dist.checks import check_adapter, check_model, check_output_dir, check_splits
from blip2_dist.commands import base_model, sections_of
from blip2_dist.config import (
    DEFAULT_MODEL,
    GENERATION_FIELDS,
    DataArgs,
    EvalArgs,
    Parsed,
    parse_sections,
    save_config,
)
from blip2_dist.data.urls import RetryPolicy
from blip2_dist.errors import run_main
from blip2_dist.evaluate import evaluate_model
from blip2_dist.gallery import write_run_page
from blip2_dist.tensorboard import build_writer

EVAL_CONFIG = "eval_config.json"  # not config.json: that name marks a training run's or a model's folder


def parse(argv) -> Parsed:
    return parse_sections(argv, __doc__, *sections_of("evaluate"))


def output_dir(p: Parsed) -> Path:
    inf, ev = p.sections["inference"], p.sections["evaluate"]
    if ev.output_dir:
        return Path(ev.output_dir)
    return Path(f"{inf.adapter.rstrip('/')}/eval-{ev.split}" if inf.adapter else f"runs/eval-{ev.split}")


def check(p: Parsed, out: Path) -> None:
    """Everything checkable before the process group starts (blip2_dist.checks); flag types and ranges
    were checked by parse_sections."""
    data, inf = p.sections["data"], p.sections["inference"]
    check_splits(data.data, {"--split": p.sections["evaluate"].split}, RetryPolicy(retries=data.data_retries))
    if inf.adapter:
        check_adapter(inf.adapter, base_model(p) if "model" in p.given else None)
    if base_model(p):
        check_model(base_model(p))
    check_output_dir(out, "--output-dir")


def resolved_eval_args(p: Parsed, generation: dict) -> EvalArgs:
    """Scoring flags as given; generation fields from the resolved (recorded <- flags) settings."""
    args = p.sections["eval"]
    return EvalArgs(**{**vars(args), **{name: generation[key] for name, key in GENERATION_FIELDS.items()}})


def main(argv=None) -> int:
    p = parse(argv)
    out = output_dir(p)
    check(p, out)
    data, inf, ev = p.sections["data"], p.sections["inference"], p.sections["evaluate"]
    folder = inf.adapter or base_model(p)
    flags = {key: getattr(p.sections["eval"], name) for name, key in GENERATION_FIELDS.items() if name in p.given}
    prompt, generation, notes = resolve_inference(
        recorded_inference(folder), given=flags, prompt=data.prompt if "prompt" in p.given else None
    )
    info = dist.init_distributed()
    for note in notes:
        dist.print0(f"warning: {note}")
    model, processor = load_for_inference(base_model(p), inf.adapter, dtype=getattr(torch, inf.dtype))
    model.to(dist.device_for(info))
    meta = read_meta(folder) if folder and Path(folder).is_dir() else {}
    in_run = (out.parent / "config.json").is_file()  # a training run's folder: join its comparison page
    writer = build_writer(ev.tensorboard_dir or out / "tensorboard", info.is_main)
    source = {"label": _label(p, meta), "model": base_model(p) or meta.get("base_model"), "adapter": inf.adapter}
    eval_args = resolved_eval_args(p, generation)
    max_caption_tokens = (meta.get("caption_format") or {}).get("max_caption_tokens", DataArgs().max_caption_tokens)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(
            out / EVAL_CONFIG,
            {**p.sections, "eval": eval_args},
            p.only,
            resolved={"prompt": prompt, "model": source["model"], "max_caption_tokens": max_caption_tokens},
        )
    evaluate_model(
        model,
        processor,
        data.data,
        ev.split,
        eval_args,
        out,
        step=meta.get("step") or 0,
        writer=writer,
        num_workers=data.num_workers,
        prompt=prompt,
        retry=RetryPolicy(retries=data.data_retries),
        max_caption_tokens=max_caption_tokens,
        source=source,
        run_page="../gallery.html" if in_run else None,
    )
    writer.close()
    if info.is_main and in_run:
        write_run_page(out.parent)
    dist.print0(f"results in {out}/results.json, gallery in {out}/gallery.html")
    return 0


def _label(p: Parsed, meta: dict) -> str:
    adapter = p.sections["inference"].adapter
    if adapter:
        return f"adapter {adapter}" + (f" (step {meta['step']})" if meta.get("step") is not None else "")
    return f"{base_model(p) or DEFAULT_MODEL} (no adapter)"


if __name__ == "__main__":
    run_main(main)
