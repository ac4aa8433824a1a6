"""Fake Flickr8k trees in the three layouts, with the real data's quirks, for tests and benchmarks.

    write_original(root)   Flickr8k_text/ + Flicker8k_Dataset/ (the real zip's spelling), token-file
                           entries for images in no split file, a `NAME.jpg.1#N` entry with no
                           image, captions with stray whitespace and out-of-order #N.
    write_karpathy(root)   dataset_flickr8k.json (train/restval/val/test interleaved) + Images/
    write_kaggle(root)     captions.txt (CSV; commas and quotes in captions) + Images/

Each returns a FakeSet whose `expected` maps image id → (split, captions in source order,
stripped), and `order` lists the image ids per split in the order the packer must write them.

The benchmark tree (8,000 photo-like 500×375 JPEGs of ~100-150 KB, 6000/1000/1000):
    python tests/fake_flickr8k.py original /tmp/flickr8k_fake --n 8000 --photo --workers 2
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TEXT_DIR = "Flickr8k_text"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


@dataclass
class FakeSet:
    root: Path
    images_dir: Path
    expected: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "val": [], "test": []})
    files: dict[str, Path] = field(default_factory=dict)  # image id → image file

    def add(self, image_id: str, split: str, captions: list[str]) -> None:
        self.expected[image_id] = (split, captions)
        self.order[split].append(image_id)


def fake_name(i: int) -> str:
    """Names shaped like Flickr8k's: 1000268201_693b08cb0e.jpg."""
    return f"{1000000000 + 7919 * i}_{hashlib.sha1(str(i).encode()).hexdigest()[:10]}.jpg"


def small_jpeg(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photo_jpeg(seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG (smooth colour fields, texture, sensor noise) of a real Flickr8k size."""
    rng = np.random.default_rng(seed)
    w, h = [(500, 375), (500, 375), (500, 333), (375, 500)][seed % 4]
    base = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    texture = rng.normal(0, 45, (h // 2, w // 2, 3))
    texture = np.asarray(
        Image.fromarray(np.clip(texture + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC),
        dtype=np.float32,
    ) - 128
    noise = rng.normal(0, 11, (h, w, 3)).astype(np.float32)
    pixels = np.clip(np.asarray(base, dtype=np.float32) + texture + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_image(args: tuple[str, int, bool]) -> None:
    path, seed, photo = args
    Path(path).write_bytes(photo_jpeg(seed) if photo else small_jpeg(seed))


def _write_images(paths: list[Path], photo: bool, workers: int) -> None:
    jobs = [(str(p), i, photo) for i, p in enumerate(paths)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_image, jobs, chunksize=32))
    else:
        for job in jobs:
            _write_image(job)


def _split_of(i: int, n: int) -> str:
    held = max(1, round(n / 8))  # 6000:1000:1000 for n = 8000
    return "train" if i < n - 2 * held else ("val" if i < n - held else "test")


def captions_for(i: int) -> list[str]:
    """Five distinct captions; some with stray outer whitespace, one with inner double spaces."""
    caps = [f"A dog number {i} runs on the grass , take {k} ." for k in range(5)]
    if i % 3 == 0:
        caps[1] = f"  Two  children play , number {i} .  "  # outer spaces go, inner ones stay
    if i % 4 == 1:
        caps[2] = f"\tA man in a red shirt , number {i} .\t"
    return caps


def write_original(
    root: str | os.PathLike, n: int = 12, image_dir: str = "Flicker8k_Dataset", nested: bool = False,
    photo: bool = False, workers: int = 1,
) -> FakeSet:
    root = Path(root)
    images_dir = root / image_dir / (image_dir if nested else "")
    images_dir.mkdir(parents=True, exist_ok=True)
    text = root / TEXT_DIR
    text.mkdir(parents=True, exist_ok=True)
    fake = FakeSet(root, images_dir)
    names = [fake_name(i) for i in range(n + 2)]  # the last two: in the token file, in no split
    split_lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i in range(n):
        split_lists[_split_of(i, n)].append(names[i])
    for split in split_lists:  # split files are not in token-file order
        split_lists[split].reverse()
        (text / SPLIT_FILES[split]).write_text("".join(f"{name}\n" for name in split_lists[split]))
    lines = []
    for i, name in enumerate(names):
        caps = captions_for(i)
        order = [1, 0, 2, 3, 4] if i % 5 == 2 else list(range(5))  # #N out of order in the file
        lines += [f"{name}#{k}\t{caps[k]}" for k in order]
        if i == 3:  # the real file's quirk: an entry for NAME.jpg.1, which has no image
            lines += [f"{name}.1#{k}\tA ghost caption {k} ." for k in range(5)]
        if i < n:
            fake.expected[Path(name).stem] = (_split_of(i, n), [caps[k].strip() for k in order])
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr8k.lemma.token.txt").write_text("unused\n")
    for split, lst in split_lists.items():
        fake.order[split] = [Path(name).stem for name in lst]
    paths = [images_dir / name for name in names]
    _write_images(paths, photo, workers)
    fake.files = {Path(name).stem: images_dir / name for name in names}
    return fake


def write_karpathy(root: str | os.PathLike, n: int = 12, image_dir: str = "Images") -> FakeSet:
    root = Path(root)
    images_dir = root / image_dir
    images_dir.mkdir(parents=True, exist_ok=True)
    fake = FakeSet(root, images_dir)
    kinds = ["train", "val", "restval", "test", "train", "restval"]
    images = []
    for i in range(n):
        name = fake_name(i)
        caps = captions_for(i)
        split = kinds[i % len(kinds)]
        images.append({
            "filename": name, "imgid": i, "split": split, "sentids": list(range(5 * i, 5 * i + 5)),
            "sentences": [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": 5 * i + k} for k, c in enumerate(caps)],
        })
        fake.add(Path(name).stem, "train" if split == "restval" else split, [c.strip() for c in caps])
        fake.files[Path(name).stem] = images_dir / name
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    _write_images(list(fake.files.values()), False, 1)
    return fake


def hash_split(name: str) -> str:
    """The documented kaggle rule, restated independently of the packer: sha1 % 8 → 6:1:1."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:16], 16) % 8
    return {6: "val", 7: "test"}.get(bucket, "train")


def write_kaggle(root: str | os.PathLike, n: int = 12) -> FakeSet:
    root = Path(root)
    images_dir = root / "Images"
    images_dir.mkdir(parents=True, exist_ok=True)
    fake = FakeSet(root, images_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "caption"])
    for i in range(n):
        name = fake_name(i)
        caps = captions_for(i)
        if i == 1:
            caps[3] = 'A sign that says "stop, look" .'  # quotes and a comma inside
        writer.writerows([name, c] for c in caps)
        fake.files[Path(name).stem] = images_dir / name
        fake.expected[Path(name).stem] = (hash_split(name), [c.strip() for c in caps])
    for stem_, (split, _) in fake.expected.items():
        fake.order[split].append(stem_)
    (root / "captions.txt").write_text(buf.getvalue())
    _write_images(list(fake.files.values()), False, 1)
    return fake


def write_split_files(folder: str | os.PathLike, splits: dict[str, list[str]]) -> Path:
    """The three official split files (image file names), e.g. for the kaggle layout's --splits."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        (folder / SPLIT_FILES[split]).write_text("".join(f"{name}\n" for name in names))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write a fake Flickr8k tree")
    p.add_argument("layout", choices=["original", "karpathy", "kaggle"])
    p.add_argument("root")
    p.add_argument("--n", type=int, default=12, help="images in the splits")
    p.add_argument("--photo", action="store_true", help="photo-like 500x375 JPEGs of ~100-150 KB (original layout)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    if args.layout == "original":
        fake = write_original(args.root, args.n, photo=args.photo, workers=args.workers)
    else:
        fake = (write_karpathy if args.layout == "karpathy" else write_kaggle)(args.root, args.n)
    sizes = [f.stat().st_size for f in fake.files.values()]
    print(f"{args.root}: {len(sizes)} images, {sum(sizes) / 2**20:.0f} MiB, mean {np.mean(sizes) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
