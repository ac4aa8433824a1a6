"""The stages both streams are built from (data/stream.py trains, data/eval_stream.py evaluates):
plain generator functions that take an iterator and yield, the contiguous range split, and the
DataLoader that runs them in workers.

    records = valid_samples(read_pieces(range_pieces(shards, order, lo, hi), slog, retry), slog)
    batches = compose(records, partial(shuffled, bufsize=1000, rng=rng), partial(caption_batches, micro_batch=16))
    for wire in worker_loader(dataset, num_workers=2):
        batch = to_torch(wire, transform, normalize=True, pin_memory=False)

Bad samples (a missing part, bad JSON, an image PIL cannot identify from its header) are skipped
by `valid_samples` with a counted warning naming the shard and key (reader.SampleLog).
"""

from __future__ import annotations

import io
import logging
import os
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import count
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from blip2_dist.data.reader import SampleLog, ShardInfo, image_part, parse_sample
from blip2_dist.data.transforms import ImageTransform
from blip2_dist.errors import UserError, die_with_parent

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One good sample: its image (opened, not decoded), id, captions (all, or the one drawn)."""

    shard: str
    key: str
    image_id: str
    image: Image.Image
    captions: list[str]
    repeat: bool = False  # read again to fill a slot shortened by bad samples


def valid_samples(raws: Iterable[dict], slog: SampleLog) -> Iterator[Record]:
    """Skip a sample with a missing part, bad JSON, or an image PIL cannot identify (header only)."""
    for raw in raws:
        parts, shard, key = raw["parts"], raw["shard"], raw["key"]
        ext = image_part(parts)
        if ext is None or not ("json" in parts or "txt" in parts):
            slog.bad("missing_part", shard, key, f"has {sorted(parts)}, needs an image and json (or txt)")
            continue
        try:
            image_id, captions = parse_sample(parts, key)
        except Exception as e:  # noqa: BLE001
            slog.bad("json", shard, key, repr(e))
            continue
        try:  # parses the header only; the pixels are decoded later, from this same object
            image = Image.open(io.BytesIO(parts[ext]))
        except Exception as e:  # noqa: BLE001
            slog.bad("image", shard, key, repr(e))
            continue
        yield Record(shard, key, image_id, image, captions)


def shuffled(items: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """A shuffle buffer (webdataset's idea) with an explicit, seeded generator."""
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def choose_captions(records: Iterable[Record], mode: str, seed_key: str) -> Iterator[Record]:
    for rec in records:
        if mode == "random":
            rec.captions = [random.Random(f"{seed_key}:{rec.key}").choice(rec.captions)]
        yield rec


def caption_batches(records: Iterable[Record], micro_batch: int) -> Iterator[list[tuple[Record, list[str]]]]:
    """Cut the caption groups into micro-batches of exactly micro_batch examples (a tail is dropped)."""
    batch: list[tuple[Record, list[str]]] = []
    n = 0
    for rec in records:
        caps = rec.captions
        i = 0
        while i < len(caps):
            take = min(micro_batch - n, len(caps) - i)
            batch.append((rec, caps[i : i + take]))
            n, i = n + take, i + take
            if n == micro_batch:
                yield batch
                batch, n = [], 0


def compose(source: Iterable, *stages: Callable[[Iterable], Iterable]) -> Iterable:
    for stage in stages:
        source = stage(source)
    return source


def slot_range(n: int, slots: int, slot: int) -> tuple[int, int]:
    """Contiguous, near-equal (sizes differ by at most 1) part `slot` of range(n)."""
    return slot * n // slots, (slot + 1) * n // slots


def range_pieces(shards: list[ShardInfo], order: list[int], start: int, stop: int) -> list[tuple[ShardInfo, int, int]]:
    """The (shard, lo, hi) pieces covering images start..stop-1 of the sequence `order` defines."""
    pieces, offset = [], 0
    for i in order:
        s = shards[i]
        lo, hi = max(start - offset, 0), min(stop - offset, s.samples)
        if lo < hi:
            pieces.append((s, lo, hi))
        offset += s.samples
        if offset >= stop:
            break
    return pieces


def seeded_rng(*parts: Any) -> random.Random:
    return random.Random(":".join(map(str, parts)))  # str seeds hash with sha512: same in every process


def mark_repeat(records: Iterable[Record], repeat: bool) -> Iterator[Record]:
    for rec in records:
        rec.repeat = repeat
        yield rec


def passes(one_pass: Callable[[int], Iterable[Record]], where: str) -> Iterator[Record]:
    for n in count():
        got = 0
        for rec in one_pass(n):
            got += 1
            yield rec
        if got == 0:
            raise UserError(f"{where}: no readable sample in this slot's shards; cannot fill its batches")


def can_pin(pin_memory: bool) -> bool:
    if pin_memory and not torch.cuda.is_available():
        log.warning("pin_memory=True but no CUDA device: not pinning")
        return False
    return pin_memory


def _identity(x: Any) -> Any:
    return x


def worker_loader(
    dataset: IterableDataset, num_workers: int, prefetch_factor: int = 2, mp_context: Any = None
) -> Iterable:
    """Workers send numpy arrays (pickled through the pipe): for ~1 MB batches that is several times
    cheaper than torch's shared-memory tensors (a new shm segment + fd passing per tensor)."""
    if num_workers == 0:
        return iter(dataset)
    return DataLoader(
        dataset,
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        persistent_workers=False,
        multiprocessing_context=mp_context,
        worker_init_fn=partial(_init_worker, parent=os.getpid()),
    )


def _init_worker(worker_id: int, parent: int) -> None:
    """SLURM signals every process of a job step (scancel --signal, srun forwarding). A worker
    killed by SIGUSR1/SIGTERM would crash the trainer before it saves, so workers ignore them;
    the trainer handles them and shuts its workers down. So that a worker never outlives its rank
    (a rank SIGKILLed, or one ending through errors.hard_exit), the kernel kills it when its rank
    dies."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)


def to_torch(wire: dict, transform: ImageTransform, normalize: bool, pin_memory: bool) -> dict:
    """Main process: numpy -> tensors (zero-copy), pixels normalised in one batched pass (into pinned
    memory if asked), or kept uint8 (N, 3, H, W) for `transform.normalize_device` on the GPU."""
    batch = {}
    for k, v in wire.items():
        if k == "pixels":
            if normalize:
                batch["pixel_values"] = transform.normalize(v, pin_memory=pin_memory)
            else:
                pv = torch.from_numpy(v).permute(0, 3, 1, 2)  # channels-last strides, no copy
                batch["pixel_values"] = pv.pin_memory() if pin_memory else pv
        elif isinstance(v, np.ndarray):
            t = torch.from_numpy(v)
            batch[k] = t.pin_memory() if pin_memory else t
        else:
            batch[k] = v
    return batch
