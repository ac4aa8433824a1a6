"""Pack image-caption data into WebDataset shards + manifest.json (the contract in shards.py).

The command line (`blip2-pack`, `python -m blip2_dist.data.pack_cli`) is in pack_cli.py.

Records come from a source layout (flickr8k.py; coco.py for Karpathy's split files and the official
COCO captions; img2dataset.py for other tools' shards; hf_datasets.py for any Hugging Face `datasets`
image-caption set on disk), images are read, fully decoded (a truncated JPEG is an error) and, where needed,
re-encoded by a pool of worker threads, in order, and written by one ShardWriter: the same
input gives byte-identical shards whatever --workers is. Any bad input stops the run with an
error naming the file (and line); with --skip-bad the rest is packed and what was left out is
listed in the manifest and printed.

--out is written atomically (staging.py): the pack goes into a temporary folder beside it and is
swapped in only when complete, so a failed run leaves --out as it was.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from blip2_dist.data.flickr8k import PackError, Problem, Record, flickr8k_records, parse_split_ratio
from blip2_dist.data.hf_datasets import hf_records
from blip2_dist.data.shards import MANIFEST, SPLITS, Sample, ShardWriter
from blip2_dist.data.staging import check_out, staged_out

DEFAULT_QUALITY = 95
_MAX_LISTED = 20  # problems shown in an error message or the summary; the manifest has them all
_HINT = "(--skip-bad packs the rest and lists what was left out in the manifest)"


# ---- one image ------------------------------------------------------------------------------


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _jpeg_mode(im: Image.Image) -> Image.Image:
    """A mode JPEG can hold: L and RGB stay; alpha goes onto white; CMYK, P, 16-bit... convert."""
    if im.mode in ("RGB", "L"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit or float grayscale
        gray = im.convert("I") if im.mode.startswith("I;16") else im
        if gray.getextrema()[1] > 255:
            gray = gray.point(lambda v: v * (1 / 256))
        return gray.convert("L")
    if im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(background, rgba)
        return flat.convert("L" if im.mode in ("LA", "La") else "RGB")
    return im.convert("RGB")


def prepare_image(data: bytes, max_side: int | None = None, quality: int = DEFAULT_QUALITY) -> tuple[bytes, str]:
    """Verify an image by decoding it fully; return (JPEG bytes, what was done).

    A JPEG no larger than `max_side` keeps its original bytes ("kept", grayscale and CMYK
    included); any other format is re-encoded to JPEG ("converted"); a larger one is shrunk so its
    long side is `max_side` ("resized"), with JPEG draft decoding for speed. Re-encoding keeps
    the EXIF orientation tag and, when the mode is unchanged, the ICC profile. Raises on a
    truncated or unreadable image (LOAD_TRUNCATED_IMAGES must stay False).
    """
    with Image.open(io.BytesIO(data)) as im:
        is_jpeg = im.format in ("JPEG", "MPO")
        too_big = max_side is not None and max(im.size) > max_side
        if is_jpeg and not too_big:
            im.load()
            return data, "kept"
        target = _fit(im.size, max_side) if too_big else None
        if is_jpeg and target is not None:
            im.draft(None, target)  # decode at 1/2, 1/4 or 1/8 scale when that stays >= target
        im.load()
        orientation = im.getexif().get(0x0112)
        out = _jpeg_mode(im)
        if target is not None and out.size != target:
            out = out.resize(target, Image.Resampling.BICUBIC)  # as BLIP-2's processor; ~30% cheaper than LANCZOS
        options = {"quality": quality}
        if out.mode == im.mode and im.info.get("icc_profile"):
            options["icc_profile"] = im.info["icc_profile"]
        if orientation not in (None, 1):
            exif = Image.Exif()
            exif[0x0112] = orientation
            options["exif"] = exif.tobytes()
        buf = io.BytesIO()
        out.save(buf, "JPEG", **options)
        return buf.getvalue(), ("resized" if target is not None else "converted")


def _load_task(task: tuple[str | None, bytes | None, int | None, int]) -> tuple[bool, bytes | str]:
    """Worker: (path, bytes or None, max_side, quality) → (True, JPEG bytes) or (False, why not)."""
    path, data, max_side, quality = task
    try:
        if data is None:
            data = Path(path).read_bytes()
        return True, prepare_image(data, max_side, quality)[0]
    except FileNotFoundError:
        return False, "missing image file"
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad image; say which
        return False, _image_problem(e, data)


def _image_problem(e: Exception, data: bytes | None) -> str:
    """What is wrong with an image, without the in-memory buffer's repr PIL puts in its messages
    (the caller names the file)."""
    if data is not None and len(data) == 0:
        return "empty image file (0 bytes)"
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))
    return f"unreadable image ({type(e).__name__}: {detail})"


def ordered_map(fn: Callable, items: Iterable, workers: int, ahead: int = 64) -> Iterator:
    """`map(fn, items)` over `workers` threads, results in input order, at most `ahead` in flight.

    Threads, not processes: Pillow releases the GIL while it decodes, resizes and encodes, so
    threads scale as well here (measured on 2 cores) without pickling every image twice, and
    without the spawn start-up that breaks callers lacking an `if __name__ == "__main__"` guard.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="pack")
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(8, os.cpu_count() or 1))


# ---- records → shards -----------------------------------------------------------------------


def _problem_report(problems: Sequence[Problem]) -> str:
    lines = [str(p) for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"... and {len(problems) - _MAX_LISTED} more")
    lines.append(_HINT)
    return "\n".join(lines)


def _tasks(records: Sequence[Record], max_side: int | None, quality: int) -> Iterator[tuple]:
    for r in records:
        data = r.data() if callable(r.data) else r.data
        yield (r.path, data, max_side, quality)


def pack_records(
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    *,
    problems: Sequence[Problem] = (),
    source: dict | None = None,
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Read, verify and (re-)encode the records' images in parallel and write them in order.

    Records of a split are written in the given order (splits may interleave). `problems` found
    while reading the source, and images that are missing or don't decode, stop the run with a
    PackError unless `skip_bad`. Returns the manifest. The pack is written beside out_dir and
    swapped in when complete (see the module docstring); on failure out_dir is left as it was.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise PackError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated JPEGs would pass; unset it")
    check_options(samples_per_shard, max_side, quality, workers)
    check_out(out_dir, overwrite)
    problems = list(problems)
    todo = []
    for r in records:  # a cheap check first, so a missing or empty file stops the run before any work
        if r.data is None and r.path is not None and not os.path.isfile(r.path):
            problems.append(Problem(r.image_id, r.path, "missing image file"))
        elif r.data is None and r.path is not None and os.path.getsize(r.path) == 0:
            problems.append(Problem(r.image_id, r.path, "empty image file (0 bytes)"))
        else:
            todo.append(r)
    if problems and not skip_bad:
        raise PackError(_problem_report(problems))
    source = dict(source or {}, max_side=max_side, samples_per_shard=samples_per_shard, jpeg_quality=quality)
    workers = default_workers() if workers is None else workers
    with staged_out(out_dir, overwrite) as tmp:
        return _write_pack(
            todo,
            problems,
            ShardWriter(tmp, samples_per_shard, source=source),
            max_side,
            quality,
            workers,
            skip_bad,
            progress,
        )


def check_options(samples_per_shard: int, max_side: int | None, quality: int, workers: int | None) -> None:
    """The packing flags' ranges, before anything is read."""
    if samples_per_shard < 1:
        raise PackError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if max_side is not None and max_side < 1:
        raise PackError(f"--max-side must be >= 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise PackError(f"--quality must be in 1..100 (JPEG quality; above 95 only grows files), got {quality}")
    if workers is not None and workers < 1:
        raise PackError(f"--workers must be >= 1, got {workers}")


def _write_pack(
    todo: list[Record],
    problems: list[Problem],
    writer: ShardWriter,
    max_side: int | None,
    quality: int,
    workers: int,
    skip_bad: bool,
    progress: bool,
) -> dict:
    try:
        for p in problems:
            writer.skip(p.image_id, p.file, p.manifest_reason())
        written = 0
        results = ordered_map(_load_task, _tasks(todo, max_side, quality), workers)
        with tqdm(total=len(todo), unit="img", file=sys.stderr, disable=None if progress else True) as bar:
            for record, (ok, payload) in zip(todo, results):
                bar.update(1)
                if ok:
                    writer.write(Sample(record.image_id, record.split, record.captions, payload))
                    written += 1
                elif skip_bad:
                    writer.skip(record.image_id, record.origin, f"image skipped: {payload}")
                else:
                    raise PackError(f"{record.origin}: {payload}\n{_HINT}")
        if written == 0:
            raise PackError(
                "nothing to pack: no image with a caption was found" + (" (all skipped)" if problems else "")
            )
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def pack_flickr8k(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str | None = None,
    images_dir: str | os.PathLike | None = None,
    splits_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> dict:
    """Pack a Flickr8k folder in any of the three layouts (see flickr8k.py). `options`: pack_records's."""
    layout, records, problems = flickr8k_records(source, format, images_dir, splits_dir)
    for note in layout.notes:
        log(note)
    info = {"layout": layout.kind, "path": str(source), "split_rule": layout.split_rule}
    return pack_records(records, out_dir, problems=problems, source=info, **options)


def pack_karpathy(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> dict:
    """Pack Karpathy's dataset_{coco,flickr30k,flickr8k}.json and its images (see coco.py)."""
    from blip2_dist.data.coco import karpathy_records

    layout, records, problems = karpathy_records(source, images_dir)
    for note in layout.notes:
        log(note)
    info = {
        "layout": "karpathy",
        "path": str(source),
        "file": layout.files["captions"].name,
        "split_rule": layout.split_rule,
    }
    return pack_records(records, out_dir, problems=problems, source=info, **options)


def pack_coco(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    year: int | None = None,
    images_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> dict:
    """Pack the official COCO caption annotations and images (see coco.py for the splits)."""
    from blip2_dist.data.coco import coco_records

    info, records, problems = coco_records(source, year, images_dir)
    for note in info.pop("notes"):
        log(note)
    return pack_records(records, out_dir, problems=problems, source=info, **options)


def pack_img2dataset(
    spec: str,
    out_dir: str | os.PathLike,
    *,
    group_by: str | None = None,
    split: str = "train",
    split_ratio: str | None = None,
    retries: int = 5,
    log: Callable[[str], None] = print,
    **options,
) -> dict:
    """Convert img2dataset-style shards, captions grouped per image (see img2dataset.py)."""
    from blip2_dist.data.img2dataset import img2dataset_records
    from blip2_dist.data.urls import RetryPolicy

    ratio = parse_split_ratio(split_ratio) if split_ratio else None
    info, records, problems = img2dataset_records(
        spec, group_by=group_by, split=split, split_ratio=ratio, retry=RetryPolicy(retries=retries)
    )
    log(f"{info['samples']} samples -> {info['images']} images (grouped by {info['group_by']})")
    return pack_records(records, out_dir, problems=problems, source=info, **options)


# ---- Hugging Face datasets on disk (records: hf_datasets.py) ---------------------------------


def pack_hf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_column: str = "image",
    caption_column: str | Sequence[str] | None = None,
    split_column: str | None = None,
    split_ratio: str | tuple[float, float, float] | None = None,
    cache_dir: str | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> dict:
    """Pack a Hugging Face image-caption dataset on disk (see hf_records). `options`: pack_records's."""
    info, records, problems = hf_records(path, image_column, caption_column, split_column, split_ratio, cache_dir)
    if records and not any(r.split == "val" for r in records):
        log("note: no val split; pass --split-ratio 0.8,0.1,0.1 or --split-column to hold images out")
    return pack_records(records, out_dir, problems=problems, source=info, **options)


# ---- summary ------------------------------------------------------------------------------


def summarize_manifest(manifest: dict, seconds: float | None = None) -> str:
    """What a pack holds: per split images/captions/shards, what was skipped, and speed."""
    src = manifest.get("source", {})
    lines = [f"packed {src.get('layout', '?')} from {src.get('path', '?')}"]
    rows = [("split", "images", "captions", "shards")]
    total = [0, 0, 0]
    for split in SPLITS:
        info = manifest["splits"].get(split)
        if info:
            counts = (info["images"], info["captions"], len(info["shards"]))
            total = [a + b for a, b in zip(total, counts)]
            rows.append((split, *map(str, counts)))
    rows.append(("total", *map(str, total)))
    lines += [f"  {r[0]:<6} {r[1]:>8} {r[2]:>9} {r[3]:>7}" for r in rows]
    skipped = manifest.get("skipped", [])
    if skipped:
        kinds = {"image skipped": "images", "caption dropped": "captions", "line ignored": "lines"}
        counts = {word: sum(s["reason"].startswith(prefix) for s in skipped) for prefix, word in kinds.items()}
        other = len(skipped) - sum(counts.values())  # entries written by other tools
        parts = [f"{n} {word}" for word, n in counts.items() if n] + ([f"{other} other"] if other else [])
        lines.append(f"skipped: {len(skipped)} ({', '.join(parts)})")
        for s in skipped[:_MAX_LISTED]:
            lines.append(f"  {s['file']}: {s['reason']}" + (f" [{s['image_id']}]" if s["image_id"] else ""))
        if len(skipped) > _MAX_LISTED:
            lines.append(f"  ... and {len(skipped) - _MAX_LISTED} more (all listed in {MANIFEST})")
    else:
        lines.append("skipped: 0")
    if seconds is not None:
        lines.append(f"{total[0]} images in {seconds:.1f} s ({total[0] / max(seconds, 1e-9):.1f} images/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    # The command lives in pack_cli.py (it imports this module); running this file would otherwise do
    # nothing and exit 0, a silent no-op for anyone who types the module's name.
    raise SystemExit("error: the packer's command is `python -m blip2_dist.data.pack_cli` (or `blip2-pack`)")
