"""img2dataset-style shards (KEY.jpg, KEY.txt = the caption, KEY.json = metadata) -> records with
every caption of an image together, so that the vision encoder runs once per image.

    python -m blip2_dist.data.pack_cli img2dataset 'cc/{00000..00009}.tar' --out shards/cc
    python -m blip2_dist.data.pack_cli img2dataset 'https://host/coco/{00000..00099}.tar' --group-by image_id \
        --split-ratio 0.98,0.01,0.01 --out shards/coco_i2d

Training reads such shards directly too (`--data 'cc/{00000..00009}.tar'`: one caption per sample,
counts from img2dataset's NAME_stats.json); convert them when one image has several captions (a
caption list downloaded with img2dataset gives one sample per caption, the image repeated).

Groups: samples whose json holds the same value of `--group-by` (default: `image_id` when the
first sample's json has it, that is when img2dataset was run with `--save_additional_columns
'["image_id"]'`; else `url`: the same URL is the same image) form one image with all their
captions, in reading order, and the first sample's image. The image id is that `image_id` value, or
the first sample's key. Two reading passes (each shard is read twice): the first collects the
captions of every group, the second hands the packer each group's image in the same order, so
nothing but the captions is held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from webdataset.shardlists import expand_urls

from blip2_dist.data.flickr8k import PackError, Problem, Record, ratio_split
from blip2_dist.data.reader import SampleLog, image_part, read_shard, split_sources
from blip2_dist.data.shards import SPLITS
from blip2_dist.data.urls import DEFAULT_RETRY, RetryPolicy, is_remote, local_path

DEFAULT_GROUP_FIELDS = ("image_id", "url")


def _meta(raw: dict) -> dict:
    try:
        meta = json.loads(raw["parts"].get("json", b"{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _caption(raw: dict, meta: dict) -> str | None:
    text = raw["parts"]["txt"].decode("utf-8", "replace") if "txt" in raw["parts"] else meta.get("caption")
    return text.strip() if isinstance(text, str) and text.strip() else None


class _ImageFeed:
    """Pass two: the image of each group's first sample, handed out in the order of pass one."""

    def __init__(self, urls: list[str], firsts: set[tuple[str, int]], retry: RetryPolicy):
        self._samples = self._read(urls, firsts, retry)

    @staticmethod
    def _read(urls, firsts, retry) -> Iterator[tuple[tuple[str, int], bytes | None]]:
        slog = SampleLog("img2dataset images")
        for url in urls:
            for raw in read_shard(url, url, 0, None, slog, retry=retry):
                if (url, raw["index"]) in firsts:
                    ext = image_part(raw["parts"])
                    yield (url, raw["index"]), raw["parts"][ext] if ext else None

    def image(self, position: tuple[str, int]) -> bytes:
        for where, data in self._samples:
            if where == position:
                if data is None:
                    raise ValueError(f"{position[0]} sample {position[1]}: no image part")
                return data
        raise ValueError(f"{position[0]} sample {position[1]}: not found on the second read (did the shard change?)")


def shard_urls(spec: str, split: str) -> list[str]:
    """The shards a packer command's SPEC names (brace patterns, several joined by '::'), checked:
    a PackError for an unknown --split or a local shard that is not there (img2dataset and index)."""
    if split not in SPLITS:
        raise PackError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    urls = [u for part in split_sources(spec) for u in expand_urls(part)]
    missing = [u for u in urls if not is_remote(u) and not local_path(u).is_file()]
    if not urls or missing:
        raise PackError(f"{spec}: {len(missing)} of {len(urls)} shard(s) not found, e.g. {(missing or [spec])[0]}")
    return urls


def img2dataset_records(
    spec: str,
    *,
    group_by: str | None = None,
    split: str = "train",
    split_ratio: tuple | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> tuple[dict, list[Record], list[Problem]]:
    urls = shard_urls(spec, split)
    groups: dict[str, dict] = {}
    problems: list[Problem] = []
    slog = SampleLog("img2dataset captions")
    samples = 0
    for url in urls:
        for raw in read_shard(url, url, 0, None, slog, parts=("json", "txt"), retry=retry):
            samples += 1
            meta, where = _meta(raw), f"{url} [{raw['key']}]"
            if group_by is None:
                group_by = next((f for f in DEFAULT_GROUP_FIELDS if f in meta), "__key__")
            value = raw["key"] if group_by == "__key__" else meta.get(group_by)
            caption = _caption(raw, meta)
            if value is None:
                problems.append(Problem(raw["key"], where, f"no {group_by!r} in its json"))
            elif caption is None:
                problems.append(Problem(raw["key"], where, "no caption (empty or missing txt)", "caption"))
            else:
                group = groups.setdefault(str(value), {"first": (url, raw["index"]), "key": raw["key"], "captions": []})
                group["captions"].append(caption)
    if slog.counts["bad_tar"]:
        raise PackError(f"{spec}: {slog.counts['bad_tar']} sample(s) in unreadable or short shards (see the warnings)")
    feed = _ImageFeed(urls, {g["first"] for g in groups.values()}, retry)
    records = []
    for value, g in groups.items():
        image_id = value if group_by == "image_id" else g["key"]
        chosen = ratio_split(image_id, split_ratio) if split_ratio else split
        records.append(
            Record(
                image_id,
                chosen,
                g["captions"],
                data=lambda p=g["first"]: feed.image(p),
                origin=f"{g['first'][0]} [{g['key']}]",
            )
        )
    info = {
        "layout": "img2dataset",
        "path": spec,
        "group_by": group_by,
        "samples": samples,
        "images": len(records),
        "split_rule": f"sha1(image id) by {list(split_ratio)}" if split_ratio else f"all {split}",
    }
    return info, records, problems
