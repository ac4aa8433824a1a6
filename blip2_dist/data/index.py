"""The counting pass: a manifest for shards that have none (another tool's, or remote ones).

    python -m blip2_dist.data.pack_cli index 'https://host/cc/{00000..00099}.tar' --out cc/manifest.json
    python -m blip2_dist.data.pack_cli index 'pipe:aws s3 cp s3://b/cc/{00000..00099}.tar -' --split val --out cc

Every shard is read once (through the same reader as training, retries included), and the manifest
records per shard its per-sample caption counts, sample and caption totals, size and sha256: what
the loader needs to give every rank the same number of steps. Written atomically; an existing
manifest keeps its other splits (so train and val can be indexed one after the other). Shards
beside the manifest are listed by name (the folder can move); others by their full URL, so the
manifest can live anywhere (a shared home folder), and `--data PATH/manifest.json` reads them from
where they are. Samples the loader will skip (no caption) are listed in `skipped`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from blip2_dist.data.img2dataset import shard_urls
from blip2_dist.data.pack import PackError, default_workers, ordered_map
from blip2_dist.data.reader import count_shard
from blip2_dist.data.shards import FORMAT, MANIFEST, read_manifest, run_length
from blip2_dist.data.urls import DEFAULT_RETRY, RetryPolicy, is_remote, local_path
from blip2_dist.io import write_json_atomic


def manifest_path(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    return out if out.suffix == ".json" else out / MANIFEST


def _entry(count, folder: Path) -> dict:
    path = None if is_remote(count.url) else local_path(count.url)
    beside = path is not None and path.resolve().parent == folder.resolve()
    entry = {
        "name": path.name if beside else count.url,
        "samples": len(count.caption_counts),
        "captions": sum(count.caption_counts),
        "caption_counts": run_length(count.caption_counts),
        "sha256": count.sha256,
        "bytes": count.bytes,
    }
    if not beside:
        entry["url"] = count.url
    return entry


def _base_manifest(path: Path) -> dict:
    if not path.exists():
        return {"format": FORMAT, "source": {"layout": "index"}, "splits": {}, "skipped": []}
    try:
        return read_manifest(path)
    except ValueError as e:
        raise PackError(f"{path}: exists and is not a manifest this tool wrote ({e}); choose another --out") from e


def index_shards(
    spec: str,
    out: str | os.PathLike,
    *,
    split: str = "train",
    workers: int | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    log: Callable[[str], None] = print,
) -> dict:
    """Count every shard `spec` names (brace patterns, several joined by '::') into `out`'s manifest."""
    urls = shard_urls(spec, split)
    path = manifest_path(out)
    manifest = _base_manifest(path)
    t0 = time.time()
    counts = list(ordered_map(lambda u: count_shard(u, retry), urls, workers or min(default_workers(), 4)))
    entries = [_entry(c, path.parent) for c in counts]
    manifest["splits"][split] = {
        "images": sum(e["samples"] for e in entries),
        "captions": sum(e["captions"] for e in entries),
        "shards": entries,
    }
    manifest["skipped"] = [s for s in manifest.get("skipped", []) if s.get("file") not in set(urls)] + [
        {"image_id": key, "file": c.url, "reason": f"sample the loader skips: {why}"}
        for c in counts
        for key, why in c.bad
    ]
    manifest["source"].setdefault("indexed", {})[split] = spec
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest)
    total = sum(c.bytes for c in counts)
    log(
        f"indexed {len(urls)} shard(s), {manifest['splits'][split]['images']} samples, {total / 1e6:.1f} MB "
        f"in {time.time() - t0:.1f} s into {path} (split {split})"
    )
    return manifest
