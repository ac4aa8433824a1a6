"""A Hugging Face `datasets` image-caption set on disk → records for the packer (pack.pack_hf).

    info, records, problems = hf_records("~/data/my_captions", split_ratio="0.8,0.1,0.1")

Either an imagefolder (images + metadata.jsonl) or a `save_to_disk` folder. Captions come from the
first of CAPTION_COLUMNS present (or the columns named); splits from the dataset's own split names
(HF_SPLITS), a split column, or a ratio by sha1 of the image id. Images are read lazily, row by row,
when the packer's workers need them. `datasets` is imported only here, when this source is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from blip2_dist.data.flickr8k import PackError, Problem, Record, parse_split_ratio, ratio_split, stem

HF_SPLITS = {
    "train": "train",
    "training": "train",
    "restval": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentence")


def _load_hf(root: Path, cache_dir: str | None):
    import datasets  # heavy; only this path needs it

    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            return "load_from_disk", datasets.load_from_disk(str(root))
        return "imagefolder", datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; name the folder
        raise PackError(f"{root}: cannot load as a Hugging Face dataset ({type(e).__name__}: {e})") from e


def _image_refs(ds, column: str) -> list[tuple[str | None, bool]]:
    """(path, has embedded bytes) per row, read from Arrow without touching the image bytes."""
    import pyarrow as pa

    table = ds.select_columns([column]).with_format("arrow")[:]
    refs: list[tuple[str | None, bool]] = []
    for chunk in table.column(column).chunks:
        if pa.types.is_struct(chunk.type):
            valid = chunk.is_valid().to_pylist()
            paths = chunk.field("path").to_pylist()
            has = chunk.field("bytes").is_valid().to_pylist()
            refs.extend((p if v else None, bool(b and v)) for p, b, v in zip(paths, has, valid))
        elif pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            refs.extend((p, False) for p in chunk.to_pylist())
        else:
            raise PackError(f"column {column!r} is {chunk.type}, not an image or a path")
    return refs


def _hf_bytes(view, column: str, index: int) -> bytes:
    return view[index].column(column)[0]["bytes"].as_py()


def _row_captions(row: dict, columns: list[str], image_id: str, where: str) -> tuple[list[str], list[Problem]]:
    captions, problems = [], []
    for column in columns:
        value = row[column]
        items = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise PackError(f"{where}: column {column!r} holds {value!r}; captions must be strings or lists of strings")
        for item in items:
            if item.strip():
                captions.append(item.strip())
            else:
                problems.append(Problem(image_id, where, f"empty caption in column {column!r}", "caption"))
    return captions, problems


def hf_records(
    path: str | os.PathLike,
    image_column: str = "image",
    caption_column: str | Sequence[str] | None = None,
    split_column: str | None = None,
    split_ratio: str | tuple[float, float, float] | None = None,
    cache_dir: str | None = None,
) -> tuple[dict, list[Record], list[Problem]]:
    """Records from a `datasets` imagefolder (metadata.jsonl) or a save_to_disk folder.

    Splits: the DatasetDict's own (train, validation|val|dev, test), or `split_column`, or
    `split_ratio` (by sha1 of the image id key). Image id: the file stem, else
    `{split}-{index:08d}` with index counted over all source rows.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise PackError(f"{path}: not a folder")
    if split_column and split_ratio:
        raise PackError("give --split-column or --split-ratio, not both")
    ratio = parse_split_ratio(split_ratio) if isinstance(split_ratio, str) else split_ratio
    loader, obj = _load_hf(root, cache_dir)
    parts = list(obj.items()) if hasattr(obj, "items") else [("train", obj)]
    columns = parts[0][1].column_names
    if caption_column is None:
        found = [c for c in CAPTION_COLUMNS if c in columns]
        if not found:
            raise PackError(f"{path}: no caption column among {columns}; name it with --caption-column")
        caption_columns = found[:1]
    else:
        caption_columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    for column in [image_column, *caption_columns, *([split_column] if split_column else [])]:
        if column not in columns:
            raise PackError(f"{path}: no column {column!r} (columns: {', '.join(columns)})")
    if not (split_column or ratio):
        unknown = [name for name, _ in parts if name.lower() not in HF_SPLITS]
        if unknown:
            raise PackError(
                f"{path}: split {unknown[0]!r} is not train/validation/test; use --split-column or --split-ratio"
            )

    records, problems, seen = [], [], {}
    index = 0
    for part_name, ds in parts:
        refs = _image_refs(ds, image_column)
        view = ds.select_columns([image_column]).with_format("arrow")
        meta = ds.select_columns(caption_columns + ([split_column] if split_column else []))
        for i, (row, (img_path, has_bytes)) in enumerate(zip(meta, refs)):
            where = img_path if img_path and not has_bytes else f"{path} [{part_name}][{i}]"
            key = stem(img_path) if img_path else str(index)
            if split_column:
                split = HF_SPLITS.get(str(row[split_column]).strip().lower())
            else:
                split = ratio_split(key, ratio) if ratio else HF_SPLITS[part_name.lower()]
            image_id = stem(img_path) if img_path else f"{split or 'row'}-{index:08d}"
            index += 1
            if split is None:
                problems.append(Problem(image_id, where, f"split value {row[split_column]!r} is not train/val/test"))
                continue
            captions, bad = _row_captions(row, caption_columns, image_id, where)
            problems.extend(bad)
            if not captions:
                problems.append(Problem(image_id, where, "no caption"))
            elif image_id in seen:
                problems.append(Problem(image_id, where, f"image id {image_id!r} also used by {seen[image_id]}"))
            elif has_bytes:
                seen[image_id] = where
                records.append(
                    Record(image_id, split, captions, data=partial(_hf_bytes, view, image_column, i), origin=where)
                )
            elif img_path:
                seen[image_id] = where
                full = img_path if os.path.isabs(img_path) else str(root / img_path)
                records.append(Record(image_id, split, captions, path=full))
            else:
                problems.append(Problem(image_id, where, "no image (neither bytes nor path)"))
    info = {
        "layout": "hf",
        "path": str(path),
        "loader": loader,
        "image_column": image_column,
        "caption_columns": caption_columns,
        "split_column": split_column,
        "split_ratio": list(ratio) if ratio else None,
    }
    return info, records, problems
