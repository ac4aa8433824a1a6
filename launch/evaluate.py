"""Caption a split on every rank and score it once with the COCO toolkit.

    deepspeed launch/evaluate.py --adapter runs/ft5xl/best --data shards/flickr8k --split test \
        --output-dir runs/ft5xl/test
    python launch/evaluate.py --model Salesforce/blip2-opt-2.7b --data shards/flickr8k   # zero-shot, 1 GPU
CPU, 2 ranks:  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/evaluate.py \
        --adapter runs/demo/best --data shards/synthetic --num-beams 1
With --adapter (or a merged export as --model) the prompt and generation settings recorded at training
are used; a flag overrides one, with a warning when it differs. Writes predictions.json, results.json
(metrics and the validation loss), gallery.html and TensorBoard scalars and caption cards into
--output-dir; inside a run folder it also refreshes the run's side-by-side page RUN/gallery.html.
Exit codes as launch/train.py's: 0 done, 1 error (one line; --debug for the traceback), 2 bad
command line, 76 another rank failed or was lost.
"""

import argparse
from pathlib import Path

import torch

from blip2_dist import dist
from blip2_dist.adapters import read_meta, recorded_inference, resolve_inference
from blip2_dist.checks import check_adapter, check_model, check_output_dir, check_splits
from blip2_dist.config import (
    DEBUG_HELP, DEFAULT_MODEL, GENERATION_FIELDS, ArgumentParser, EvalArgs, add_section_args, check_values,
)
from blip2_dist.errors import UsageError, run_main
from blip2_dist.evaluate import evaluate_model
from blip2_dist.gallery import write_run_page
from blip2_dist.tensorboard import build_writer
from blip2_dist.adapters import load_for_inference
from blip2_dist.data.urls import RetryPolicy


def parse(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base BLIP-2: hub id, local dir, tiny-t5, tiny-opt "
                   "(default: the adapter's base, else Salesforce/blip2-flan-t5-xl)")
    p.add_argument("--adapter", default=None, help="adapter directory saved by training (omit for zero-shot)")
    p.add_argument("--data", required=True, help="shard folder with manifest.json, a manifest's path or URL, "
                   "or shard URLs with {a..b} patterns; several joined by '::' (docs/data.md)")
    p.add_argument("--data-retries", type=int, default=5, help="failed remote reads in a row retried with backoff")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--output-dir", default=None,
                   help="where results go (default: ADAPTER/eval-SPLIT or runs/eval-SPLIT)")
    p.add_argument("--tensorboard-dir", default=None,
                   help="TensorBoard run folder (default: OUTPUT_DIR/tensorboard); its name is the run's name in "
                   "TensorBoard, e.g. RUN/tensorboard/before-training beside the trainer's RUN/tensorboard/training")
    p.add_argument("--prompt", default=None,
                   help="generation prompt (default: the one the adapter recorded, else none)")
    p.add_argument("--num-workers", type=int, default=1, help="loader workers per rank")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="inference dtype")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_section_args(p, EvalArgs, "generation and scoring (generation defaults: what the adapter recorded)")
    return p.parse_args(argv)


def eval_args(a: argparse.Namespace, generation: dict) -> EvalArgs:
    """Scoring flags as given; generation fields from the resolved (recorded <- flags) settings."""
    given = {k: v for k, v in vars(a).items() if k in EvalArgs.__dataclass_fields__}
    given.update({name: generation[key] for name, key in GENERATION_FIELDS.items()})
    return EvalArgs(**given)


def check(a, eval_args: EvalArgs, out) -> None:
    """Everything checkable before the process group starts (blip2_dist.checks)."""
    check_values(eval_args)
    for flag, value in (("--num-workers", a.num_workers), ("--data-retries", a.data_retries)):
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    check_splits(a.data, {"--split": a.split}, RetryPolicy(retries=a.data_retries))
    if a.adapter:
        check_adapter(a.adapter, a.model)
    if a.model or not a.adapter:
        check_model(a.model or DEFAULT_MODEL)
    check_output_dir(out, "--output-dir")


def main(argv=None) -> int:
    a = parse(argv)
    given = EvalArgs(**{k: v for k, v in vars(a).items() if k in EvalArgs.__dataclass_fields__})
    out = Path(a.output_dir or (f"{a.adapter.rstrip('/')}/eval-{a.split}" if a.adapter else f"runs/eval-{a.split}"))
    check(a, given, out)
    folder = a.adapter or a.model
    recorded = recorded_inference(folder)
    flags = {key: getattr(a, name) for name, key in GENERATION_FIELDS.items() if hasattr(a, name)}
    prompt, generation, notes = resolve_inference(recorded, prompt=a.prompt, given=flags)
    info = dist.init_distributed()
    for note in notes:
        dist.print0(f"warning: {note}")
    model, processor = load_for_inference(a.model or (None if a.adapter else DEFAULT_MODEL), a.adapter,
                                          dtype=getattr(torch, a.dtype))
    model.to(dist.device_for(info))
    meta = read_meta(folder) if folder and Path(folder).is_dir() else {}
    in_run = (out.parent / "config.json").is_file()  # a training run's folder: join its comparison page
    writer = build_writer(a.tensorboard_dir or out / "tensorboard", info.is_main)
    source = {"label": _label(a, meta), "model": a.model or meta.get("base_model"), "adapter": a.adapter}
    evaluate_model(model, processor, a.data, a.split, eval_args(a, generation), out, step=meta.get("step") or 0,
                   writer=writer, num_workers=a.num_workers, prompt=prompt, retry=RetryPolicy(retries=a.data_retries),
                   max_caption_tokens=(meta.get("caption_format") or {}).get("max_caption_tokens", 64),
                   source=source, run_page="../gallery.html" if in_run else None)
    writer.close()
    if info.is_main and in_run:
        write_run_page(out.parent)
    dist.print0(f"results in {out}/results.json, gallery in {out}/gallery.html")
    return 0


def _label(a: argparse.Namespace, meta: dict) -> str:
    if a.adapter:
        return f"adapter {a.adapter}" + (f" (step {meta['step']})" if meta.get("step") is not None else "")
    return f"{a.model or DEFAULT_MODEL} (no adapter)"


if __name__ == "__main__":
    run_main(main)
