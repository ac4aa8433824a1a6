"""Opening shard URLs through webdataset's I/O, with the retry policy and errors remote reads share.

    source = Source("https://host/f8k/train-000000.tar")     # or a path, file:, pipe:CMD
    data = source.read(1 << 16); source.finish()              # finish(): did the command succeed?
    manifest_bytes = fetch_bytes("pipe:aws s3 cp s3://b/f8k/manifest.json -", RetryPolicy(retries=3))

Local paths, `file:` and `pipe:CMD` are opened by `webdataset.gopen`. http(s) runs the `curl`
that gopen runs, through gopen's `Pipe`, without gopen's `--retry 30` (invisible retries that
nobody can count; the reader retries itself and resumes at the right sample) and with its stderr
kept, so that a failure says why (the HTTP status; a 4xx is permanent). A watchdog kills a command
whose read has waited longer than `RetryPolicy.stall_s`, so a hung connection cannot block a
worker (and every rank waiting for it) forever.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import Pipe, gopen, rewrite_url

from blip2_dist.errors import UserError

log = logging.getLogger(__name__)


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


def local_path(location: str) -> Path | None:
    """The local path a location names (a plain path or a file: URL), or None for a remote URL."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(location) if parsed.scheme == "" else None


def is_remote(url: str) -> bool:
    """Anything but a local path or a file: URL (http(s)://, pipe:, gs://, ...)."""
    return local_path(url) is None


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
                self.stream = Pipe(
                    _curl_command(rewrite_url(url), retry),
                    mode="rb",
                    bufsize=1 << 16,
                    ignore_status=[141, 23],
                    stderr=self._stderr,
                )
            except FileNotFoundError:
                self._stderr.close()
                raise ReadFailure(
                    "curl not found: http(s) shards are read with curl, as webdataset reads them; install curl",
                    permanent=True,
                ) from None
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
        then raise if it did not succeed. A local file just closes (read to its end for a digest)."""
        if self.proc is None and self.digest is None:
            self.abort()
            return
        drained, limit = 0, drain_limit if self.digest is None else float("inf")
        while drained < limit:
            chunk = self.read(1 << 16)
            if not chunk:
                break
            drained += len(chunk)
        if self.proc is None or drained >= limit:  # more than padding after the archive: ignored
            self.abort()
            return
        self.stream.timeout = self.watchdog.stall_s  # Pipe.close waits this long for the command
        try:
            self.stream.close()
        except subprocess.TimeoutExpired:
            raise ReadFailure(
                f"the command did not exit within {self.watchdog.stall_s:.0f} s after its output ended"
            ) from None

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
            permanent = code is not None and code.group(1)[0] == "4" and code.group(1) not in ("408", "425", "429")
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
    return [
        "curl",
        "--fail",
        "--silent",
        "--show-error",
        "--location",
        "--globoff",
        "--connect-timeout",
        str(retry.connect_timeout_s),
        url,
    ]


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
            failure = as_failure(source, e)
            failures += 1
            if failure.permanent or failures > retry.retries:
                raise ShardReadError(f"{url}: cannot read ({failure}){tries(failures)}") from None
            wait = retry.wait(failures)
            log.warning("reading %s failed (%s); retry %d in %.1f s", url, failure, failures, wait)
            time.sleep(wait)
        finally:
            if source is not None:
                source.abort()


def as_failure(source: Source | None, error: BaseException) -> ReadFailure:
    if isinstance(error, ReadFailure) or source is None:
        return error if isinstance(error, ReadFailure) else ReadFailure(f"{type(error).__name__}: {error}")
    return source.failure(error)


def tries(failures: int) -> str:
    return f"; failed {failures} times in a row" if failures > 1 else ""
