"""COCO and Flickr30k sources -> records for the packer: Karpathy's split files, and the official
COCO caption annotations.

    karpathy   dataset_coco.json, dataset_flickr30k.json or dataset_flickr8k.json (Karpathy's splits,
               the ones the BLIP-2 paper and LAVIS report on). images[].filepath/.filename/.split/
               .sentences[].raw; restval -> train. COCO: 113,287 train (82,783 train + 30,504
               restval), 5,000 val, 5,000 test; images in train2014/ and val2014/ as each entry's
               filepath says. Flickr30k: 29,000 / 1,014 / 1,000 (the json has no restval);
               images in flickr30k-images/ (the official archive) or flickr30k_images/ (Kaggle).
    coco       annotations/captions_{train,val}{2014,2017}.json + train{YEAR}/, val{YEAR}/: the
               official train -> train, the official val -> val, no test split (the official test
               images have no public captions). For paper-comparable numbers use `karpathy`.

    layout, records, problems = karpathy_records("~/data/coco")      # or the json's own path
    info, records, problems = coco_records("~/data/coco", year=2017)

Captions keep their source text, surrounding whitespace stripped (COCO's raw captions carry
trailing spaces and line breaks; inner runs of whitespace, line breaks included, are folded when
the loader reads them). An image listed with several captions gets them all, in file order (COCO
has 5-7 per image). Every defect is a `Problem` naming the file and entry, as in flickr8k.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from blip2_dist.data.flickr8k import (
    IMAGE_DIRS,
    Layout,
    PackError,
    Problem,
    Record,
    _Captions,
    _find_file,
    _image_folder,
    _karpathy_entries,
    _read_text,
    _records_from,
    find_images_dir,
    stem,
)

KARPATHY_FILES = {
    "dataset_coco.json": "coco",
    "dataset_flickr30k.json": "flickr30k",
    "dataset_flickr8k.json": "flickr8k",
}
FLICKR_IMAGE_DIRS = {
    "flickr30k": ("flickr30k-images", "flickr30k_images", "Images", "images"),
    "flickr8k": IMAGE_DIRS["karpathy"],
}
COCO_YEARS = (2014, 2017)
COCO_SPLIT_RULE = "official train -> train, official val -> val (no test split: the official test set has no captions)"


# ---- Karpathy's split files -------------------------------------------------------------------


def find_karpathy_json(source: str | os.PathLike) -> Path:
    """The json itself, or the one Karpathy file found in the folder (up to two folders down)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.name not in KARPATHY_FILES:
            raise PackError(f"{source}: expected one of {', '.join(KARPATHY_FILES)}")
        return path
    if not path.is_dir():
        raise PackError(f"{source}: no such file or folder")
    found = [p for p in (_find_file(path, name) for name in KARPATHY_FILES) if p is not None]
    if not found:
        raise PackError(f"{source}: none of {', '.join(KARPATHY_FILES)} found (up to two folders down)")
    if len(found) > 1:
        raise PackError(f"{source}: several Karpathy files ({', '.join(map(str, found))}); give the one to pack")
    return found[0]


def _coco_image_root(bases: list[Path], entries: list) -> Path | None:
    """The folder holding train2014/ and val2014/ (the filepaths the entries name)."""
    folders = sorted({Path(name).parent.as_posix() for _, name, _ in entries} - {"."})
    for base in bases:
        if any((base / f).is_dir() for f in folders):
            return base
    return None


def karpathy_records(
    source: str | os.PathLike, images_dir: str | os.PathLike | None = None
) -> tuple[Layout, list[Record], list[Problem]]:
    """Records of a Karpathy split file, sorted by split (train, val, test), then file order."""
    json_path = find_karpathy_json(source)
    dataset = KARPATHY_FILES[json_path.name]
    layout = Layout("karpathy", str(source), {"captions": json_path}, split_rule=f"{json_path.name} (restval -> train)")
    problems: list[Problem] = []
    entries, caps = _karpathy_entries(layout, problems)
    root = Path(source).expanduser()
    root = root if root.is_dir() else json_path.parent
    bases = (
        [Path(images_dir).expanduser()]
        if images_dir
        else list(
            dict.fromkeys(
                [json_path.parent, json_path.parent.parent, root, root / "images", json_path.parent / "images"]
            )
        )
    )
    if any(Path(name).parent.as_posix() != "." for _, name, _ in entries):  # COCO: filepath per entry
        layout.images_dir = _coco_image_root(bases, entries)
        wanted = "train2014/ or val2014/ (each entry's filepath)"
    else:
        names = FLICKR_IMAGE_DIRS.get(dataset, FLICKR_IMAGE_DIRS["flickr30k"])
        layout.images_dir = _image_folder(bases[0]) if images_dir else find_images_dir(bases, names)
        wanted = ", ".join(names)
    if layout.images_dir is None:
        raise PackError(f"{source}: no image folder ({wanted}) beside {json_path.name}; point to it with --images DIR")
    layout.notes.append(f"{json_path.name}: {len(entries)} images, images from {layout.images_dir}")
    return layout, _records_from(entries, caps, layout, problems), problems


# ---- the official COCO caption annotations ----------------------------------------------------


def _annotation_files(root: Path) -> dict[int, dict[str, Path]]:
    """{year: {"train": path, "val": path}} for the captions_*.json found (annotations/ or below)."""
    found: dict[int, dict[str, Path]] = {}
    for year in COCO_YEARS:
        for split in ("train", "val"):
            path = _find_file(root, f"captions_{split}{year}.json")
            if path is not None:
                found.setdefault(year, {})[split] = path
    return found


def _pick_year(root: Path, found: dict[int, dict[str, Path]], year: int | None) -> int:
    if not found:
        raise PackError(
            f"{root}: no annotations/captions_{{train,val}}{{2014,2017}}.json found (up to two folders down)"
        )
    if year is None:
        if len(found) > 1:
            raise PackError(f"{root}: captions for {' and '.join(map(str, sorted(found)))}; choose one with --year")
        return next(iter(found))
    if year not in found:
        raise PackError(f"{root}: no captions_*{year}.json (found years {sorted(found)})")
    return year


def _load_annotations(path: Path) -> tuple[list, list]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PackError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise PackError(f"{path}: expected a COCO captions file with 'images' and 'annotations' lists")
    return data["images"], data["annotations"]


def _official_split(path: Path, split: str, folder: Path, problems: list[Problem]) -> list[Record]:
    """One captions_*.json: its images in file order, each with its captions in annotation order."""
    images, annotations = _load_annotations(path)
    names: dict[object, tuple[str, str]] = {}
    for i, image in enumerate(images):
        where = f"{path}: images[{i}]"
        try:
            image_key, name = image["id"], str(image["file_name"])
        except (KeyError, TypeError) as e:
            raise PackError(f"{where}: expected id and file_name ({e!r} missing)") from e
        if image_key in names:
            first = names[image_key][1]
            problems.append(Problem(stem(name), where, f"image id {image_key} listed twice (first at {first})"))
            continue
        names[image_key] = (name, where)
    caps = _Captions()
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        image_key, caption = (ann.get("image_id"), ann.get("caption")) if isinstance(ann, dict) else (None, None)
        if image_key not in names:
            problems.append(Problem("", where, f"caption for image id {image_key!r}, which is not in 'images'", "line"))
        elif not isinstance(caption, str):
            problems.append(
                Problem(stem(names[image_key][0]), where, f"caption is {caption!r}, not a string", "caption")
            )
        else:
            caps.add(names[image_key][0], caption, where)
    layout = Layout("coco", str(path), {"captions": path}, images_dir=folder)
    entries = [(split, name, where) for name, where in names.values()]
    return _records_from(entries, caps, layout, problems)


def coco_records(
    source: str | os.PathLike, year: int | None = None, images_dir: str | os.PathLike | None = None
) -> tuple[dict, list[Record], list[Problem]]:
    """Records of the official caption annotations: train, then val (file order inside each)."""
    root = Path(source).expanduser()
    if not root.is_dir():
        raise PackError(f"{source}: not a folder (give the folder holding annotations/ and the image folders)")
    found = _annotation_files(root)
    year = _pick_year(root, found, year)
    records: list[Record] = []
    problems: list[Problem] = []
    notes = []
    for split in ("train", "val"):
        path = found[year].get(split)
        if path is None:
            notes.append(f"no captions_{split}{year}.json: no {split} split")
            continue
        wanted = f"{split}{year}"
        bases = [Path(images_dir).expanduser()] if images_dir else [root, root / "images", path.parent.parent]
        folder = find_images_dir(list(dict.fromkeys(bases)), (wanted,))
        if folder is None:
            looked = ", ".join(map(str, bases))
            raise PackError(
                f"{source}: no image folder {wanted}/ with images (looked in {looked}); "
                "point to the folder holding it with --images DIR"
            )
        records += _official_split(path, split, folder, problems)
    info = {"layout": "coco", "path": str(source), "year": year, "split_rule": COCO_SPLIT_RULE, "notes": notes}
    return info, records, problems
