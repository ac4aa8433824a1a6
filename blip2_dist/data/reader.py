"""Reading shards: which tars a source names, their per-sample caption counts, and tar expansion
that skips samples by header and counts (with rate-limited warnings) whatever is bad.

    shards = resolve_shards("shards/flickr8k", "train")     # or "dir/train-{000000..000005}.tar"
    for raw in read_tar(shards[0].path, shards[0].name, lo=10, hi=20, slog=SampleLog("demo")):
        raw["key"], raw["parts"]["json"]                     # samples 10..19, in file order

Used by the training and evaluation streams (stream.py); kept apart so the stream module is the
pipeline and this one the I/O.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from blip2_dist.data.shards import MANIFEST, expand_runs, read_manifest, split_shards

log = logging.getLogger(__name__)

# webdataset's grouping rule: key = path up to the first dot of the basename, ext = the rest.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


# --------------------------------------------------------------------------------------------
# Sources: which shards, how many samples and captions each
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    path: str
    name: str
    caption_counts: tuple[int, ...]  # per sample, in file order

    @property
    def samples(self) -> int:
        return len(self.caption_counts)


def resolve_shards(source: str | os.PathLike | list[str], split: str) -> list[ShardInfo]:
    """A packed folder (manifest), a brace pattern / single tar / list of tars -> the split's shards."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        manifest = read_manifest(source)
        return [
            ShardInfo(s["path"], s["name"], tuple(expand_runs(s["caption_counts"])))
            for s in split_shards(manifest, split, source)
        ]
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
    else:
        import braceexpand  # a webdataset dependency

        paths = list(braceexpand.braceexpand(str(source)))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    known = _manifest_counts(paths)
    unknown = [p for p in paths if p not in known]
    if unknown:
        t0 = time.time()
        for p in unknown:
            known[p] = scan_caption_counts(p)
        log.warning(
            "%s: no manifest.json lists %d of the shards; scanned them for counts in %.1f s "
            "(pack with `python -m blip2_dist.data.pack` to skip this)", source, len(unknown), time.time() - t0,
        )
    return [ShardInfo(p, Path(p).name, known[p]) for p in paths]


def _manifest_counts(paths: list[str]) -> dict[str, tuple[int, ...]]:
    found: dict[str, tuple[int, ...]] = {}
    for folder in sorted({str(Path(p).parent) for p in paths}):
        if not (Path(folder) / MANIFEST).is_file():
            continue
        manifest = read_manifest(folder)
        for entries in manifest["splits"].values():
            for s in entries["shards"]:
                found[str(Path(folder) / s["name"])] = tuple(expand_runs(s["caption_counts"]))
    return {p: found[str(Path(p))] for p in paths if str(Path(p)) in found}


def scan_caption_counts(path: str) -> tuple[int, ...]:
    """Per-sample caption counts of a tar (0 for a sample whose JSON is missing or bad)."""
    counts: list[int] = []
    for raw in read_tar(path, Path(path).name, 0, None, SampleLog("scan"), parts=("json",)):
        try:
            counts.append(len(parse_meta(raw["parts"]["json"])[1]))
        except Exception:  # noqa: BLE001 - counted as an empty sample; the reader reports it
            counts.append(0)
    return tuple(counts)


# --------------------------------------------------------------------------------------------
# Counting and rate-limited warnings (one instance per worker per epoch)
# --------------------------------------------------------------------------------------------


class SampleLog:
    """Counters plus warnings: the first `first` bad samples, then at most one per `every_s` seconds."""

    def __init__(self, where: str, first: int = 5, every_s: float = 30.0):
        self.where = where
        self.counts: Counter[str] = Counter()
        self.first, self.every_s = first, every_s
        self._bad = 0
        self._last = 0.0

    def bad(self, reason: str, shard: str, key: str, detail: Any = "", n: int = 1) -> None:
        self.counts[f"bad_{reason}"] += n
        self._bad += n
        now = time.monotonic()
        if self._bad <= self.first or now - self._last >= self.every_s:
            self._last = now
            log.warning(
                "%s: skipping %s in %s key %r (%s): %s; %d bad so far here (later warnings rate-limited)",
                self.where, "sample" if n == 1 else f"{n} samples", shard, key, reason,
                str(detail)[:200], self._bad,
            )

    def add(self, name: str, n: int = 1) -> None:
        if n:
            self.counts[name] += n


@dataclass
class LoaderStats:
    """What one rank's loader saw in an epoch (summed over its workers)."""

    counts: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def bad_samples(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("bad_"))


# --------------------------------------------------------------------------------------------
# Tar expansion
# --------------------------------------------------------------------------------------------


def read_tar(
    path: str, name: str, lo: int, hi: int | None, slog: SampleLog, parts: tuple[str, ...] | None = None
) -> Iterator[dict]:
    """Samples lo..hi-1 of a tar (key groups in file order); members before lo are skipped by header."""
    index, key, group = -1, None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # lazy: reads headers and seeks over data
                m = _KEY_EXT.match(member.name) if member.isfile() else None
                if m is None:
                    continue
                if m.group(1) != key:
                    if key is not None and index >= lo:
                        yield {"shard": name, "key": key, "index": index, "parts": group}
                    index, key, group = index + 1, m.group(1), {}
                    if hi is not None and index >= hi:
                        return
                if index >= lo and (parts is None or m.group(2) in parts):
                    group[m.group(2)] = tar.extractfile(member).read()
            if key is not None and index >= lo:
                yield {"shard": name, "key": key, "index": index, "parts": group}
    except (tarfile.TarError, OSError, EOFError) as e:
        lost = (hi - max(index, lo)) if hi is not None else 1
        slog.bad("tar", name, key or "-", f"unreadable after sample {index}: {e!r}", n=max(lost, 1))
        return
    if hi is not None and index + 1 < hi:  # tarfile ends silently at a corrupt header
        slog.bad("tar", name, key or "-", f"shard ends after {index + 1} samples, expected >= {hi}", n=hi - index - 1)


def read_pieces(pieces: list[tuple[ShardInfo, int, int]], slog: SampleLog) -> Iterator[dict]:
    for shard, lo, hi in pieces:
        yield from read_tar(shard.path, shard.name, lo, hi, slog)


def parse_meta(data: bytes) -> tuple[str | None, list[str]]:
    meta = json.loads(data)
    captions = meta["captions"]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"captions must be a non-empty list of non-empty strings, got {captions!r}"[:200])
    return meta.get("image_id"), captions
