"""Fake Flickr8k trees in the three layouts, with the real data's quirks, for tests and benchmarks.

    write_original(root)   Flickr8k_text/ + Flicker8k_Dataset/ (the real zip's spelling), token-file
                           entries for images in no split file, a `NAME.jpg.1#N` entry with no
                           image, captions with stray whitespace and out-of-order #N.
    write_karpathy(root)   dataset_flickr8k.json (train/restval/val/test interleaved) + Images/
    write_kaggle(root)     captions.txt (CSV; commas and quotes in captions) + Images/

Each returns a FakeSet whose `expected` maps image id → (split, captions in source order,
stripped), and `order` lists the image ids per split in the order the packer must write them.
(The benchmarks' Flickr8k-sized tree of photo-like JPEGs: blip2_dist.data.synthetic.write_photo_flickr8k.)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TEXT_DIR = "Flickr8k_text"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


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


def _write_images(paths: list[Path]) -> None:
    for i, path in enumerate(paths):
        path.write_bytes(small_jpeg(i))


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
    root: str | os.PathLike,
    n: int = 12,
    image_dir: str = "Flicker8k_Dataset",
    nested: bool = False,
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
    _write_images(paths)
    fake.files = {Path(name).stem: images_dir / name for name in names}
    return fake


def karpathy_entry(i: int, name: str, split: str, caps: list[str]) -> dict:
    """One image of a Karpathy split file (dataset_*.json), five captions with their sentence ids."""
    return {
        "filename": name,
        "imgid": i,
        "split": split,
        "sentids": list(range(5 * i, 5 * i + 5)),
        "sentences": [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": 5 * i + k} for k, c in enumerate(caps)],
    }


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
        images.append(karpathy_entry(i, name, split, caps))
        fake.add(Path(name).stem, "train" if split == "restval" else split, [c.strip() for c in caps])
        fake.files[Path(name).stem] = images_dir / name
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    _write_images(list(fake.files.values()))
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
    _write_images(list(fake.files.values()))
    return fake


def write_split_files(folder: str | os.PathLike, splits: dict[str, list[str]]) -> Path:
    """The three official split files (image file names), e.g. for the kaggle layout's --splits."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        (folder / SPLIT_FILES[split]).write_text("".join(f"{name}\n" for name in names))
    return folder
