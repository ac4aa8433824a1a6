"""Reading shards through webdataset's I/O: which tars a `--data` value names, their per-sample
caption counts, and tar expansion of a sample range with retries, counted bad samples and
rate-limited warnings.

    shards = resolve_shards("shards/flickr8k", "train")        # a folder holding manifest.json
    shards = resolve_shards("http://host/f8k/manifest.json", "val")               # a manifest URL
    shards = resolve_shards("pipe:aws s3 cp s3://b/f8k/train-{000000..000009}.tar -", "train")
    for raw in read_shard(shards[0].url, shards[0].name, 10, 20, SampleLog("demo")):
        raw["key"], raw["parts"]["json"]                          # samples 10..19, in file order

URLs are opened through webdataset's gopen (urls.py: local paths, `file:`, `pipe:CMD`, and http(s)
with the curl gopen runs, minus its invisible built-in retries) and tars are iterated by
webdataset's `tar_file_iterator` (a streaming read: samples before the range are read and
dropped, which a stream that cannot seek has to do).

Remote reads (anything but a local path or `file:`) that fail (a dropped connection, a 5xx, a
non-zero exit of a `pipe:` command, a stall, a shard shorter than its count) are retried with
exponential backoff; the retry opens the shard again and resumes at the first sample not yet
handed out, so no sample is lost or handed out twice. Every retry is counted (`retries`, and
`retry_reread_samples` for the samples read again and discarded). After `RetryPolicy.retries`
failures in a row without progress, `ShardReadError` names the URL. A 4xx answer (but 408/425/429)
is not retried. A local shard that is short or unreadable is corrupt, not flaky: its missing
samples are counted as `bad_tar` and skipped at once.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from blip2_dist.data.shards import MANIFEST, expand_runs, read_manifest, split_shards
from blip2_dist.data.urls import (
    DEFAULT_RETRY,
    ReadFailure,
    RetryPolicy,
    ShardReadError,
    Source,
    as_failure,
    fetch_bytes,
    is_remote,
    local_path,
    tries,
)
from blip2_dist.errors import UserError

log = logging.getLogger(__name__)

SOURCE_SEPARATOR = "::"  # several sources in one --data value, as webdataset and open_clip write it
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------------------------
# Sources: which shards, how many samples and captions each
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    url: str  # what gopen opens
    name: str  # for messages and the resume fingerprint
    caption_counts: tuple[int, ...]  # per sample, in file order

    @property
    def samples(self) -> int:
        return len(self.caption_counts)


def split_sources(data: str | os.PathLike | list[str]) -> list[str]:
    if isinstance(data, (list, tuple)):
        return [str(d) for d in data]
    return [part for part in str(data).split(SOURCE_SEPARATOR) if part.strip()]


def is_manifest(spec: str) -> bool:
    """A folder, or a path/URL/pipe: command naming a .json file (the manifest)."""
    if not is_remote(spec) and local_path(spec).is_dir():
        return True
    return re.search(r"\.json($|[\s?#'\"])", spec) is not None


def resolve_shards(
    source: str | os.PathLike | list[str], split: str, retry: RetryPolicy = DEFAULT_RETRY
) -> list[ShardInfo]:
    """Every `--data` form -> the split's shards, sources concatenated in the order given.

    A source is a folder holding manifest.json, a manifest's path or URL (shard URLs relative to it,
    or the `url` its entries hold), or shard URLs with brace patterns. Several sources are joined by
    `::` (or given as a list of single URLs). Shard patterns have no splits: they are the data of
    whatever split is asked for.
    """
    if isinstance(source, (list, tuple)):  # a plain list of shard URLs (no patterns, no manifests)
        return _pattern_shards([str(p) for p in source], str(source[:1]) + "...", retry)
    shards: list[ShardInfo] = []
    for spec in split_sources(source):
        if is_manifest(spec):
            shards += manifest_shards(spec, split, retry)
        else:
            shards += _pattern_shards(expand_urls(spec), spec, retry)
    if not shards:
        raise ValueError(f"{source}: no shards")
    return shards


def manifest_shards(spec: str, split: str, retry: RetryPolicy = DEFAULT_RETRY) -> list[ShardInfo]:
    manifest = read_manifest(spec, retry)
    return [
        ShardInfo(s["path"], s["name"], tuple(expand_runs(s["caption_counts"])))
        for s in split_shards(manifest, split, spec)
    ]


def check_data(data: str, splits: Iterable[str], retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Cheap checks before any process group: every manifest is read and holds the splits, every
    local shard of a pattern exists, remote shards of a pattern have counts (img2dataset's stats file
    of the first one is read; the shards themselves are not probed)."""
    for spec in split_sources(data):
        if is_manifest(spec):
            for split in splits:
                split_shards(read_manifest(spec, retry), split, spec)
            continue
        urls = expand_urls(spec)
        _check_local(urls, spec)
        remote = [u for u in urls if is_remote(u)]
        if remote and not _stats_counts(remote[:1]):
            raise _no_counts(spec, remote)


def _check_local(urls: list[str], spec: str) -> None:
    missing = [u for u in urls if not is_remote(u) and not local_path(u).is_file()]
    if not missing:
        return
    if len(urls) == 1 and ".tar" not in spec:
        raise FileNotFoundError(
            f"{spec}: not found (no manifest: --data takes a folder holding {MANIFEST}, a manifest's path or "
            "URL, or shard URLs such as dir/train-{000000..000009}.tar)"
        )
    raise FileNotFoundError(f"{spec}: {len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[0]}")


def _pattern_shards(urls: list[str], spec: str, retry: RetryPolicy) -> list[ShardInfo]:
    """Counts for shards named without a manifest: a manifest.json beside local tars that lists
    them, else img2dataset's `NAME_stats.json` beside each tar, else (local tars only) a scan."""
    _check_local(urls, spec)
    known = _manifest_counts(urls)
    missing = [u for u in urls if u not in known]
    if missing:
        known.update(_stats_counts(missing))
        missing = [u for u in urls if u not in known]
    remote = [u for u in missing if is_remote(u)]
    if remote:
        raise _no_counts(spec, remote)
    if missing:
        t0 = time.time()
        for url in missing:
            known[url] = count_shard(url, retry).caption_counts
        log.warning(
            "%s: no manifest.json lists %d of the shards; scanned them for counts in %.1f s (write one "
            "beside them with `python -m blip2_dist.data.pack_cli index` to skip this)",
            spec,
            len(missing),
            time.time() - t0,
        )
    return [ShardInfo(u, _display_name(u), known[u]) for u in urls]


def _no_counts(spec: str, remote: list[str]) -> UserError:
    return UserError(
        f"{spec}: no per-shard sample counts for {len(remote)} remote shard(s), e.g. {remote[0]}. Give the "
        f"URL of their {MANIFEST} if they have one, or count them once (reads every shard): python -m "
        f"blip2_dist.data.pack_cli index '{spec}' --out DIR, then pass --data DIR/{MANIFEST}"
    )


def _display_name(url: str) -> str:
    return Path(url).name if not is_remote(url) else url


def _manifest_counts(urls: list[str]) -> dict[str, tuple[int, ...]]:
    """Counts of local tars listed by a manifest.json in their folder."""
    found: dict[str, tuple[int, ...]] = {}
    folders = {str(local_path(u).parent) for u in urls if not is_remote(u)}
    for folder in sorted(folders):
        if not (Path(folder) / MANIFEST).is_file():
            continue
        for entries in read_manifest(folder)["splits"].values():
            for s in entries["shards"]:
                found[str(Path(folder) / s["name"])] = tuple(expand_runs(s["caption_counts"]))
    return {u: found[str(local_path(u))] for u in urls if not is_remote(u) and str(local_path(u)) in found}


def stats_url(url: str) -> str | None:
    """img2dataset writes NAME_stats.json beside NAME.tar; the URL (or pipe: command) of it."""
    found = list(re.finditer(r"\.tar(?=$|[\s?#'\"])", url))
    return None if not found else url[: found[-1].start()] + "_stats.json" + url[found[-1].end() :]


def _stats_counts(urls: list[str]) -> dict[str, tuple[int, ...]]:
    """One caption per sample and `successes` samples per shard, from img2dataset's stats files. The
    first shard without one ends the search (probing is not retried)."""
    found: dict[str, tuple[int, ...]] = {}
    for url in urls:
        target = stats_url(url)
        if target is None:
            break
        try:
            if not is_remote(target) and not local_path(target).is_file():
                break
            stats = json.loads(fetch_bytes(target, RetryPolicy(retries=0)))
            found[url] = (1,) * int(stats["successes"])
        except (OSError, ValueError, KeyError, TypeError, UserError):
            break
    return found if len(found) == len(urls) else {}


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
        if self._due():
            log.warning(
                "%s: skipping %s in %s key %r (%s): %s; %d bad so far here (later warnings rate-limited)",
                self.where,
                "sample" if n == 1 else f"{n} samples",
                shard,
                key,
                reason,
                str(detail)[:200],
                self._bad,
            )

    def retry(self, url: str, failure: int, wait_s: float, detail: str) -> None:
        self.counts["retries"] += 1
        if self._due():
            log.warning(
                "%s: reading %s failed (%s); retry %d in %.1f s", self.where, url, detail[:300], failure, wait_s
            )

    def _due(self) -> bool:
        now = time.monotonic()
        if self._bad + self.counts["retries"] <= self.first or now - self._last >= self.every_s:
            self._last = now
            return True
        return False

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
# Tar expansion: webdataset's tar iterator, our sample positions
# --------------------------------------------------------------------------------------------


class _PastRange(Exception):
    """Raised from select_files at the first member of sample `hi`: the range is complete."""


def _stop_at_range_end(exn: Exception) -> bool:
    if isinstance(exn, _PastRange):
        return False  # tar_file_iterator stops quietly
    raise exn


class _Position:
    """Which sample of the shard webdataset's iterator is in (a new key starts a new sample, as in
    webdataset's group_by_keys), and whether a member's data is wanted (read) or skipped."""

    def __init__(self, lo: int, hi: int | None, parts: tuple[str, ...] | None):
        self.lo, self.hi, self.parts = lo, hi, parts
        self.index, self.key = -1, None
        self.past = False

    def select(self, fname: str) -> bool:
        key, ext = base_plus_ext(fname)
        if key is None:
            return False
        if key != self.key:
            self.index, self.key = self.index + 1, key
            if self.hi is not None and self.index >= self.hi:
                self.past = True
                raise _PastRange()
        return self.index >= self.lo and (self.parts is None or ext.lower() in self.parts)


def _read_once(source: Source, name: str, pos: _Position) -> Iterator[dict]:
    """Samples pos.lo..pos.hi-1 of one open tar, complete key groups only. On a natural end the
    command's status is checked before the last group is handed out (it may be cut short)."""
    key, index, group = None, -1, {}
    files = tar_file_iterator(source, handler=_stop_at_range_end, select_files=pos.select)
    for f in files:
        k, ext = base_plus_ext(f["fname"])
        if k != key:
            if key is not None:
                yield {"shard": name, "key": key, "index": index, "parts": group}
            key, index, group = k, pos.index, {}
        group.setdefault(ext.lower(), f["data"])  # a duplicate part: the first is kept (webdataset's grouper raises)
    if not pos.past:
        source.finish()
    if key is not None:
        yield {"shard": name, "key": key, "index": index, "parts": group}


def read_shard(
    url: str,
    name: str,
    lo: int,
    hi: int | None,
    slog: SampleLog,
    parts: tuple[str, ...] | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Iterator[dict]:
    """Samples lo..hi-1 of a tar (hi=None: to the end), key groups in file order, each handed out
    once. Remote failures are retried (see the module docstring); local ones counted as bad_tar."""
    next_index, failures = lo, 0
    while True:
        pos = _Position(next_index, hi, parts)
        source = None
        try:
            source = Source(url, retry)
            for raw in _read_once(source, name, pos):
                yield raw
                next_index, failures = raw["index"] + 1, 0
            if hi is None or pos.past or next_index >= hi:
                return
            raise ReadFailure(f"shard ends after {pos.index + 1} samples, expected >= {hi}")
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:
            failure = as_failure(source, e)
            if not is_remote(url):
                lost = (hi - next_index) if hi is not None else 1
                slog.bad("tar", name, pos.key or "-", f"unreadable after sample {pos.index}: {failure}", n=max(lost, 1))
                return
            failures += 1
            if failure.permanent or failures > retry.retries:
                where = f"at sample {next_index}" + (f" of {hi}" if hi is not None else "")
                hint = "" if failure.permanent else "; raise --data-retries if the store is flaky"
                raise ShardReadError(f"{url}: cannot read {where} ({failure}){tries(failures)}{hint}") from None
            wait = retry.wait(failures)
            slog.retry(url, failures, wait, str(failure))
            slog.add("retry_reread_samples", next_index - lo)
            time.sleep(wait)
        finally:
            if source is not None:
                source.abort()


def read_pieces(
    pieces: list[tuple[ShardInfo, int, int]], slog: SampleLog, retry: RetryPolicy = DEFAULT_RETRY
) -> Iterator[dict]:
    for shard, lo, hi in pieces:
        yield from read_shard(shard.url, shard.name, lo, hi, slog, retry=retry)


# --------------------------------------------------------------------------------------------
# What a sample holds
# --------------------------------------------------------------------------------------------


def parse_sample(parts: dict[str, bytes], key: str) -> tuple[str, list[str]]:
    """(image id, captions) of a sample: ours (`json` with `captions`, `image_id`), or another tool's
    (img2dataset, webdataset's ShardWriter): the caption in `txt` (or json `caption`), id = key.
    Captions come back with their whitespace normalised."""
    meta = json.loads(parts["json"]) if "json" in parts else {}
    if not isinstance(meta, dict):
        raise ValueError(f"json part is a {type(meta).__name__}, not an object")
    captions = meta.get("captions")
    if captions is None:
        text = parts["txt"].decode("utf-8") if "txt" in parts else meta.get("caption")
        if text is None:
            raise ValueError("no captions: needs a json part with 'captions', or a txt part")
        captions = [text.strip()] if isinstance(text, str) else text
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"captions must be a non-empty list of non-empty strings, got {captions!r}"[:200])
    # Runs of whitespace become one space: a line break inside a caption (COCO has some, web captions
    # many) would teach OPT, whose end of caption is "\n", to stop there. Scoring normalises the same way.
    return str(meta.get("image_id") or key), [" ".join(c.split()) for c in captions]


def image_part(parts: dict[str, bytes]) -> str | None:
    return next((e for e in IMAGE_EXTS if e in parts), None)


@dataclass
class ShardCount:
    url: str
    caption_counts: tuple[int, ...]  # 0 for a sample without usable captions
    bad: list[tuple[str, str]]  # (key, why)
    sha256: str
    bytes: int


def count_shard(url: str, retry: RetryPolicy = DEFAULT_RETRY) -> ShardCount:
    """Per-sample caption counts of a whole tar (the counting pass), its sha256 and size. A read
    failure restarts the count (retries as in read_shard); a local unreadable tar raises."""
    failures = 0
    while True:
        source = None
        try:
            source = Source(url, retry, digest=True)
            pos = _Position(0, None, None)
            counts: dict[int, int] = {}
            bad: list[tuple[str, str]] = []
            for raw in _read_once(source, url, pos):
                try:
                    if image_part(raw["parts"]) is None:
                        raise ValueError(f"no image part (has {sorted(raw['parts'])})")
                    counts[raw["index"]] = len(parse_sample(raw["parts"], raw["key"])[1])
                except (ValueError, UnicodeDecodeError) as e:  # the loader skips it: 0 captions
                    bad.append((raw["key"], str(e)[:200]))
            per_sample = tuple(counts.get(i, 0) for i in range(pos.index + 1))
            return ShardCount(url, per_sample, bad, source.digest.hexdigest(), source.bytes)
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:
            failures += 1
            failure = as_failure(source, e)
            if not is_remote(url) or failure.permanent or failures > retry.retries:
                raise ShardReadError(f"{url}: cannot read ({failure}){tries(failures)}") from None
            wait = retry.wait(failures)
            log.warning("counting %s failed (%s); retry %d in %.1f s", url, failure, failures, wait)
            time.sleep(wait)
        finally:
            if source is not None:
                source.abort()


def scan_caption_counts(path: str) -> tuple[int, ...]:
    """Per-sample caption counts of a local tar (0 for a sample whose captions are missing or bad)."""
    return count_shard(path).caption_counts
