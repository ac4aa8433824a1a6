"""Synthetic data: a procedural image-caption set for the demo and the tests (coloured shapes with
true captions), photo-like pictures, a Flickr8k-sized tree of them, and model-ready micro-batches.

Each image shows 1-3 shapes of one kind (circle, square, triangle, cross) and one colour (red,
green, blue, yellow, purple, white) on a dark background, grouped on the left, right, top, bottom
or in the center. Its five captions name colour, kind and count, two of them the position too
("two red circles on the left", "there are two red circles in the picture", ...), so no caption can
be right without looking at the image: 6 × 4 × 3 × 5 = 360 scenes. Every word is in
models.TINY_CORPUS_WORDS, so the tiny tokenizer keeps it whole.

    python -m blip2_dist.data.pack_cli synthetic --out shards/synthetic # 2000/100/100 at 64 px

    manifest = write_synthetic("shards/synthetic", n_train=2000, n_val=100, n_test=100)
    scene = scene_for_id("syn-val-000007")   # the ground truth of a written sample

The rest serves benchmarks and tests: `natural_image` and `photo_jpeg` (photo-like pictures, for
decoding and resizing costs that shapes on a flat background would understate), `write_photo_flickr8k`
(the original Flickr8k zip's layout with 8,000 such photos, what benchmarks/bench_pack.sh packs) and
`synthetic_batches` (micro-batches as the shard stream cuts them, for the training benchmark and the
grouped-loss tests). This module imports nothing of the packer: the packer imports it.

Deterministic: a scene depends only on (seed, split, index), so shards are byte-identical per seed.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from blip2_dist.data.flickr8k import SPLIT_FILES, TOKEN_FILE
from blip2_dist.data.shards import SPLITS, Sample, ShardWriter

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SINGULARS = {plural: shape for shape, plural in PLURALS.items()}
COUNTS = (1, 2, 3)
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
NUMBERS = {1: "one", 2: "two", 3: "three"}
ARTICLES = {1: "a", 2: "two", 3: "three"}
# Where a group goes, as (x0, y0, x1, y1) in image fractions, and along which axis its shapes line up.
_REGIONS = {
    "left": ((0.04, 0.04, 0.46, 0.96), "y"),
    "right": ((0.54, 0.04, 0.96, 0.96), "y"),
    "top": ((0.04, 0.04, 0.96, 0.46), "x"),
    "bottom": ((0.04, 0.54, 0.96, 0.96), "x"),
    "center": ((0.04, 0.29, 0.96, 0.71), "x"),
}
_CENTER_ONE = (0.27, 0.27, 0.73, 0.73)  # a single shape "in the center" sits in the middle square
_SUPERSAMPLE = 4  # drawn at 4× and shrunk: smooth edges


@dataclass(frozen=True)
class Scene:
    """What an image shows (the ground truth its captions are made from)."""

    colour: str
    shape: str
    count: int
    position: str
    background: int  # grey level
    boxes: tuple[tuple[float, float, float, float], ...]  # each shape's box, in image fractions


def image_id(split: str, index: int) -> str:
    return f"syn-{split}-{index:06d}"


def parse_image_id(name: str) -> tuple[str, int]:
    prefix, split, index = name.split("-")
    if prefix != "syn" or split not in SPLITS:
        raise ValueError(f"{name!r} is not a synthetic image id (syn-SPLIT-NNNNNN)")
    return split, int(index)


def make_scene(seed: int, split: str, index: int) -> Scene:
    """The scene of image `index` of `split`: a function of (seed, split, index) only."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    count = COUNTS[rng.integers(len(COUNTS))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    (x0, y0, x1, y1), axis = _REGIONS[position]
    if position == "center" and count == 1:
        x0, y0, x1, y1 = _CENTER_ONE
    along, across = (x1 - x0, y1 - y0) if axis == "x" else (y1 - y0, x1 - x0)
    slot = along / count
    boxes = []
    for k in range(count):
        size = min(slot, across) * rng.uniform(0.65, 0.85)
        # Jitter stays inside the shape's own slot: shapes never touch.
        c_along = (x0 if axis == "x" else y0) + slot * (k + 0.5) + rng.uniform(-0.5, 0.5) * (slot - size) * 0.5
        c_across = (y0 + y1) / 2 if axis == "x" else (x0 + x1) / 2
        c_across += rng.uniform(-0.5, 0.5) * (across - size) * 0.5
        cx, cy = (c_along, c_across) if axis == "x" else (c_across, c_along)
        boxes.append((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2))
    background = int(rng.integers(20, 61))
    return Scene(colour, shape, count, position, background, tuple(boxes))


def draw_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    big = image_size * _SUPERSAMPLE
    im = Image.new("RGB", (big, big), (scene.background,) * 3)
    draw = ImageDraw.Draw(im)
    fill = COLOURS[scene.colour]
    for bx0, by0, bx1, by1 in scene.boxes:
        x0, y0, x1, y1 = (round(v * big) for v in (bx0, by0, bx1, by1))
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross
            t = (x1 - x0) * 0.18
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
            draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
    return im.resize((image_size, image_size), Image.Resampling.LANCZOS)


def scene_captions(scene: Scene) -> list[str]:
    """Five captions, all true of the scene; two also say where."""
    n = scene.count
    noun = scene.shape if n == 1 else PLURALS[scene.shape]
    thing = f"{ARTICLES[n]} {scene.colour} {noun}"
    be = "is" if n == 1 else "are"
    where = POSITIONS[scene.position]
    return [
        f"{thing} {where}",
        f"{NUMBERS[n]} {scene.colour} {noun}",
        f"there {be} {thing} in the picture",
        f"the {scene.colour} {noun} {be} {where}",
        f"a drawing of {thing}",
    ]


def caption_matches(caption: str, scene: Scene) -> bool:
    """Whether a caption's colour, shape, count and (if said) position words all fit the scene."""
    words = caption.split()
    shape_words = {w for w in words if w in SHAPES or w in PLURALS.values()}
    expected_shape = scene.shape if scene.count == 1 else PLURALS[scene.shape]
    numbers = {w for w in words if w in ("one", "two", "three")}
    positions = {w for w in words if w in POSITIONS}
    return (
        {w for w in words if w in COLOURS} == {scene.colour}
        and shape_words == {expected_shape}
        and numbers <= {NUMBERS[scene.count]}
        and positions <= {scene.position}
    )


def attribute_accuracy(predictions: dict[str, str], seed: int = 0) -> dict[str, float]:
    """Share of predicted captions naming the right colour, the right shape, a count that fits
    (number word if any, singular/plural noun), and fully matching the scene: what the demo shows
    to prove the model reads the image."""
    hits = {"colour": 0, "shape": 0, "count": 0, "all": 0}
    for image_id, caption in predictions.items():
        scene, words = scene_for_id(image_id, seed), caption.split()
        nouns = {w for w in words if w in SHAPES or w in PLURALS.values()}
        plural = scene.count > 1
        hits["colour"] += {w for w in words if w in COLOURS} == {scene.colour}
        hits["shape"] += {SINGULARS.get(w, w) for w in nouns} == {scene.shape}
        hits["count"] += (
            bool(nouns)
            and all((w in PLURALS.values()) == plural for w in nouns)
            and {w for w in words if w in NUMBERS.values()} <= {NUMBERS[scene.count]}
        )
        hits["all"] += caption_matches(caption, scene)
    return {k: v / max(1, len(predictions)) for k, v in hits.items()}


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def synthetic_sample(seed: int, split: str, index: int, image_size: int = 64) -> tuple[Sample, Scene]:
    scene = make_scene(seed, split, index)
    jpeg = encode_jpeg(draw_scene(scene, image_size))
    return Sample(image_id(split, index), split, scene_captions(scene), jpeg), scene


def scene_for_id(name: str, seed: int = 0) -> Scene:
    """The ground truth of a written sample, from its image id."""
    split, index = parse_image_id(name)
    return make_scene(seed, split, index)


def write_synthetic(
    out_dir: str | os.PathLike,
    n_train: int = 2000,
    n_val: int = 100,
    n_test: int = 100,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 50,
) -> dict:
    """Draw and write the set through ShardWriter (train, val, test); returns the manifest."""
    source = {
        "layout": "synthetic",
        "path": f"seed {seed}",
        "seed": seed,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "max_side": None,
    }
    with ShardWriter(out_dir, samples_per_shard, source=source) as writer:
        for split, n in zip(SPLITS, (n_train, n_val, n_test)):
            for index in range(n):
                writer.write(synthetic_sample(seed, split, index, image_size)[0])
    return writer.manifest()


# ---------------------------------------------------------------------------------------------------
# Photo-like pictures and model-ready micro-batches (benchmarks and tests)
# ---------------------------------------------------------------------------------------------------


def natural_image(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """A photo-like picture: smooth colour field, a few shapes, texture and sensor-like noise."""
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5))).astype(np.float32)
    texture = Image.fromarray(rng.integers(0, 256, (height // 2, width // 2), dtype=np.uint8))
    arr += (np.asarray(texture.resize((width, height), Image.BILINEAR), np.float32)[..., None] - 128) * 0.5
    arr += rng.normal(0, 9, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def synthetic_batches(
    processor, model_config, *, n_batches: int, micro_batch: int, captions_per_image: int, seed: int = 0
) -> list[dict]:
    """Micro-batches as the shard stream makes them: whole caption groups in order, a group straddling
    two batches when it does not fit; pixel_values one row per image (normalised noise at the model's
    image size). Captions: 12 +- 4 words (Flickr8k averages ~11) from the tiny tokenizer's vocabulary."""
    import torch  # here, not at the top: packing the synthetic set needs no torch

    from blip2_dist.data.transforms import CaptionFormat
    from blip2_dist.models import TINY_CORPUS_WORDS

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    fmt = CaptionFormat.from_processor(processor, model_config)
    size = model_config.vision_config.image_size
    batches, pending, pixels = [], [], {}
    while len(batches) < n_batches:
        image = len(pixels)
        pixels[image] = torch.randn(3, size, size, generator=gen)
        captions = [
            " ".join(rng.choice(TINY_CORPUS_WORDS) for _ in range(max(4, round(rng.gauss(12, 4)))))
            for _ in range(captions_per_image)
        ]
        pending += [(image, c) for c in captions]
        while len(pending) >= micro_batch and len(batches) < n_batches:
            take, pending = pending[:micro_batch], pending[micro_batch:]
            ids = sorted({i for i, _ in take})
            batches.append(
                {
                    "pixel_values": torch.stack([pixels[i] for i in ids]),  # a straddling image in both batches
                    "image_index": torch.tensor([ids.index(i) for i, _ in take]),
                    **fmt.encode_train([c for _, c in take]),
                }
            )
    return batches


def photo_jpeg(seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG (smooth colour fields, texture, sensor noise) of a real Flickr8k size, ~100-150 KB."""
    rng = np.random.default_rng(seed)
    w, h = [(500, 375), (500, 375), (500, 333), (375, 500)][seed % 4]
    base = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    texture = rng.normal(0, 45, (h // 2, w // 2, 3))
    texture = (
        np.asarray(
            Image.fromarray(np.clip(texture + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC),
            dtype=np.float32,
        )
        - 128
    )
    noise = rng.normal(0, 11, (h, w, 3)).astype(np.float32)
    pixels = np.clip(np.asarray(base, dtype=np.float32) + texture + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def flickr_name(i: int) -> str:
    """A file name shaped like Flickr8k's: 1000268201_693b08cb0e.jpg."""
    return f"{1000000000 + 7919 * i}_{hashlib.sha1(str(i).encode()).hexdigest()[:10]}.jpg"


def _write_photo(job: tuple[str, int]) -> None:
    path, seed = job
    Path(path).write_bytes(photo_jpeg(seed))


def write_photo_flickr8k(root: str | os.PathLike, n: int = 8000, workers: int = 1) -> list[Path]:
    """A tree in the original Flickr8k zip's layout (Flickr8k_text/ with the token file and the three
    split files at 6:1:1, images in Flicker8k_Dataset/) holding n photo-like JPEGs with five captions
    each: the packer's input at Flickr8k's size. Returns the image files."""
    root = Path(root)
    images, text = root / "Flicker8k_Dataset", root / "Flickr8k_text"
    images.mkdir(parents=True, exist_ok=True)
    text.mkdir(parents=True, exist_ok=True)
    names = [flickr_name(i) for i in range(n)]
    held = max(1, round(n / 8))
    splits = {"train": names[: n - 2 * held], "val": names[n - 2 * held : n - held], "test": names[n - held :]}
    for split, members in splits.items():
        (text / SPLIT_FILES[split]).write_text("".join(f"{name}\n" for name in members))
    (text / TOKEN_FILE).write_text(
        "".join(
            f"{name}#{k}\tA dog number {i} runs on the grass , take {k} .\n"
            for i, name in enumerate(names)
            for k in range(5)
        )
    )
    jobs = [(str(images / name), i) for i, name in enumerate(names)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_photo, jobs, chunksize=32))
    else:
        for job in jobs:
            _write_photo(job)
    return [images / name for name in names]
