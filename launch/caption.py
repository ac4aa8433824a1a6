"""Caption image files with a BLIP-2 base model and, optionally, a fine-tuned adapter.

    python launch/caption.py --model Salesforce/blip2-flan-t5-xl --adapter runs/ft5xl/best photos/*.jpg
    python launch/caption.py --model tiny-t5 --adapter runs/demo/best some/folder --json

Arguments may be files, folders (their images, recursively) or glob patterns. Prints
`path<TAB>caption` (or one JSON object per line with --json). Unreadable images are reported on
stderr by name and skipped; the exit code is 1 if any image failed, 2 if none was captioned.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from blip2_dist.config import DEFAULT_MODEL
from blip2_dist.data.stream import CaptionFormat, ImageTransform
from blip2_dist.adapters import load_for_inference
from blip2_dist.model import generate_captions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def expand_paths(args: list[str]) -> list[Path]:
    """Files as given, folders recursively (image suffixes only), globs expanded; order kept."""
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in arg for ch in "*?["):
            paths += sorted(Path(m) for m in glob.glob(arg, recursive=True))
        else:
            paths.append(p)
    return paths


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decode fully now: a truncated file fails here, named, not inside the batch
        return img.convert("RGB")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--model", default=None, help="base BLIP-2: hub id, local dir, tiny-t5, tiny-opt "
                   "(default: the adapter's base, else Salesforce/blip2-flan-t5-xl)")
    p.add_argument("--adapter", default=None, help="adapter directory saved by training")
    p.add_argument("--prompt", default="", help="prompt the adapter was trained with")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation batch")
    p.add_argument("--num-beams", type=int, default=5, help="beam search width")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption, in tokens")
    p.add_argument("--min-length", type=int, default=8, help="shortest caption, in tokens")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["bfloat16", "float32", "float16"], help="inference dtype")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of path<TAB>caption")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    paths = expand_paths(a.images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_for_inference(a.model or (None if a.adapter else DEFAULT_MODEL), a.adapter, dtype=getattr(torch, a.dtype))
    model.to(device)
    transform = ImageTransform.from_processor(processor)
    fmt = CaptionFormat.from_processor(processor, model.config, prompt=a.prompt)
    failed = done = 0
    for start in range(0, len(paths), a.batch_size):
        batch_paths, images = [], []
        for path in paths[start : start + a.batch_size]:
            try:
                images.append(load_image(path))
                batch_paths.append(path)
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported and skipped
                print(f"error: {path}: cannot read image ({e})", file=sys.stderr)
                failed += 1
        if not images:
            continue
        pixels = transform.batch_from_pil(images).to(device, model.dtype)
        prompts = fmt.encode_prompts(len(images))
        captions = generate_captions(
            model, processor, pixels, prompts["input_ids"].to(device), prompts["attention_mask"].to(device),
            num_beams=a.num_beams, max_new_tokens=a.max_new_tokens, min_new_tokens=a.min_length,
        )
        for path, caption in zip(batch_paths, captions):
            print(json.dumps({"path": str(path), "caption": caption}) if a.json else f"{path}\t{caption}", flush=True)
            done += 1
    if failed:
        print(f"{failed} of {len(paths)} images could not be read", file=sys.stderr)
    return 2 if done == 0 else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
