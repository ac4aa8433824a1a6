"""Shards -> evaluation batches: every image of a split exactly once across ranks, with its id and
all its reference captions.

    for batch in EvalStream("shards/flickr8k", "val", fmt, transform, batch_size=32,
                            rank=rank, world_size=world):
        ...

Images in manifest order, rank r takes the contiguous range [r*N//R, (r+1)*N//R) and its workers
contiguous sub-ranges; every image exactly once across ranks, with its id and all its reference
captions, no padding duplicates. A rank with no image yields nothing (the evaluator still joins its
collectives). Batches are not equal across ranks; eval needs no equal step counts.

Batch fields: pixel_values, image_ids, references (all captions per image), input_ids /
attention_mask (the generation prompt per image). Sources (`--data` forms) and bad samples are
handled as in training (data/stream.py); an image that fails to decode is left out of its batch,
counted in `EvalStream.last_stats`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from itertools import islice

from torch.utils.data import IterableDataset, get_worker_info

from blip2_dist.data.reader import LoaderStats, SampleLog, read_pieces, resolve_shards
from blip2_dist.data.stages import Record, can_pin, range_pieces, slot_range, to_torch, valid_samples, worker_loader
from blip2_dist.data.transforms import CaptionFormat, ImageTransform
from blip2_dist.data.urls import DEFAULT_RETRY, RetryPolicy

log = logging.getLogger(__name__)


class EvalStream:
    """Every image of a split exactly once across ranks, with its id and all its references."""

    def __init__(
        self,
        source: str | os.PathLike | list[str],
        split: str,
        fmt: CaptionFormat,
        transform: ImageTransform,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int = 2,
        pin_memory: bool = False,
        normalize: bool = True,
        max_images: int | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ):
        """max_images: only the split's first max_images images (manifest order), e.g. a quick eval."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.normalize = normalize
        self.fmt, self.transform, self.batch_size = fmt, transform, batch_size
        self.rank, self.world_size, self.pin_memory = rank, world_size, can_pin(pin_memory)
        self.retry = retry
        self.shards = resolve_shards(source, split, retry)
        self.total_images = sum(s.samples for s in self.shards)
        if max_images is not None:
            self.total_images = min(self.total_images, max_images)
        self.start, self.stop = slot_range(self.total_images, world_size, rank)
        self.num_images = self.stop - self.start
        self.num_workers = min(num_workers, self.num_images)
        self.last_stats = LoaderStats()

    @property
    def image_size(self) -> int:
        return self.transform.size[0]

    def __iter__(self) -> Iterator[dict]:
        if self.num_images == 0:
            return
        stats: dict[int, dict] = {}
        for wire in worker_loader(_EvalPart(self), self.num_workers):
            if "_final" in wire:  # a worker's counters, sent after its last batch
                part, counts = wire["_final"]
                stats[part] = counts
                continue
            yield to_torch(wire, self.transform, self.normalize, self.pin_memory)
        total: Counter[str] = Counter()
        for c in stats.values():
            total.update(c)
        self.last_stats = LoaderStats(dict(total))

    def _part_batches(self, part: int, parts: int) -> Iterator[dict]:
        lo, hi = slot_range(self.num_images, parts, part)
        slog = SampleLog(f"eval rank {self.rank} worker {part}")
        pieces = range_pieces(self.shards, list(range(len(self.shards))), self.start + lo, self.start + hi)
        records = valid_samples(read_pieces(pieces, slog, self.retry), slog)
        while True:
            chunk = list(islice(records, self.batch_size))
            if not chunk:
                break
            batch = _collate_eval(chunk, self.fmt, self.transform, slog)
            if batch is not None:
                yield batch
        if slog.counts:
            log.warning("%s: %s", slog.where, dict(sorted(slog.counts.items())))
        yield {"_final": (part, dict(slog.counts))}


class _EvalPart(IterableDataset):
    def __init__(self, stream: EvalStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.stream._part_batches(part, parts)


def _collate_eval(records: list[Record], fmt: CaptionFormat, transform: ImageTransform, slog: SampleLog) -> dict | None:
    images, ids, refs = [], [], []
    for rec in records:
        try:
            images.append(transform.load(rec.image))
        except Exception as e:  # noqa: BLE001
            slog.bad("decode", rec.shard, rec.key, repr(e))
            continue
        ids.append(rec.image_id)
        refs.append(list(rec.captions))
    if not images:
        return None
    return {
        "pixels": transform.stack(images),
        "image_ids": ids,
        "references": refs,
        **{k: v.numpy() for k, v in fmt.encode_prompts(len(images)).items()},
    }
