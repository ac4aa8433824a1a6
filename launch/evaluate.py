"""Caption a split on every rank and score it once with the COCO toolkit.

    deepspeed launch/evaluate.py --model Salesforce/blip2-flan-t5-xl --adapter runs/ft5xl/best \
        --data shards/flickr8k --split test --output-dir runs/ft5xl/test
    python launch/evaluate.py --model Salesforce/blip2-opt-2.7b --data shards/flickr8k   # zero-shot, 1 GPU
CPU, 2 ranks:  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/evaluate.py \
        --model tiny-t5 --adapter runs/demo/best --data shards/synthetic --num-beams 1
Writes predictions.json, results.json, gallery.html and TensorBoard scalars into --output-dir.
"""

import argparse
import sys

import torch

from blip2_dist import dist
from blip2_dist.config import DEFAULT_MODEL, EvalArgs, add_section_args
from blip2_dist.evaluate import evaluate_model
from blip2_dist.logging import build_writer
from blip2_dist.adapters import load_for_inference
from blip2_dist.data.urls import RetryPolicy


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base BLIP-2: hub id, local dir, tiny-t5, tiny-opt "
                   "(default: the adapter's base, else Salesforce/blip2-flan-t5-xl)")
    p.add_argument("--adapter", default=None, help="adapter directory saved by training (omit for zero-shot)")
    p.add_argument("--data", required=True, help="shard folder with manifest.json, a manifest's path or URL, "
                   "or shard URLs with {a..b} patterns; several joined by '::' (docs/data.md)")
    p.add_argument("--data-retries", type=int, default=5, help="failed remote reads in a row retried with backoff")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--output-dir", default=None, help="where results go (default: ADAPTER/eval-SPLIT or runs/eval-SPLIT)")
    p.add_argument("--prompt", default="", help="generation prompt; use the one the adapter was trained with")
    p.add_argument("--num-workers", type=int, default=1, help="loader workers per rank")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="inference dtype")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_section_args(p, EvalArgs, "generation and scoring")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    fields = EvalArgs.__dataclass_fields__
    eval_args = EvalArgs(**{k: v for k, v in vars(a).items() if k in fields})
    out = a.output_dir or (f"{a.adapter.rstrip('/')}/eval-{a.split}" if a.adapter else f"runs/eval-{a.split}")
    info = dist.init_distributed()
    model, processor = load_for_inference(a.model or (None if a.adapter else DEFAULT_MODEL), a.adapter, dtype=getattr(torch, a.dtype))
    model.to(dist.device_for(info))
    writer = build_writer(f"{out}/tensorboard", info.is_main)
    evaluate_model(model, processor, a.data, a.split, eval_args, out, writer=writer,
                   num_workers=a.num_workers, prompt=a.prompt, retry=RetryPolicy(retries=a.data_retries))
    writer.close()
    dist.print0(f"results in {out}/results.json, gallery in {out}/gallery.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
