"""Preprocessing check: our ImageTransform's pixels against the hub's image processor, on photos.

    python benchmarks/bench.py preprocess photos/*.jpg --json preprocess.json        # 224, the hub size
    python benchmarks/bench.py preprocess photos/*.jpg --size 364                    # LAVIS's caption size

Reference: `BlipImageProcessorPil` with the settings of Salesforce/blip2-*'s preprocessor_config.json
(square resize, bicubic, rescale 1/255, CLIP mean/std, convert to RGB) on the fully decoded image: what
`Blip2Processor` gives a user who passes a PIL image. (BlipImageProcessor proper needs torchvision; its
Pil twin is what transformers falls back to without it, with the same settings.) Ours: `ImageTransform`
on the file's bytes, as the loader runs it, in four variants: JPEG draft decoding on/off x torch/PIL
resize. Every photo is measured as given and re-encoded at 640x480 (COCO's size, JPEG quality 90),
where draft decoding halves the image before the resize.

Per photo and variant: mean and max |difference| in 8-bit levels (normalised difference x std x 255,
so 1.0 = one grey level), and whether draft decoding reduced the image.
"""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from blip2_dist.config import option
from blip2_dist.data.transforms import ImageTransform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VARIANTS = {  # name -> ImageTransform overrides
    "draft+torch": dict(draft=True, backend="torch"),
    "draft+pil": dict(draft=True, backend="pil"),
    "full+torch (default)": dict(draft=False, backend="torch"),
    "full+pil": dict(draft=False, backend="pil"),
}


@dataclass
class PreprocessBenchConfig:
    """`bench.py preprocess` (besides the photos): flags generated from these fields."""

    size: int = option(224, "model image size (224 hub, 364 LAVIS caption fine-tune)", min=16)


def hub_processor(size: int):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": size, "width": size},
        resample=3,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def as_jpeg(image: Image.Image, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    if size is not None:
        image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def inputs(paths: list[Path]) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes): each photo as is (PNGs encoded at quality 95) and at 640x480."""
    out = []
    for path in paths:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format != "JPEG":
                data = as_jpeg(im, quality=95)
            out.append((f"{path.name} {im.width}x{im.height}", data))
            out.append((f"{path.name} 640x480", as_jpeg(im, (640, 480))))
    return out


def compare(data: bytes, size: int, processor) -> dict:
    """Differences of every variant against the hub processor for one JPEG."""
    with Image.open(io.BytesIO(data)) as im:
        reference = processor(im.convert("RGB"), return_tensors="np")["pixel_values"][0]  # (3, H, W)
    std = np.asarray(CLIP_STD, dtype=np.float64).reshape(3, 1, 1)
    row = {}
    for name, overrides in VARIANTS.items():
        transform = ImageTransform(size=(size, size), mean=CLIP_MEAN, std=CLIP_STD, **overrides)
        opened = transform.open(data)
        reduced = opened.size
        ours = transform.normalize([transform.prepare(opened)])[0].numpy()
        levels = np.abs(ours.astype(np.float64) - reference) * std * 255
        row[name] = {"mean": float(levels.mean()), "max": float(levels.max()), "decoded": list(reduced)}
    return row


def run(paths: list[str | Path], size: int = 224, echo=print) -> dict:
    processor = hub_processor(size)
    rows = {name: compare(data, size, processor) for name, data in inputs([Path(p) for p in paths])}
    echo(f"|our pixels - hub processor's| in 8-bit levels, {size}x{size} (mean / max per photo)")
    echo(f"{'photo':<34}" + "".join(f"{v:>24}" for v in VARIANTS))
    for name, row in rows.items():
        drafted = row["draft+torch"]["decoded"] != row["full+torch (default)"]["decoded"]
        cells = "".join(f"{row[v]['mean']:>14.3f} / {row[v]['max']:>5.1f}" for v in VARIANTS)
        echo(f"{name + (' *' if drafted else ''):<34}{cells}")
    summary = {
        v: {
            "mean": statistics.fmean(r[v]["mean"] for r in rows.values()),
            "max": max(r[v]["max"] for r in rows.values()),
        }
        for v in VARIANTS
    }
    echo(f"{'all photos':<34}" + "".join(f"{s['mean']:>14.3f} / {s['max']:>5.1f}" for s in summary.values()))
    echo("* draft decoding reduced this JPEG before the resize")
    return {"size": size, "photos": rows, "summary": summary}
