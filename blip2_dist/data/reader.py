"""Reading shards through webdataset's I/O: which tars a `--data` value names, their per-sample
caption counts, and tar expansion of a sample range with retries, counted bad samples and
rate-limited warnings.

    shards = resolve_shards("shards/flickr8k", "train")        # a folder holding manifest.json
    shards = resolve_shards("http://host/f8k/manifest.json", "val")               # a manifest URL
    shards = resolve_shards("pipe:aws s3 cp s3://b/f8k/train-{000000..000009}.tar -", "train")
    for raw in read_shard(shards[0].url, shards[0].name, 10, 20, SampleLog("demo")):
        raw["key"], raw["parts"]["json"]                          # samples 10..19, in file order

URLs are opened by `webdataset.gopen` (local paths, `file:`, `pipe:CMD`) and tars are iterated by
webdataset's `tar_file_iterator` (a streaming read; samples before the range are read and
discarded, which a stream that cannot seek has to do). http(s) URLs run the same `curl` that
gopen runs, through gopen's `Pipe`, but without gopen's built-in `--retry 30`: those retries are
invisible to the caller, so nothing could count them, and a retry here knows where to resume.

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

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

from webdataset.gopen import Pipe, gopen, rewrite_url
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from blip2_dist.data.shards import MANIFEST, expand_runs, local_path, read_manifest, split_shards
from blip2_dist.errors import UserError

log = logging.getLogger(__name__)

SOURCE_SEPARATOR = "::"  # several sources in one --data value, as webdataset and open_clip write it
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardReadError(UserError):
    """A remote shard (or manifest) that could not be read after the allowed retries."""


@dataclass(frozen=True)
class RetryPolicy:
    """How remote reads are retried. Waits are backoff_s, 2*backoff_s, ... (capped), +-25 % jitter."""

    retries: int = 5  # failures in a row (without a new sample) before ShardReadError
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stall_s: float = 120.0  # a read that returns nothing for this long kills the command (a failure)
    connect_timeout_s: float = 30.0

    def wait(self, failure: int) -> float:
        base = min(self.backoff_s * 2 ** (failure - 1), self.max_backoff_s)
        return base * random.uniform(0.75, 1.25)


DEFAULT_RETRY = RetryPolicy()


def is_remote(url: str) -> bool:
    """Anything but a local path or a file: URL (http(s)://, pipe:, gs://, ...)."""
    return local_path(url) is None


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
        ShardInfo(s.get("url") or s["path"], s["name"], tuple(expand_runs(s["caption_counts"])))
        for s in split_shards(manifest, split, spec)
    ]


def check_data(data: str, splits: Iterable[str], retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Cheap checks before any process group: every manifest is read and holds the splits, every
    local shard of a pattern exists. Remote shards are not probed (their counts are)."""
    for spec in split_sources(data):
        if is_manifest(spec):
            for split in splits:
                split_shards(read_manifest(spec, retry), split, spec)
        else:
            _check_local(expand_urls(spec), spec)


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
        raise UserError(
            f"{spec}: no per-shard sample counts for {len(remote)} remote shard(s), e.g. {remote[0]}. Count them "
            f"once (reads every shard): python -m blip2_dist.data.pack index '{spec}' --out DIR, then pass "
            f"--data DIR/{MANIFEST}"
        )
    if missing:
        t0 = time.time()
        for url in missing:
            known[url] = count_shard(url, retry).caption_counts
        log.warning(
            "%s: no manifest.json lists %d of the shards; scanned them for counts in %.1f s (write one "
            "beside them with `python -m blip2_dist.data.pack index` to skip this)", spec, len(missing),
            time.time() - t0,
        )
    return [ShardInfo(u, _display_name(u), known[u]) for u in urls]


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
    return None if not found else url[: found[-1].start()] + "_stats.json" + url[found[-1].end():]


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
                self.where, "sample" if n == 1 else f"{n} samples", shard, key, reason,
                str(detail)[:200], self._bad,
            )

    def retry(self, url: str, failure: int, wait_s: float, detail: str) -> None:
        self.counts["retries"] += 1
        if self._due():
            log.warning("%s: reading %s failed (%s); retry %d in %.1f s", self.where, url, detail[:300], failure, wait_s)

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
# Opening a URL
# --------------------------------------------------------------------------------------------


class _Watchdog(threading.Thread):
    """Kills the reading command when one read has waited longer than stall_s (a hung connection or
    a stuck `pipe:` command would otherwise block its worker, and so every rank, forever)."""

    def __init__(self, proc: subprocess.Popen, stall_s: float):
        super().__init__(daemon=True, name="shard-read-watchdog")
        self.proc, self.stall_s = proc, stall_s
        self.reading_since: float | None = None
        self.stalled = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(min(1.0, self.stall_s / 4)):
            since = self.reading_since
            if since is not None and time.monotonic() - since > self.stall_s:
                self.stalled = True
                self.proc.kill()
                return


class ReadFailure(OSError):
    """One failed attempt; `permanent` ones (HTTP 4xx) are not retried."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class Source:
    """A URL opened for reading (what tarfile reads from). `failure(error)` turns whatever went wrong
    into one line (curl's message with the HTTP status, a command's exit status, a stall), and
    `finish()` checks that a command succeeded. Optional sha256 of every byte read."""

    IGNORED_STATUS = (0, 141, 23)  # success; SIGPIPE / curl's write error after we stopped reading

    def __init__(self, url: str, retry: RetryPolicy = DEFAULT_RETRY, digest: bool = False):
        self.url = url
        self.digest = hashlib.sha256() if digest else None
        self.bytes = 0
        self._stderr = None
        if urlparse(url).scheme in ("http", "https"):
            self._stderr = tempfile.TemporaryFile()
            try:
                self.stream = Pipe(_curl_command(rewrite_url(url), retry), mode="rb", bufsize=1 << 16,
                                   ignore_status=[141, 23], stderr=self._stderr)
            except FileNotFoundError:
                self._stderr.close()
                raise ReadFailure("curl not found: http(s) shards are read with curl, as webdataset "
                                  "reads them; install curl", permanent=True) from None
        else:
            self.stream = gopen(url, "rb")
        self.proc = getattr(self.stream, "proc", None)
        self.watchdog = _Watchdog(self.proc, retry.stall_s) if self.proc is not None else None
        if self.watchdog is not None:
            self.watchdog.start()

    def __str__(self) -> str:
        return self.url

    def read(self, n: int = -1) -> bytes:
        if self.watchdog is not None:
            self.watchdog.reading_since = time.monotonic()
        try:
            data = self.stream.read(n)
        finally:
            if self.watchdog is not None:
                self.watchdog.reading_since = None
        self.bytes += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def finish(self, drain_limit: int = 1 << 20) -> None:
        """After a natural end: read the rest (tar padding) so that a command can exit by itself,
        then raise if it did not succeed. A local file just closes."""
        drained = 0
        while drained < drain_limit:
            chunk = self.read(1 << 16)
            if not chunk:
                break
            drained += len(chunk)
        if self.proc is None or drained >= drain_limit:  # more than padding after the archive: ignored
            self.abort()
            return
        self.stream.timeout = self.watchdog.stall_s  # Pipe.close waits this long for the command
        self.stream.close()

    def failure(self, error: BaseException) -> ReadFailure:
        """What went wrong, in one line; permanent for an HTTP 4xx (but 408/425/429)."""
        if isinstance(error, ReadFailure):
            return error
        if self.watchdog is not None and self.watchdog.stalled:
            return ReadFailure(f"no data for {self.watchdog.stall_s:.0f} s (stalled; the command was killed)")
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1)  # a tar error often means the command failed: say why
            except subprocess.TimeoutExpired:
                pass
            status, text = self.proc.returncode, self._stderr_tail()
            code = re.search(r"returned error: (\d{3})", text)
            permanent = code is not None and 400 <= int(code.group(1)) < 500 and code.group(1) not in ("408", "425", "429")
            if text or status not in (None, *self.IGNORED_STATUS):
                return ReadFailure(text or f"exit status {status}", permanent)
        return ReadFailure(f"{type(error).__name__}: {error}")

    def abort(self) -> None:
        """Stop reading (the range is done, or after an error): kill the command, ignore its status."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        try:
            self.stream.close()
        except Exception:  # noqa: BLE001 - a killed command's status means nothing here
            pass
        if self.watchdog is not None:
            self.watchdog.done.set()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return " ".join(self._stderr.read()[-500:].decode("utf-8", "replace").split())


def _curl_command(url: str, retry: RetryPolicy) -> list[str]:
    """gopen's curl call for http(s), minus `--retry` (we retry, count and resume ourselves) and
    with --show-error (the message, e.g. the HTTP status, goes into our error) and --globoff."""
    return ["curl", "--fail", "--silent", "--show-error", "--location", "--globoff",
            "--connect-timeout", str(retry.connect_timeout_s), url]


def fetch_bytes(url: str, retry: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """The whole content of a (small) URL, e.g. a manifest, with retries."""
    failures = 0
    while True:
        source = None
        try:
            source = Source(url, retry)
            data = source.read()
            source.finish()
            return data
        except (OSError, ValueError) as e:
            if not is_remote(url):
                raise
            failure = _as_failure(source, e)
            failures += 1
            if failure.permanent or failures > retry.retries:
                raise ShardReadError(f"{url}: cannot read ({failure}){_tries(failures)}") from None
            wait = retry.wait(failures)
            log.warning("reading %s failed (%s); retry %d in %.1f s", url, failure, failures, wait)
            time.sleep(wait)
        finally:
            if source is not None:
                source.abort()


def _as_failure(source: Source | None, error: BaseException) -> ReadFailure:
    if isinstance(error, ReadFailure) or source is None:
        return error if isinstance(error, ReadFailure) else ReadFailure(f"{type(error).__name__}: {error}")
    return source.failure(error)


def _tries(failures: int) -> str:
    return f"; failed {failures} times in a row" if failures > 1 else ""


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
        group.setdefault(ext.lower(), f["data"])  # a duplicate part keeps the first, as a reader would
    if not pos.past:
        source.finish()
    if key is not None:
        yield {"shard": name, "key": key, "index": index, "parts": group}


def read_shard(
    url: str, name: str, lo: int, hi: int | None, slog: SampleLog,
    parts: tuple[str, ...] | None = None, retry: RetryPolicy = DEFAULT_RETRY,
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
            failure = _as_failure(source, e)
            if not is_remote(url):
                lost = (hi - next_index) if hi is not None else 1
                slog.bad("tar", name, pos.key or "-", f"unreadable after sample {pos.index}: {failure}", n=max(lost, 1))
                return
            failures += 1
            if failure.permanent or failures > retry.retries:
                where = f"at sample {next_index}" + (f" of {hi}" if hi is not None else "")
                hint = "" if failure.permanent else "; raise --data-retries if the store is flaky"
                raise ShardReadError(f"{url}: cannot read {where} ({failure}){_tries(failures)}{hint}") from None
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
            pos = _Position(0, None, ("json", "txt"))
            counts: dict[int, int] = {}
            bad: list[tuple[str, str]] = []
            for raw in _read_once(source, url, pos):
                try:
                    counts[raw["index"]] = len(parse_sample(raw["parts"], raw["key"])[1])
                except (ValueError, UnicodeDecodeError) as e:
                    bad.append((raw["key"], str(e)[:200]))
            per_sample = tuple(counts.get(i, 0) for i in range(pos.index + 1))
            return ShardCount(url, per_sample, bad, source.digest.hexdigest(), source.bytes)
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:
            failures += 1
            failure = _as_failure(source, e)
            if not is_remote(url) or failure.permanent or failures > retry.retries:
                raise ShardReadError(f"{url}: cannot read ({failure}){_tries(failures)}") from None
            wait = retry.wait(failures)
            log.warning("counting %s failed (%s); retry %d in %.1f s", url, failure, failures, wait)
            time.sleep(wait)
        finally:
            if source is not None:
                source.abort()


def scan_caption_counts(path: str) -> tuple[int, ...]:
    """Per-sample caption counts of a local tar (0 for a sample whose captions are missing or bad)."""
    return count_shard(path).caption_counts
