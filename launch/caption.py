"""Caption image files with a BLIP-2 base model and, optionally, a fine-tuned adapter.

    python launch/caption.py --adapter runs/ft5xl/best photos/*.jpg         # base: the adapter's
    python launch/caption.py --model exports/ft5xl photos/ --json           # a merged export
    python launch/caption.py --adapter runs/demo/best some/folder --do-sample --top-p 0.9 --num-return-sequences 3
    python launch/caption.py --model exports/flan-t5-xxl --device-map auto photos/   # larger than one GPU
    python launch/caption.py --model exports/flan-t5-xxl --device-map auto --max-memory 0=20GiB,cpu=60GiB photos/

Arguments may be files, folders (their images, recursively) or glob patterns. Prints
`path<TAB>caption` (one line per caption) or one JSON object per image with --json. The prompt
and generation settings an adapter (or export) recorded at training are used unless a flag says
otherwise (a warning names each value that differs from training's). Unreadable images are reported
on stderr by name and skipped; the exit code is 1 if any image failed, 2 if none was captioned (or
none was found: a folder or pattern that matches no image is named on stderr).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from blip2_dist.adapters import load_for_inference, recorded_inference, resolve_inference
from blip2_dist.captioning import generate_captions, input_device
from blip2_dist.checks import check_adapter, check_model
from blip2_dist.config import DEBUG_HELP, DEFAULT_MODEL, ArgumentParser
from blip2_dist.data.stream import CaptionFormat, ImageTransform
from blip2_dist.errors import EXIT_USAGE, UsageError, UserError, run_main

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def expand_paths(args: list[str]) -> list[Path]:
    """Files as given, folders recursively (image suffixes only), globs expanded; order kept."""
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                print(f"warning: {arg}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})",
                      file=sys.stderr)
        elif any(ch in arg for ch in "*?["):
            found = sorted(Path(m) for m in glob.glob(arg, recursive=True))
            if not found:
                print(f"warning: {arg}: the pattern matches no file", file=sys.stderr)
        else:
            found = [p]
        paths += found
    return paths


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decode fully now: a truncated file fails here, named, not inside the batch
        return img.convert("RGB")


def parse(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--model", default=None, help="base BLIP-2 or merged export: hub id, local dir, tiny-t5, tiny-opt "
                   "(default: the adapter's base, else Salesforce/blip2-flan-t5-xl)")
    p.add_argument("--adapter", default=None, help="adapter directory saved by training")
    p.add_argument("--prompt", default=None, help="prompt (default: the one recorded at training, else none)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation batch")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["bfloat16", "float32", "float16"], help="inference dtype")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of path<TAB>caption")
    g = p.add_argument_group("generation (defaults: what the adapter recorded, else beam 5, 8-30 tokens)")
    g.add_argument("--num-beams", type=int, default=None, help="beam search width")
    g.add_argument("--max-new-tokens", type=int, default=None, help="longest caption, in tokens")
    g.add_argument("--min-length", type=int, default=None, help="shortest caption, in tokens")
    g.add_argument("--repetition-penalty", type=float, default=None, help="penalty on repeated tokens (1 = none)")
    g.add_argument("--length-penalty", type=float, default=None,
                   help="beam search length penalty (> 1 favours longer captions, < 1 shorter)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of searching (with --top-p: nucleus)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest token set of this "
                   "total probability (needs --do-sample)")
    g.add_argument("--num-return-sequences", type=int, default=1,
                   help="captions per image (at most --num-beams unless sampling)")
    g.add_argument("--seed", type=int, default=0, help="random seed for --do-sample")
    d = p.add_argument_group("placement (accelerate): a model larger than one GPU")
    d.add_argument("--device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="spread the layers over the GPUs, then CPU memory, then disk (--offload-folder)")
    d.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                   help="memory per device for --device-map, e.g. 0=20GiB,cpu=60GiB (sizes in bytes or with a unit)")
    d.add_argument("--offload-folder", default=None, help="where --device-map puts the layers that fit nowhere else")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p.parse_args(argv)


def given_generation(a: argparse.Namespace) -> dict:
    """generate() settings the user passed (None = not given: the recorded value applies)."""
    flags = {"num_beams": a.num_beams, "max_new_tokens": a.max_new_tokens, "min_new_tokens": a.min_length,
             "repetition_penalty": a.repetition_penalty, "length_penalty": a.length_penalty}
    return {k: v for k, v in flags.items() if v is not None}


def sampling_options(a: argparse.Namespace, num_beams: int) -> dict:
    if a.top_p is not None and not a.do_sample:
        raise UsageError("--top-p applies to sampling: add --do-sample")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.num_return_sequences < 1 or (not a.do_sample and a.num_return_sequences > num_beams):
        raise UsageError(f"--num-return-sequences {a.num_return_sequences} needs --num-beams >= it "
                         f"(now {num_beams}) or --do-sample")
    options = {"num_return_sequences": a.num_return_sequences}
    if a.do_sample:
        options["do_sample"] = True
        if a.top_p is not None:
            options["top_p"] = a.top_p
    return options


def dispatch_options(a: argparse.Namespace) -> dict | None:
    if a.device_map is None:
        if a.max_memory or a.offload_folder:
            raise UsageError("--max-memory and --offload-folder go with --device-map")
        return None
    options: dict = {"device_map": a.device_map}
    if a.max_memory:
        pairs = [item.split("=", 1) for item in a.max_memory.split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise UsageError(f"--max-memory wants DEVICE=SIZE,... (0=20GiB,cpu=60GiB), got {a.max_memory!r}")
        options["max_memory"] = {(int(k) if k.isdigit() else k): (int(v) if v.isdigit() else v) for k, v in pairs}
    if a.offload_folder:
        options["offload_folder"] = a.offload_folder
    return options


def check(a) -> list[Path]:
    """Flags, model and adapter checked, images found, before any model is loaded."""
    for flag, value, low in (("--batch-size", a.batch_size, 1), ("--num-beams", a.num_beams, 1),
                             ("--max-new-tokens", a.max_new_tokens, 1), ("--min-length", a.min_length, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if a.adapter:
        check_adapter(a.adapter, a.model)
    if a.model or not a.adapter:
        check_model(a.model or DEFAULT_MODEL)
    paths = expand_paths(a.images)
    if not paths:
        raise UserError(f"no image to caption in {' '.join(a.images)}", exit_code=EXIT_USAGE)
    return paths


def main(argv=None) -> int:
    a = parse(argv)
    paths = check(a)
    prompt, generation, notes = resolve_inference(recorded_inference(a.adapter or a.model), prompt=a.prompt,
                                                  given=given_generation(a))
    generation.update(sampling_options(a, generation["num_beams"]))
    dispatch = dispatch_options(a)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    model, processor = load_for_inference(a.model or (None if a.adapter else DEFAULT_MODEL), a.adapter,
                                          dtype=getattr(torch, a.dtype), dispatch=dispatch)
    if dispatch is None:
        model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = input_device(model)
    transform = ImageTransform.from_processor(processor)
    fmt = CaptionFormat.from_processor(processor, model.config, prompt=prompt)
    torch.manual_seed(a.seed)
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
        pixels = transform.batch_from_pil(images)
        prompts = fmt.encode_prompts(len(images))
        captions = generate_captions(model, processor, pixels, prompts["input_ids"].to(device),
                                     prompts["attention_mask"].to(device), **generation)
        n = a.num_return_sequences
        for i, path in enumerate(batch_paths):
            mine = captions[i * n : (i + 1) * n]  # generate returns each image's sequences together
            print_captions(path, mine, a.json)
            done += 1
    if failed:
        print(f"{failed} of {len(paths)} images could not be read", file=sys.stderr)
    return 2 if done == 0 else (1 if failed else 0)


def print_captions(path: Path, captions: list[str], as_json: bool) -> None:
    if as_json:
        row = {"path": str(path), "caption": captions[0]}
        if len(captions) > 1:
            row["captions"] = captions
        print(json.dumps(row), flush=True)
    else:
        for caption in captions:
            print(f"{path}\t{caption}", flush=True)


if __name__ == "__main__":
    run_main(main)
