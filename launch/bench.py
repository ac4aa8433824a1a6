"""Benchmarks. One subcommand per thing measured; the logic lives in the library.

    python launch/bench.py loader --synthesize 400 --images /tmp/flickr_like     # CPU, minutes
    python launch/bench.py loader --images shards/flickr8k --workers 8 --json loader.json
    python launch/bench.py train --model tiny-t5 --steps 20                       # CPU, ~1 minute
    python launch/bench.py train --model Salesforce/blip2-opt-2.7b --random-init --device cuda \
        --micro-batch 16 --steps 30 --json train.json                            # one GPU, no download
    python launch/bench.py preprocess photos/*.jpg --json preprocess.json     # pixels vs the hub processor
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def add_loader(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loader", help="shard stream vs the seed notebook's per-item processor loader",
                       description="Images/s and examples/s of TrainStream against the notebook loader.")
    p.add_argument("--images", required=True,
                   help="packed shard folder (manifest.json) or a folder of JPEGs (+ optional captions.json)")
    p.add_argument("--synthesize", type=int, default=0, metavar="N",
                   help="first write N Flickr8k-sized (500x375, ~110 KB) synthetic JPEGs into --images")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode images to this long side when packing a JPEG folder (like pack --max-side)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for both loaders")
    p.add_argument("--micro-batch", type=int, default=16, help="examples per batch for both loaders")
    p.add_argument("--image-size", type=int, default=224, help="model image size (224 or 364 for real BLIP-2)")
    p.add_argument("--caption-mode", choices=["all", "random"], default="all", help="stream caption handling")
    p.add_argument("--prompt", default="", help="stream prompt, e.g. 'a photo of'")
    p.add_argument("--max-batches", type=int, default=None, help="stop the stream after this many batches")
    p.add_argument("--baseline-items", type=int, default=400, help="examples the baseline loads")
    p.add_argument("--skip-baseline", action="store_true", help="measure the stream only")
    p.add_argument("--shards-out", default=None,
                   help="when packing a JPEG folder, write the shards here (kept) instead of a temp folder")
    p.add_argument("--repeat", type=int, default=3, help="runs per loader (alternating); the median is shown")
    p.add_argument("--uint8", action="store_true",
                   help="stream hands out uint8 pixels (normalize=False: the trainer normalises on the GPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=run_loader)


def run_loader(args: argparse.Namespace) -> None:
    from blip2_dist.data.bench_loader import run

    report = run(args.images, workers=args.workers, micro_batch=args.micro_batch, image_size=args.image_size,
                 caption_mode=args.caption_mode, max_side=args.max_side, max_batches=args.max_batches,
                 baseline_items=args.baseline_items, skip_baseline=args.skip_baseline,
                 synthesize_n=args.synthesize, prompt=args.prompt,
                 shards_out=args.shards_out, repeat=args.repeat, normalize=not args.uint8)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="our trainer step vs the HF PEFT notebook's loop, same model and batch",
                       description="Samples/s, tokens/s, s/step, peak memory, TFLOP/s and MFU of our "
                       "DeepSpeed ZeRO-2 step (vision encoder once per image) and of the HF PEFT notebook's "
                       "plain loop, in one run, with ours/baseline ratios. See blip2_dist/bench_train.py.")
    p.add_argument("--model", default="tiny-t5",
                   help="tiny-t5 / tiny-opt, or a hub id with --random-init (Salesforce/blip2-opt-2.7b, "
                   "Salesforce/blip2-flan-t5-xl), or a local BLIP-2 directory")
    p.add_argument("--random-init", action="store_true",
                   help="build the real architecture of --model with random weights (no download)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights and compute dtype, both sides")
    p.add_argument("--micro-batch", type=int, default=16, help="captions per step, both sides")
    p.add_argument("--captions-per-image", type=int, default=5, help="caption group size (Flickr8k: 5)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--seed", type=int, default=0, help="weights, LoRA init, data")
    p.add_argument("--group-images", action=argparse.BooleanOptionalAction, default=True,
                   help="ours: vision encoder once per image (--no-group-images: once per caption)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="ours: activation checkpointing (non-reentrant) in the ViT, Q-Former and LM")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="ours: torch.compile the ViT, Q-Former and LM (in place)")
    p.add_argument("--fused-adamw", choices=["auto", "on", "off"], default="auto",
                   help="ours: torch AdamW fused kernel (auto: the trainer's choice, fused on CUDA)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the notebook baseline (--no-baseline: ours only)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each side in its own process (own peak memory); --no-isolate: in this process")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per side, alternating, median shown (default: 3 on CPU, where neighbours add "
                   "noise; 1 on CUDA)")
    p.add_argument("--flops-only", action="store_true",
                   help="print both sides' FLOPs per step from the formula (real sizes on the meta device) "
                   "and exit: no training, no memory")
    p.add_argument("--time-vision", action="store_true",
                   help="also time the vision encoder's forward (synchronised): the most a feature cache saves")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's bf16 dense peak for MFU, when it is not in the built-in table")
    p.add_argument("--deepspeed", default="ds_configs/zero2.json", help="ours: DeepSpeed config")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> None:
    import torch

    from blip2_dist.bench_train import TrainBenchConfig, estimate_flops, run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainBenchConfig(
        model=args.model, random_init=args.random_init, device=device, dtype=args.dtype,
        micro_batch=args.micro_batch, captions_per_image=args.captions_per_image, steps=args.steps,
        warmup=args.warmup, seed=args.seed, group_images=args.group_images,
        grad_checkpointing=args.grad_checkpointing, compile=args.compile, fused_adamw=args.fused_adamw,
        baseline=args.baseline, isolate=args.isolate, peak_tflops=args.peak_tflops,
        repeat=args.repeat or (3 if device == "cpu" else 1), time_vision=args.time_vision,
        deepspeed_config=args.deepspeed,
    )
    report = estimate_flops(cfg) if args.flops_only else run(cfg)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="our image pixels vs the hub image processor's, on photos",
                       description="Mean and max |difference| (8-bit levels) between ImageTransform (JPEG draft "
                       "decoding on/off, torch/PIL resize) and BlipImageProcessorPil with the hub settings. "
                       "See blip2_dist/data/bench_preprocess.py.")
    p.add_argument("photos", nargs="+", help="photo files (JPEG or PNG)")
    p.add_argument("--size", type=int, default=224, help="model image size (224 hub, 364 LAVIS caption fine-tune)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=run_preprocess)


def run_preprocess(args: argparse.Namespace) -> None:
    from blip2_dist.data.bench_preprocess import run

    report = run(args.photos, size=args.size)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_loader(sub)
    add_train(sub)
    add_preprocess(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
