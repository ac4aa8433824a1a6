"""Flickr8k source layouts → records (image file + captions + split), ready for the packer.

Three layouts, detected from the folder where the user unzipped things (or forced):

    original   Flickr8k_text/Flickr8k.token.txt (`NAME.jpg#N<TAB>caption`) and
               Flickr_8k.{train,dev,test}Images.txt; images in Flicker8k_Dataset/ (the real zip's
               spelling) or Flickr8k_Dataset/, possibly one folder deeper. Only images named in a
               split file are packed; dev → val.
    karpathy   dataset_flickr8k.json (images[].filename/.split/.sentences[].raw) and an image
               folder beside it (Images/, Flicker8k_Dataset/, Flickr8k_Dataset/, or --images);
               restval → train.
    kaggle     captions.txt (CSV, header `image,caption`) and Images/. No split information: an
               image goes to train/val/test by `hash_split` (sha1 of its file name, 8 buckets:
               6 train, 1 val, 1 test = the official 6000:1000:1000 proportion), unless the three
               official split files are given (--splits DIR).

    layout = detect_layout("~/data/flickr8k")
    records, problems = read_layout(layout)

Captions keep their source order and text; only surrounding whitespace is stripped. Every
defect is a `Problem` naming the file (and line): the packer stops on the first, or with
--skip-bad leaves out what it concerns and lists it in the manifest.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

LAYOUTS = ("original", "karpathy", "kaggle")
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
KARPATHY_FILE = "dataset_flickr8k.json"
KAGGLE_FILE = "captions.txt"
# Where each layout keeps its images, in order of preference. The real zip says "Flicker".
IMAGE_DIRS = {
    "original": ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images"),
    "karpathy": ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "images"),
    "kaggle": ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset"),
}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_IGNORED_DIRS = ("__MACOSX",)
HASH_SPLIT_RULE = "sha1(file name) % 8: 0-5 train, 6 val, 7 test"


class PackError(Exception):
    """Bad input the packer cannot go on with; the message names the file (and line)."""


@dataclass
class Problem:
    """One defect in the input. `level` says what --skip-bad leaves out: one caption, one image,
    or one input line that can't be tied to an image."""

    image_id: str
    file: str  # a path, or "path:line"
    reason: str
    level: str = "image"  # "image" | "caption" | "line"

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"

    def manifest_reason(self) -> str:
        what = {"image": "image skipped", "caption": "caption dropped", "line": "line ignored"}[self.level]
        return f"{what}: {self.reason}"


@dataclass
class Record:
    """One image to pack: where its bytes come from, and its captions in source order."""

    image_id: str
    split: str
    captions: list[str]
    path: str | None = None  # the image file, or
    data: bytes | Callable[[], bytes] | None = None  # its bytes (or a function returning them)
    origin: str = ""  # what to name in messages (defaults to path)

    def __post_init__(self) -> None:
        if not self.origin:
            self.origin = self.path or self.image_id


@dataclass
class Layout:
    """A detected source: which layout, and the files it is made of."""

    kind: str
    source: str  # as given by the user
    files: dict[str, Path] = field(default_factory=dict)
    images_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    split_rule: str = ""


# ---- finding things -------------------------------------------------------------------------


def _subdirs(path: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".") and e.name not in _IGNORED_DIRS]


def _find_file(root: Path, name: str, depth: int = 2) -> Path | None:
    """`root/name`, else the first `name` up to `depth` folders down (sorted, so deterministic)."""
    level = [root]
    for _ in range(depth + 1):
        for d in level:
            if (d / name).is_file():
                return d / name
        level = [sub for d in level for sub in _subdirs(d)]
    return None


def _has_images(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return any(e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file() for e in it)
    except OSError:
        return False


def _image_folder(path: Path) -> Path | None:
    """`path` if it holds images, else a sub-folder of it that does (unzip often nests one level)."""
    if _has_images(path):
        return path
    for sub in _subdirs(path):
        if _has_images(sub):
            return sub
    return None


def find_images_dir(bases: list[Path], names: tuple[str, ...]) -> Path | None:
    for base in bases:
        for name in names:
            if (base / name).is_dir():
                found = _image_folder(base / name)
                if found is not None:
                    return found
    return None


def detect_layout(
    source: str | os.PathLike,
    format: str | None = None,
    images_dir: str | os.PathLike | None = None,
    splits_dir: str | os.PathLike | None = None,
) -> Layout:
    """Which layout `source` is in (or check the forced `format`), and where its files are."""
    root = Path(source).expanduser()
    if not root.is_dir():
        raise PackError(f"{source}: not a folder (give the folder where you unzipped Flickr8k)")
    if format is not None and format not in LAYOUTS:
        raise PackError(f"unknown --format {format!r}; one of {', '.join(LAYOUTS)}")
    markers = {"original": TOKEN_FILE, "karpathy": KARPATHY_FILE, "kaggle": KAGGLE_FILE}
    found = {kind: _find_file(root, name) for kind, name in markers.items()}
    notes = []
    if format is None:
        matches = [kind for kind in LAYOUTS if found[kind] is not None]
        if not matches:
            raise PackError(
                f"{source}: unknown layout: found none of {TOKEN_FILE} (original), {KARPATHY_FILE} "
                f"(karpathy), {KAGGLE_FILE} (kaggle) up to two folders down. Unzip Flickr8k there, "
                "or force a layout with --format original|karpathy|kaggle."
            )
        format = matches[0]
        if len(matches) > 1:
            notes.append(f"{source} matches layouts {', '.join(matches)}; using {format} (force with --format)")
    elif found[format] is None:
        raise PackError(f"{source}: no {markers[format]} found (up to two folders down) for --format {format}")
    marker = found[format]
    layout = Layout(format, str(source), {"captions": marker}, notes=notes)

    if format == "original":
        for split, name in SPLIT_FILES.items():
            layout.files[split] = marker.parent / name
        layout.split_rule = "Flickr_8k.{train,dev,test}Images.txt"
    elif format == "karpathy":
        layout.split_rule = "karpathy json (restval -> train)"
    else:
        layout.split_rule = HASH_SPLIT_RULE
    if splits_dir is not None:
        if format != "kaggle":
            raise PackError("--splits only applies to the kaggle layout (the others carry their splits)")
        for split, name in SPLIT_FILES.items():
            layout.files[split] = Path(splits_dir).expanduser() / name
        layout.split_rule = f"split files in {splits_dir}"
    for split in SPLIT_FILES:
        if split in layout.files and not layout.files[split].is_file():
            raise PackError(f"{layout.files[split]}: split file not found")

    if images_dir is not None:
        layout.images_dir = _image_folder(Path(images_dir).expanduser())
        if layout.images_dir is None:
            raise PackError(f"--images {images_dir}: no image files there (or one folder down)")
    else:
        bases = list(dict.fromkeys([marker.parent, marker.parent.parent, root]))
        layout.images_dir = find_images_dir(bases, IMAGE_DIRS[format])
        if layout.images_dir is None:
            raise PackError(
                f"{source}: {format} layout, but no image folder ({', '.join(IMAGE_DIRS[format])}) "
                f"with images beside {marker.name}; point to it with --images DIR"
            )
    return layout


# ---- reading text ---------------------------------------------------------------------------


def _raw_lines(path: Path) -> list[tuple[int, bytes]]:
    """(line number, bytes) per line. Split on \\n only: \\x0c or U+2028 inside a caption stay."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PackError(f"{path}: cannot read: {e.strerror or e}") from e
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    return [(i, line.removesuffix(b"\r")) for i, line in enumerate(data.split(b"\n"), 1)]


def _read_text(path: Path) -> str:
    """The whole file as UTF-8; a decoding error names the file and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PackError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PackError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def stem(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).stem


def hash_split(name: str) -> str:
    """Deterministic split of a file name: sha1 → 8 buckets, 6:1:1 like Flickr8k's 6000:1000:1000."""
    bucket = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") % 8
    return "train" if bucket < 6 else ("val" if bucket == 6 else "test")


def parse_split_ratio(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise PackError(f"--split-ratio {text!r}: expected three non-negative numbers like 0.8,0.1,0.1")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def ratio_split(key: str, ratio: tuple[float, float, float]) -> str:
    """train/val/test by sha1(key) as a number in [0, 1): stable whatever the row order."""
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "train" if u < ratio[0] else ("val" if u < ratio[0] + ratio[1] else "test")


def _read_split_files(layout: Layout, problems: list[Problem]) -> list[tuple[str, str, str]]:
    """(split, image name, "file:line") in split-file order, train then val then test."""
    listed: dict[str, str] = {}
    out = []
    for split in SPLIT_FILES:
        path = layout.files[split]
        for lineno, raw in _raw_lines(path):
            where = f"{path}:{lineno}"
            try:
                name = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                problems.append(Problem("", where, "not valid UTF-8", "line"))
                continue
            if not name:
                continue
            if name in listed:
                problems.append(Problem(stem(name), where, f"{name} is listed twice (first at {listed[name]})"))
                continue
            listed[name] = where
            out.append((split, name, where))
    return out


class _Captions:
    """Captions per image name in file order, and the problems found on their lines."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[str]] = {}
        self.problems: dict[str, list[Problem]] = {}
        self.first_seen: dict[str, str] = {}

    def add(self, name: str, caption: str, where: str) -> None:
        self.first_seen.setdefault(name, where)
        text = caption.strip()
        if not text:
            self.problem(name, Problem(stem(name), where, f"empty caption for {name}", "caption"))
        else:
            self.by_name.setdefault(name, []).append(text)

    def problem(self, name: str, problem: Problem) -> None:
        self.first_seen.setdefault(name, problem.file)
        self.problems.setdefault(name, []).append(problem)


def _read_token_file(path: Path, problems: list[Problem]) -> _Captions:
    caps = _Captions()
    for lineno, raw in _raw_lines(path):
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        name_part, tab, caption = raw.partition(b"\t")
        name = name_part.decode("utf-8", "replace").strip().rpartition("#")[0]
        if not tab or not name:
            problems.append(Problem("", where, "malformed line: expected NAME.jpg#N<TAB>caption", "line"))
            continue
        try:
            name_part.decode("utf-8")
            text = caption.decode("utf-8")
        except UnicodeDecodeError:
            caps.problem(name, Problem(stem(name), where, f"caption of {name} is not valid UTF-8", "caption"))
            continue
        caps.add(name, text, where)
    return caps


def _read_kaggle_csv(path: Path, problems: list[Problem]) -> _Captions:
    caps = _Captions()
    try:
        text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    except OSError as e:
        raise PackError(f"{path}: cannot read: {e.strerror or e}") from e
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != ["image", "caption"]:
        raise PackError(f"{path}:1: expected the header 'image,caption', got {header!r}")
    start = reader.line_num + 1
    for row in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not row or row == [""]:
            continue
        if len(row) != 2:
            problems.append(Problem("", where, f"expected 2 fields (image,caption), got {len(row)}", "line"))
            continue
        name, caption = row[0].strip(), row[1]
        if _has_surrogates(name):
            problems.append(Problem("", where, "image name is not valid UTF-8", "line"))
        elif _has_surrogates(caption):
            caps.problem(name, Problem(stem(name), where, f"caption of {name} is not valid UTF-8", "caption"))
        else:
            caps.add(name, caption, where)
    return caps


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


# ---- layouts → records ----------------------------------------------------------------------


def _records_from(
    entries: list[tuple[str, str, str]], caps: _Captions, layout: Layout, problems: list[Problem]
) -> list[Record]:
    """One record per (split, name, where-listed) entry that has captions; problems for the rest."""
    records = []
    ids: dict[str, str] = {}
    for split, name, where in entries:
        image_id = stem(name)
        captions = caps.by_name.get(name, [])
        problems.extend(caps.problems.get(name, []))
        if not captions:
            what = "only empty or unreadable captions" if name in caps.problems else "no caption"
            problems.append(Problem(image_id, where, f"{name} has {what} in {layout.files['captions'].name}"))
            continue
        if image_id in ids:
            problems.append(Problem(image_id, where, f"image id {image_id!r} also used by {ids[image_id]}"))
            continue
        ids[image_id] = where
        path = layout.images_dir / name
        records.append(Record(image_id, split, captions, path=str(path)))
    return records


def _karpathy_entries(layout: Layout, problems: list[Problem]) -> tuple[list, _Captions]:
    path = layout.files["captions"]
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PackError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise PackError(f"{path}: expected a Karpathy split file with an 'images' list")
    caps = _Captions()
    entries = []
    for i, image in enumerate(images):
        where = f"{path}: images[{i}]"
        try:
            name = str(PurePosixPath(image.get("filepath") or "") / image["filename"])
            split_name = image["split"]
            sentences = [s["raw"] for s in image["sentences"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise PackError(f"{where}: expected filename, split and sentences[].raw ({e!r} missing)") from e
        if split_name not in KARPATHY_SPLITS:
            problems.append(Problem(stem(name), where, f"unknown split {split_name!r} (train/val/test/restval)"))
            continue
        for j, raw in enumerate(sentences):
            if not isinstance(raw, str):
                raise PackError(f"{where}.sentences[{j}].raw: expected a string, got {type(raw).__name__}")
            caps.add(name, raw, f"{where}.sentences[{j}]")
        entries.append((KARPATHY_SPLITS[split_name], name, where))
    order = {s: k for k, s in enumerate(SPLIT_FILES)}
    entries.sort(key=lambda e: order[e[0]])  # by split, then source order (stable)
    names = [e[1] for e in entries]
    if len(set(names)) != len(names):
        first: dict[str, str] = {}
        kept = []
        for e in entries:
            if e[1] in first:
                problems.append(Problem(stem(e[1]), e[2], f"{e[1]} is listed twice (first at {first[e[1]]})"))
            else:
                first[e[1]] = e[2]
                kept.append(e)
        entries = kept
    return entries, caps


def _kaggle_entries(layout: Layout, problems: list[Problem]) -> tuple[list, _Captions]:
    caps = _read_kaggle_csv(layout.files["captions"], problems)
    if "train" in layout.files:
        return _read_split_files(layout, problems), caps
    # Every image named in the CSV, in order of first appearance (one whose captions are all bad
    # too, so that it is reported).
    order = {s: k for k, s in enumerate(SPLIT_FILES)}
    entries = [(hash_split(name), name, where) for name, where in caps.first_seen.items()]
    entries.sort(key=lambda e: order[e[0]])
    return entries, caps


def read_layout(layout: Layout) -> tuple[list[Record], list[Problem]]:
    """Records (sorted by split, then source order) and the problems found while reading."""
    problems: list[Problem] = []
    if layout.kind == "original":
        entries = _read_split_files(layout, problems)
        caps = _read_token_file(layout.files["captions"], problems)
    elif layout.kind == "karpathy":
        entries, caps = _karpathy_entries(layout, problems)
    else:
        entries, caps = _kaggle_entries(layout, problems)
    return _records_from(entries, caps, layout, problems), problems


def flickr8k_records(
    source: str | os.PathLike,
    format: str | None = None,
    images_dir: str | os.PathLike | None = None,
    splits_dir: str | os.PathLike | None = None,
) -> tuple[Layout, list[Record], list[Problem]]:
    layout = detect_layout(source, format, images_dir, splits_dir)
    records, problems = read_layout(layout)
    return layout, records, problems
