"""Benchmarks. One subcommand per thing measured; the logic lives in the library.

    python launch/bench.py loader --synthesize 400 --images /tmp/flickr_like     # CPU, minutes
    python launch/bench.py loader --images shards/flickr8k --workers 8 --json loader.json
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_loader(sub)  # other benchmarks (e.g. `train`) add their own subparser here
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
