"""The packer's command line: shards + manifest.json from an image-caption source (blip2_dist.data.pack).

    python -m blip2_dist.data.pack_cli flickr8k ~/data/flickr8k --out shards/flickr8k
    python -m blip2_dist.data.pack_cli flickr8k ~/data/flickr8k --out shards/f8k364 --max-side 364
    python -m blip2_dist.data.pack_cli karpathy ~/data/coco/dataset_coco.json --out shards/coco_karpathy
    python -m blip2_dist.data.pack_cli coco ~/data/coco --year 2017 --out shards/coco2017
    python -m blip2_dist.data.pack_cli hf ~/data/my_captions --out shards/mine --split-ratio 0.8,0.1,0.1
    python -m blip2_dist.data.pack_cli img2dataset 'cc/{00000..00009}.tar' --out shards/cc   # captions per image
    python -m blip2_dist.data.pack_cli index 'https://host/cc/{00000..00099}.tar' --out cc/manifest.json
    python -m blip2_dist.data.pack_cli synthetic --out shards/synthetic      # the demo's set, seconds
    (`blip2-pack ...` is the same command once the package is installed.)

Each subcommand reads one source layout and writes shards + manifest.json into --out through
blip2_dist.data.pack_cli (records, image preparation, atomic output); `index` counts shards that have
no manifest; `synthetic` writes the demo's procedural set. Exit codes: 0 packed, 1 error (one
line; --debug for the traceback; --out is left as it was), 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

from blip2_dist.data.flickr8k import LAYOUTS, PackError
from blip2_dist.data.hf_datasets import CAPTION_COLUMNS
from blip2_dist.data.pack import (
    DEFAULT_QUALITY, check_options, pack_coco, pack_flickr8k, pack_hf, pack_img2dataset, pack_karpathy,
    summarize_manifest,
)
from blip2_dist.data.shards import MANIFEST, SPLITS
from blip2_dist.data.staging import check_out, staged_out
from blip2_dist.errors import UserError, run_main


def _add_output(p: argparse.ArgumentParser) -> None:
    """The flags of where a pack goes, shared by every subcommand."""
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards and manifest.json: "
                   "missing, empty, or holding a pack written here before (replaced when the new one is complete)")
    p.add_argument("--overwrite", action="store_true", help="write into a --out that holds other files: files "
                   "named like the pack's are replaced, the rest kept")
    p.add_argument("--debug", action="store_true", help="print tracebacks of errors (also: BLIP2_DEBUG=1)")


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_output(p)
    p.add_argument("--samples-per-shard", "--images-per-shard", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    p.add_argument("--max-side", type=int, default=None, metavar="N", help="re-encode images whose long side exceeds N to N (default: keep the original bytes)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q", help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="image reading/decoding/re-encoding threads (default: CPU count, at most 8; 1 = no pool)")
    p.add_argument("--skip-bad", action="store_true", help="pack the rest when input is bad; list what was left out in the manifest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2-pack", description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flickr8k", help="pack a Flickr8k folder (original, karpathy or kaggle layout)")
    f.add_argument("source", help="the folder where Flickr8k was unzipped")
    f.add_argument("--format", choices=LAYOUTS, default=None, help="force the layout (default: detected)")
    f.add_argument("--images", default=None, metavar="DIR", help="the image folder, if it can't be found beside the text files")
    f.add_argument("--splits", default=None, metavar="DIR", help="kaggle layout: folder with Flickr_8k.{train,dev,test}Images.txt (default: sha1 hash split 6:1:1)")
    _add_common(f)
    h = sub.add_parser("hf", help="pack a Hugging Face datasets image-caption set on disk (imagefolder or save_to_disk)")
    h.add_argument("path", help="an imagefolder (images + metadata.jsonl) or a save_to_disk folder")
    h.add_argument("--image-column", default="image", help="image column (default: image)")
    h.add_argument("--caption-column", nargs="+", default=None, help=f"caption column(s), each a string or a list of strings (default: first of {', '.join(CAPTION_COLUMNS)})")
    h.add_argument("--split-column", default=None, help="column naming each row's split (train/validation|val|dev/test)")
    h.add_argument("--split-ratio", default=None, metavar="A,B,C", help="re-split by a hash of the image id, e.g. 0.8,0.1,0.1 (default: the dataset's own splits)")
    h.add_argument("--cache-dir", default=None, metavar="DIR", help="datasets cache for the imagefolder loader (default: HF_DATASETS_CACHE)")
    _add_common(h)
    k = sub.add_parser("karpathy", help="pack Karpathy's dataset_coco.json / dataset_flickr30k.json / "
                       "dataset_flickr8k.json")
    k.add_argument("source", help="the json, or the folder holding it and the images")
    k.add_argument("--images", default=None, metavar="DIR",
                   help="the image folder (COCO: the folder holding train2014/ and val2014/)")
    _add_common(k)
    c = sub.add_parser("coco", help="pack the official COCO captions (annotations/captions_{train,val}YEAR.json)")
    c.add_argument("source", help="the folder holding annotations/ and train2014/ val2014/ (or train2017/ val2017/)")
    c.add_argument("--year", type=int, choices=[2014, 2017], default=None,
                   help="which release (default: the one present)")
    c.add_argument("--images", default=None, metavar="DIR", help="the folder holding train{YEAR}/ and val{YEAR}/")
    _add_common(c)
    urls_help = "shard URLs with {a..b} patterns (paths, http(s)://, pipe:CMD), several joined by '::'"
    i = sub.add_parser("img2dataset", help="convert img2dataset-style shards (jpg/txt/json), captions grouped "
                       "per image")
    i.add_argument("shards", help=urls_help)
    i.add_argument("--group-by", default=None, metavar="FIELD",
                   help="json field naming the image (default: image_id if present, else url)")
    i.add_argument("--split", default="train", choices=SPLITS, help="the split of every image (default train)")
    i.add_argument("--split-ratio", default=None, metavar="A,B,C",
                   help="or split by a hash of the image id, e.g. 0.98,0.01,0.01")
    i.add_argument("--retries", type=int, default=5, help="failed remote reads in a row retried with backoff")
    _add_common(i)
    x = sub.add_parser("index", help="count shards that have no manifest (one read of each) into a manifest.json")
    x.add_argument("shards", help=urls_help)
    x.add_argument("--out", required=True, help="the manifest to write (a .json path, or a folder for "
                   "DIR/manifest.json); other splits in it are kept")
    x.add_argument("--split", default="train", choices=SPLITS, help="the split these shards are (default train)")
    x.add_argument("--workers", type=int, default=None, help="shards read at once (default: CPU count, at most 4)")
    x.add_argument("--retries", type=int, default=5, help="failed remote reads in a row retried with backoff")
    x.add_argument("--debug", action="store_true", help="print tracebacks of errors (also: BLIP2_DEBUG=1)")
    s = sub.add_parser("synthetic", help="write the procedural shapes set used by the demo and the tests")
    _add_output(s)
    s.add_argument("--n-train", type=int, default=2000, help="train images (default 2000)")
    s.add_argument("--n-val", type=int, default=100, help="val images (default 100)")
    s.add_argument("--n-test", type=int, default=100, help="test images (default 100)")
    s.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed (same seed, same shards)")
    s.add_argument("--samples-per-shard", type=int, default=50, help="images per shard (default 50)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "index":  # writes a manifest beside shards it did not write: that is its job
            from blip2_dist.data.index import index_shards
            from blip2_dist.data.urls import RetryPolicy

            index_shards(args.shards, args.out, split=args.split, workers=args.workers,
                         retry=RetryPolicy(retries=args.retries))
            return 0
        check_out(args.out, args.overwrite)  # before the source is read: a refusal costs nothing
        if args.command == "synthetic":
            from blip2_dist.data.synthetic import write_synthetic

            check_options(args.samples_per_shard, None, DEFAULT_QUALITY, None)
            for flag, value, low in (("--n-train", args.n_train, 0), ("--n-val", args.n_val, 0),
                                     ("--n-test", args.n_test, 0), ("--image-size", args.image_size, 16)):
                if value < low:
                    raise PackError(f"{flag} must be >= {low}, got {value}")
            with staged_out(args.out, args.overwrite) as tmp:
                manifest = write_synthetic(
                    tmp, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                    image_size=args.image_size, seed=args.seed, samples_per_shard=args.samples_per_shard,
                )
        else:
            options = dict(
                samples_per_shard=args.samples_per_shard, max_side=args.max_side, quality=args.quality,
                workers=args.workers, skip_bad=args.skip_bad, progress=not args.no_progress,
                overwrite=args.overwrite,
            )
            check_options(args.samples_per_shard, args.max_side, args.quality, args.workers)
            if args.command == "flickr8k":
                manifest = pack_flickr8k(args.source, args.out, format=args.format, images_dir=args.images, splits_dir=args.splits, **options)
            elif args.command == "karpathy":
                manifest = pack_karpathy(args.source, args.out, images_dir=args.images, **options)
            elif args.command == "coco":
                manifest = pack_coco(args.source, args.out, year=args.year, images_dir=args.images, **options)
            elif args.command == "img2dataset":
                manifest = pack_img2dataset(args.shards, args.out, group_by=args.group_by, split=args.split,
                                            split_ratio=args.split_ratio, retries=args.retries, **options)
            else:
                manifest = pack_hf(
                    args.path, args.out, image_column=args.image_column, caption_column=args.caption_column,
                    split_column=args.split_column, split_ratio=args.split_ratio, cache_dir=args.cache_dir, **options,
                )
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"error: nothing packed; {args.out} is as it was" if args.command != "index" else
              f"error: {args.out} not written", file=sys.stderr)
        return 1
    except UserError as e:  # a remote shard that could not be read, named
        print(f"error: {e}", file=sys.stderr)
        if args.command != "index":
            print(f"error: nothing packed; {args.out} is as it was", file=sys.stderr)
        return 1
    print(summarize_manifest(manifest, time.perf_counter() - start))
    print(f"wrote {Path(args.out) / MANIFEST}")
    return 0


def cli() -> NoReturn:
    """`blip2-pack` and `python -m blip2_dist.data.pack_cli`: main, ended through errors.run_main."""
    run_main(main)


if __name__ == "__main__":
    cli()
