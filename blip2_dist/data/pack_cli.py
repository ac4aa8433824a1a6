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
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from blip2_dist.commands import PACK_SOURCES, sections_of
from blip2_dist.config import DEBUG_HELP, add_section_args, save_config, section_from
from blip2_dist.data.flickr8k import PackError
from blip2_dist.data.pack import (
    DEFAULT_QUALITY,
    check_options,
    pack_coco,
    pack_flickr8k,
    pack_hf,
    pack_img2dataset,
    pack_karpathy,
    summarize_manifest,
)
from blip2_dist.data.shards import MANIFEST
from blip2_dist.data.staging import PACK_CONFIG, check_out, staged_out
from blip2_dist.errors import UserError, run_main

SUBCOMMAND_HELP = {
    **{name: text for name, (_, text) in PACK_SOURCES.items()},
    "index": "count shards that have no manifest (one read of each) into a manifest.json",
    "synthetic": "write the procedural shapes set used by the demo and the tests",
}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per source; its flags from its sections (blip2_dist.commands.COMMANDS)."""
    parser = argparse.ArgumentParser(
        prog="blip2-pack",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMAND_HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for title, cls in sections_of(f"pack {name}")[0].items():
            add_section_args(p, cls, title)
        p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def parse(argv: Sequence[str] | None) -> tuple[str, dict]:
    """(subcommand, its sections), each section built from the flags given and checked."""
    args = build_parser().parse_args(argv)
    sections = sections_of(f"pack {args.command}")[0]
    return args.command, {title: section_from(cls, args) for title, cls in sections.items()}


def pack_source(command: str, s: dict) -> dict:
    """Pack one source layout into --out; the manifest."""
    src, out, opt = s["source"], s["output"].out, s["pack"]
    options = dict(
        samples_per_shard=opt.samples_per_shard,
        max_side=opt.max_side,
        quality=opt.quality,
        workers=opt.workers,
        skip_bad=opt.skip_bad,
        progress=opt.progress,
        overwrite=s["output"].overwrite,
    )
    check_options(opt.samples_per_shard, opt.max_side, opt.quality, opt.workers)
    if command == "flickr8k":
        return pack_flickr8k(
            src.source, out, format=src.format, images_dir=src.images, splits_dir=src.splits, **options
        )
    if command == "karpathy":
        return pack_karpathy(src.source, out, images_dir=src.images, **options)
    if command == "coco":
        return pack_coco(src.source, out, year=src.year, images_dir=src.images, **options)
    if command == "img2dataset":
        return pack_img2dataset(
            src.shards,
            out,
            group_by=src.group_by,
            split=src.split,
            split_ratio=src.split_ratio,
            retries=src.retries,
            **options,
        )
    return pack_hf(
        src.path,
        out,
        image_column=src.image_column,
        caption_column=src.caption_column,
        split_column=src.split_column,
        split_ratio=src.split_ratio,
        cache_dir=src.cache_dir,
        **options,
    )


def pack_synthetic(s: dict) -> dict:
    syn, out = s["synthetic"], s["output"]
    from blip2_dist.data.synthetic import write_synthetic

    check_options(syn.samples_per_shard, None, DEFAULT_QUALITY, None)
    for flag, value, low in (
        ("--n-train", syn.n_train, 0),
        ("--n-val", syn.n_val, 0),
        ("--n-test", syn.n_test, 0),
        ("--image-size", syn.image_size, 16),
    ):
        if value < low:
            raise PackError(f"{flag} must be >= {low}, got {value}")
    with staged_out(out.out, out.overwrite) as tmp:
        return write_synthetic(
            tmp,
            n_train=syn.n_train,
            n_val=syn.n_val,
            n_test=syn.n_test,
            image_size=syn.image_size,
            seed=syn.seed,
            samples_per_shard=syn.samples_per_shard,
        )


def main(argv: Sequence[str] | None = None) -> int:
    command, s = parse(argv)
    out = s["index"].out if command == "index" else s["output"].out
    start = time.perf_counter()
    try:
        if command == "index":  # writes a manifest beside shards it did not write: that is its job
            from blip2_dist.data.index import index_shards
            from blip2_dist.data.urls import RetryPolicy

            x = s["index"]
            index_shards(x.shards, x.out, split=x.split, workers=x.workers, retry=RetryPolicy(retries=x.retries))
            return 0
        check_out(out, s["output"].overwrite)  # before the source is read: a refusal costs nothing
        manifest = pack_synthetic(s) if command == "synthetic" else pack_source(command, s)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        print(
            f"error: nothing packed; {out} is as it was" if command != "index" else f"error: {out} not written",
            file=sys.stderr,
        )
        return 1
    except UserError as e:  # a remote shard that could not be read, named
        print(f"error: {e}", file=sys.stderr)
        if command != "index":
            print(f"error: nothing packed; {out} is as it was", file=sys.stderr)
        return 1
    save_config(Path(out) / PACK_CONFIG, s, command=command)
    print(summarize_manifest(manifest, time.perf_counter() - start))
    print(f"wrote {Path(out) / MANIFEST}")
    return 0


def cli() -> NoReturn:
    """`blip2-pack` and `python -m blip2_dist.data.pack_cli`: main, ended through errors.run_main."""
    run_main(main)


if __name__ == "__main__":
    cli()
