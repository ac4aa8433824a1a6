"""The data contract: WebDataset tar shards + manifest.json. The packer writes it, the loader reads it.

One sample per image: `{key}.jpg` (JPEG bytes) and `{key}.json`
(`{"image_id": str, "captions": [str, ...], "split": "train"|"val"|"test"}`), where `key` is the
image id with any "." replaced by "_" (webdataset cuts keys at the first dot). Shards are named
`{split}-{NNNNNN}.tar`; `manifest.json` lists per split its shards (samples, captions, per-sample
caption counts run-length encoded, sha256), and what was skipped and why.

Tars are written deterministically (fixed mtime/owner/mode, input order), so the same input gives
byte-identical shards. The manifest is written last and atomically: a folder without one is not a
finished pack.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from blip2_dist.data.urls import DEFAULT_RETRY, fetch_bytes, local_path
from blip2_dist.io import write_json_atomic

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT = "blip2-dist-wds-v1"
WRITER = "blip2-dist ShardWriter"  # manifest["written_by"]: the packer replaces only packs it wrote


@dataclass
class Sample:
    """One image with all its captions, ready to be written."""

    image_id: str
    split: str
    captions: list[str]
    jpeg: bytes


def sample_key(image_id: str) -> str:
    return image_id.replace(".", "_")


def run_length(values: Iterable[int]) -> list[list[int]]:
    """[5, 5, 5, 4] -> [[5, 3], [4, 1]]: per-sample caption counts stay tiny in the manifest."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


def expand_runs(runs: list[list[int]]) -> list[int]:
    return [value for value, count in runs for _ in range(count)]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_json(sample: Sample) -> bytes:
    meta = {"image_id": sample.image_id, "captions": sample.captions, "split": sample.split}
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _OpenShard:
    name: str
    tar: tarfile.TarFile
    caption_counts: list[int] = field(default_factory=list)


class ShardWriter:
    """Writes samples of one or more splits into `{split}-{NNNNNN}.tar` + `manifest.json`.

    Use as a context manager; `close()` (on success only) finishes the shards and writes the
    manifest. On an exception the manifest is not written, so a partial pack never looks complete.
    """

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 1000, source: dict | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.samples_per_shard = samples_per_shard
        self.source = source or {}
        self.skipped: list[dict] = []
        self._open: dict[str, _OpenShard] = {}
        self._done: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self._seen_keys: set[str] = set()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A stale manifest would describe shards we are about to overwrite.
        (self.out_dir / MANIFEST).unlink(missing_ok=True)

    def write(self, sample: Sample) -> None:
        if sample.split not in SPLITS:
            raise ValueError(f"sample {sample.image_id!r}: split must be one of {SPLITS}, got {sample.split!r}")
        if not sample.captions:
            raise ValueError(f"sample {sample.image_id!r}: no captions")
        key = sample_key(sample.image_id)
        if key in self._seen_keys:
            raise ValueError(f"sample {sample.image_id!r}: duplicate image id (key {key!r})")
        self._seen_keys.add(key)
        shard = self._open.get(sample.split)
        if shard is None:
            shard = self._start_shard(sample.split)
        _add_bytes(shard.tar, f"{key}.jpg", sample.jpeg)
        _add_bytes(shard.tar, f"{key}.json", sample_json(sample))
        shard.caption_counts.append(len(sample.captions))
        if len(shard.caption_counts) >= self.samples_per_shard:
            self._finish_shard(sample.split)

    def skip(self, image_id: str, file: str, reason: str) -> None:
        """Record a sample left out (only with --skip-bad): it is listed in the manifest."""
        self.skipped.append({"image_id": image_id, "file": file, "reason": reason})

    def _start_shard(self, split: str) -> _OpenShard:
        name = f"{split}-{len(self._done[split]):06d}.tar"
        tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self._open[split] = _OpenShard(name, tar)
        return self._open[split]

    def _finish_shard(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.tar.close()
        self._done[split].append(
            {
                "name": shard.name,
                "samples": len(shard.caption_counts),
                "captions": sum(shard.caption_counts),
                "caption_counts": run_length(shard.caption_counts),
                "sha256": sha256_file(self.out_dir / shard.name),
            }
        )

    def manifest(self) -> dict:
        splits = {}
        for split, shards in self._done.items():
            if shards:
                splits[split] = {
                    "images": sum(s["samples"] for s in shards),
                    "captions": sum(s["captions"] for s in shards),
                    "shards": shards,
                }
        return {
            "format": FORMAT,
            "written_by": WRITER,
            "source": self.source,
            "splits": splits,
            "skipped": self.skipped,
        }

    def close(self) -> dict:
        for split in list(self._open):
            self._finish_shard(split)
        manifest = self.manifest()
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        return manifest

    def abort(self) -> None:
        for shard in self._open.values():
            shard.tar.close()
        self._open.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def manifest_location(source: str | os.PathLike) -> str:
    """Where a source's manifest is: `folder/manifest.json` for a local folder, else the source itself
    (a manifest's path, `file:` or http(s) URL, or a `pipe:` command that prints it)."""
    text = str(source)
    path = local_path(text)
    if path is not None and path.is_dir():
        return text.rstrip("/") + "/" + MANIFEST
    return text


def shard_url(source: str | os.PathLike, name: str) -> str:
    """A shard's URL from its manifest's: the manifest's file name replaced by the shard's name, so
    `http://h/f8k/manifest.json` -> `http://h/f8k/train-000000.tar` and
    `pipe:aws s3 cp s3://b/f8k/manifest.json -` -> `pipe:aws s3 cp s3://b/f8k/train-000000.tar -`."""
    location = manifest_location(source)
    found = list(re.finditer(r"[^/\s'\"]+\.json(?=$|[\s?#'\"])", location))
    if not found:
        raise ValueError(f"{source}: cannot tell the manifest's file name (expected a name ending in .json)")
    last = found[-1]
    return location[: last.start()] + name + location[last.end() :]


def read_manifest(source: str | os.PathLike, retry=None) -> dict:
    """A pack's manifest from a folder, a manifest's path, or a URL (http(s)://, file:, pipe:CMD;
    remote reads are retried as shards are, see reader.RetryPolicy). Errors name the location."""
    location = manifest_location(source)
    path = local_path(location)
    if path is not None:
        if not path.is_file():
            what = "no manifest" if path.name == MANIFEST else "no such manifest"
            raise FileNotFoundError(
                f"{path}: {what}. Pack data first (python -m blip2_dist.data.pack_cli ...); "
                "a folder without a manifest is an unfinished pack."
            )
        text = path.read_text(encoding="utf-8")
    else:
        text = fetch_bytes(location, retry or DEFAULT_RETRY).decode("utf-8")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{location}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{location}: format {found!r}, expected {FORMAT!r}")
    return manifest


def split_shards(manifest: dict, split: str, source: str | os.PathLike) -> list[dict]:
    """The split's shard entries with a `path` added (the entry's own `url`, else its name beside the
    manifest, see shard_url); a clear error if the split is absent."""
    if split not in manifest["splits"]:
        raise ValueError(f"{manifest_location(source)}: no split {split!r} (has {sorted(manifest['splits'])})")
    return [dict(s, path=s.get("url") or shard_url(source, s["name"])) for s in manifest["splits"][split]["shards"]]
