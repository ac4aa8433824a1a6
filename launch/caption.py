"""Caption image files with a BLIP-2 base model and, optionally, a fine-tuned adapter.

    python launch/caption.py --adapter runs/ft5xl/best photos/*.jpg         # base: the adapter's
    python launch/caption.py --model exports/ft5xl photos/ --json           # a merged export
    python launch/caption.py --adapter runs/demo/best some/folder --do-sample --top-p 0.9 --num-return-sequences 3
    python launch/caption.py --model exports/flan-t5-xxl --device-map auto photos/   # larger than one GPU
    python launch/caption.py --model exports/flan-t5-xxl --device-map auto --max-memory 0=20GiB,cpu=60GiB photos/

Arguments may be files, folders (their images, recursively) or glob patterns. Prints
`path<TAB>caption` (one line per caption) or one JSON object per image with --json. The prompt and
generation settings an adapter (or export) recorded at training are used unless a flag says
otherwise (a warning names each value that differs from training's). Every option:
docs/configuration.md. Unreadable images are reported on stderr by name and skipped; the exit code
is 1 if any image failed, 2 if none was captioned (or none was found: a folder or pattern that
matches no image is named on stderr).
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from blip2_dist.adapters import load_for_inference, recorded_inference, resolve_inference
from blip2_dist.captioning import generate_captions, input_device
from blip2_dist.checks import check_adapter, check_model
from blip2_dist.commands import PlacementArgs, SamplingArgs, base_model, sections_of
from blip2_dist.config import GENERATION_FIELDS, Parsed, parse_sections
from blip2_dist.data.transforms import CaptionFormat, ImageTransform
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
                print(
                    f"warning: {arg}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})",
                    file=sys.stderr,
                )
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


def parse(argv) -> Parsed:
    return parse_sections(argv, __doc__, *sections_of("caption"))


def given_generation(p: Parsed) -> dict:
    """generate() settings the user passed (the others: the recorded values apply)."""
    return {key: getattr(p.sections["eval"], name) for name, key in GENERATION_FIELDS.items() if name in p.given}


def sampling_options(s: SamplingArgs, num_beams: int) -> dict:
    if s.top_p is not None and not s.do_sample:
        raise UsageError("--top-p applies to sampling: add --do-sample")
    if not s.do_sample and s.num_return_sequences > num_beams:
        raise UsageError(
            f"--num-return-sequences {s.num_return_sequences} needs --num-beams >= it (now {num_beams}) or --do-sample"
        )
    options = {"num_return_sequences": s.num_return_sequences}
    if s.do_sample:
        options["do_sample"] = True
        if s.top_p is not None:
            options["top_p"] = s.top_p
    return options


def dispatch_options(d: PlacementArgs) -> dict | None:
    if d.device_map is None:
        if d.max_memory or d.offload_folder:
            raise UsageError("--max-memory and --offload-folder go with --device-map")
        return None
    options: dict = {"device_map": d.device_map}
    if d.max_memory:
        pairs = [item.split("=", 1) for item in d.max_memory.split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise UsageError(f"--max-memory wants DEVICE=SIZE,... (0=20GiB,cpu=60GiB), got {d.max_memory!r}")
        options["max_memory"] = {(int(k) if k.isdigit() else k): (int(v) if v.isdigit() else v) for k, v in pairs}
    if d.offload_folder:
        options["offload_folder"] = d.offload_folder
    return options


def check(p: Parsed) -> list[Path]:
    """Model and adapter checked, images found, before any model is loaded (flag types and ranges were
    checked by parse_sections)."""
    adapter = p.sections["inference"].adapter
    if adapter:
        check_adapter(adapter, base_model(p) if "model" in p.given else None)
    if base_model(p):
        check_model(base_model(p))
    images = p.sections["caption"].images
    paths = expand_paths(images)
    if not paths:
        raise UserError(f"no image to caption in {' '.join(images)}", exit_code=EXIT_USAGE)
    return paths


def main(argv=None) -> int:
    p = parse(argv)
    paths = check(p)
    inf, cap, sampling = p.sections["inference"], p.sections["caption"], p.sections["sampling"]
    prompt = p.sections["data"].prompt if "prompt" in p.given else None
    prompt, generation, notes = resolve_inference(
        recorded_inference(inf.adapter or base_model(p)), prompt=prompt, given=given_generation(p)
    )
    generation.update(sampling_options(sampling, generation["num_beams"]))
    dispatch = dispatch_options(p.sections["placement"])
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    model, processor = load_for_inference(
        base_model(p), inf.adapter, dtype=getattr(torch, inf.dtype), dispatch=dispatch
    )
    if dispatch is None:
        model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = input_device(model)
    transform = ImageTransform.from_processor(processor)
    fmt = CaptionFormat.from_processor(processor, model.config, prompt=prompt)
    torch.manual_seed(sampling.seed)
    failed = done = 0
    for start in range(0, len(paths), cap.batch_size):
        batch_paths, images = [], []
        for path in paths[start : start + cap.batch_size]:
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
        captions = generate_captions(
            model,
            processor,
            pixels,
            prompts["input_ids"].to(device),
            prompts["attention_mask"].to(device),
            **generation,
        )
        n = sampling.num_return_sequences
        for i, path in enumerate(batch_paths):
            mine = captions[i * n : (i + 1) * n]  # generate returns each image's sequences together
            print_captions(path, mine, cap.json)
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
