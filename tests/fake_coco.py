"""Fake COCO and Flickr30k trees with the real files' quirks, for the karpathy and coco packers.

    write_karpathy_coco(root)        dataset_coco.json + train2014/ + val2014/ (COCO_val2014_%012d.jpg)
    write_karpathy_flickr30k(root)   dataset_flickr30k.json + flickr30k-images/
    write_coco(root, year)           annotations/captions_{train,val}YEAR.json + trainYEAR/ + valYEAR/

Quirks kept from the real files: 5 to 7 captions per image; raw captions with trailing spaces, a
trailing "\\n", one with a line break inside; a grayscale image; Karpathy's restval (from val2014,
into train) interleaved with the other splits; the official annotations not grouped by image, in
an order unrelated to the images list; 2014 file names COCO_train2014_000000000009.jpg, 2017 ones
000000000009.jpg. Each writer returns a FakeSet (fake_flickr8k.py): `expected` maps image id to
(split, captions stripped), `order` the image ids per split in the order the packer writes them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fake_flickr8k import FakeSet, karpathy_entry, small_jpeg

KARPATHY_COCO_SPLITS = ["train", "restval", "val", "train", "test", "restval", "train"]


def coco_captions(i: int) -> list[str]:
    caps = [f"A person number {i} rides a bike down the road {k}." for k in range(5 + i % 3)]  # 5-7
    caps[0] += " "  # COCO raw captions often end in a space
    if i % 4 == 1:
        caps[1] = caps[1] + "\n"  # ... or a line break
    if i % 5 == 2:
        caps[2] = f"A cat sits on\na mat number {i}."  # a line break inside: the loader folds it
    return caps


def _image(folder: Path, name: str, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(small_jpeg(seed, mode="L" if seed % 6 == 3 else "RGB"))  # COCO has grayscale images
    return path


def write_karpathy_coco(root: str | Path, n: int = 14) -> FakeSet:
    root = Path(root)
    fake = FakeSet(root, root)
    images = []
    for i in range(n):
        split = KARPATHY_COCO_SPLITS[i % len(KARPATHY_COCO_SPLITS)]
        folder = "train2014" if split == "train" else "val2014"  # val, test and restval come from val2014
        name = f"COCO_{folder}_{i + 9:012d}.jpg"
        caps = coco_captions(i)
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "imgid": i,
                "split": split,
                "cocoid": i + 9,
                "sentids": list(range(10 * i, 10 * i + len(caps))),
                "sentences": [
                    {"raw": c, "tokens": c.lower().split(), "imgid": i, "sentid": 10 * i + k}
                    for k, c in enumerate(caps)
                ],
            }
        )
        image_id = Path(name).stem
        fake.expected[image_id] = ("train" if split == "restval" else split, [c.strip() for c in caps])
        fake.files[image_id] = _image(root / folder, name, i)
    for split in ("train", "val", "test"):  # the packer writes by split, then in file order
        fake.order[split] = [
            Path(im["filename"]).stem for im in images if {"restval": "train"}.get(im["split"], im["split"]) == split
        ]
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return fake


def write_karpathy_flickr30k(root: str | Path, n: int = 9) -> FakeSet:
    root = Path(root)
    fake = FakeSet(root, root / "flickr30k-images")
    images = []
    for i in range(n):
        split = ["train", "train", "val", "test"][i % 4]  # Flickr30k's json has no restval
        name = f"{1000092795 + 31 * i}.jpg"
        caps = coco_captions(i)[:5]
        images.append(karpathy_entry(i, name, split, caps))
        fake.add(Path(name).stem, split, [c.strip() for c in caps])
        fake.files[Path(name).stem] = _image(fake.images_dir, name, i)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return fake


def write_coco(root: str | Path, year: int = 2017, n: int = 10, seed: int = 0) -> FakeSet:
    """The official caption annotations: train gets the first 70 %, val the rest."""
    root = Path(root)
    fake = FakeSet(root, root)
    rng = random.Random(seed)
    cut = max(1, round(n * 0.7))
    for split, lo, hi in (("train", 0, cut), ("val", cut, n)):
        images, annotations = [], []
        for i in range(lo, hi):
            name = f"COCO_{split}2014_{i + 9:012d}.jpg" if year == 2014 else f"{i + 9:012d}.jpg"
            images.append(
                {
                    "license": 3,
                    "file_name": name,
                    "coco_url": f"http://images.cocodataset.org/{name}",
                    "height": 30,
                    "width": 40,
                    "id": i + 9,
                }
            )
            caps = coco_captions(i)
            annotations += [{"image_id": i + 9, "id": 1000 * i + k, "caption": c} for k, c in enumerate(caps)]
            fake.files[Path(name).stem] = _image(root / f"{split}{year}", name, i)
        rng.shuffle(annotations)  # the real files are not grouped by image
        for image in images:  # an image's captions in annotation-file order
            caps = [a["caption"].strip() for a in annotations if a["image_id"] == image["id"]]
            fake.add(Path(image["file_name"]).stem, split, caps)
        ann = root / "annotations"
        ann.mkdir(parents=True, exist_ok=True)
        (ann / f"captions_{split}{year}.json").write_text(
            json.dumps({"info": {"year": year}, "licenses": [], "images": images, "annotations": annotations})
        )
    return fake
