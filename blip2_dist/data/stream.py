"""Shards -> micro-batches for training (`TrainStream`); evaluation's `EvalStream` is in eval_stream.py,
the stages both are built from in stages.py.

    fmt = CaptionFormat.from_processor(processor, model.config, prompt="a photo of")
    transform = ImageTransform.from_processor(processor)
    train = TrainStream("shards/flickr8k", "train", fmt, transform, micro_batch=16,
                        rank=rank, world_size=world, num_workers=4, seed=0)
    for epoch in range(start.epoch, epochs):           # train.steps_per_epoch is known up front
        for batch in train.epoch(epoch, start_batch=start.batch if epoch == start.epoch else 0):
            ...                                         # train.state_dict() goes into checkpoints

Source: any `--data` form (reader.resolve_shards): a packed folder, a manifest's path or URL
(http(s)://, file:, pipe:CMD), or shard URLs with brace patterns, several joined by '::'. Counts
come from the manifest; for a pattern from a manifest.json beside local tars that lists them, or
img2dataset's NAME_stats.json; otherwise local tars are scanned once per rank (logged) and remote
ones need `python -m blip2_dist.data.pack_cli index` first. Shards are read through webdataset's I/O,
remote ones with retries that resume at the right sample (reader.py).

How an epoch is split (sample-level contiguous slots, no communication between ranks):
  * The epoch's image sequence: shards in an order shuffled with seed (seed, epoch), the same on
    every rank; samples in file order inside a shard. N images.
  * S = world_size x W slots (W = num_workers, or 1 when num_workers=0), slot = rank * W + worker:
    nodes get contiguous runs of ranks, ranks contiguous runs of slots. Slot s is the contiguous
    range [s*N//S, (s+1)*N//S) of the sequence: sizes differ by at most one image, any shard count
    works (fewer shards than slots included: slots then share a shard, each reading its own part).
    A slot opens only the shards overlapping its range and reads past the samples before its start
    (a stream cannot seek: their bytes are read and dropped, never decoded), so no image is decoded
    or handed out by two slots.
  * Every slot yields the same number B of micro-batches: B = floor(E / micro_batch), where E is a
    lower bound on any slot's examples in any epoch, computed from the manifest (all mode: the sum
    of the N//S smallest per-image caption counts; random mode: N//S). So
    steps_per_epoch = W x B on every rank, every epoch, known at construction, and every worker of
    every rank yields exactly B batches: nobody waits on a rank with less data.
  * Exactly once: within an epoch no two slots share an image, and a slot's examples are used at
    most once. The rest of each slot after its B batches is dropped: `dropped_examples_per_epoch`
    = captions (all mode) or images (random mode) - S x B x micro_batch, logged at construction.
    The dropped examples are the slot's last after shuffling, so they change from epoch to epoch.
    When the counts divide (e.g. equal caption counts, N divisible by S, and micro_batch dividing
    a slot's captions) the drop is 0 and every caption is seen exactly once per epoch.
  * Within a slot: a shuffle buffer over images (seeded by seed, epoch, slot), then the captions:
    `all` (default) keeps every caption, `random` draws one per image (seeded by seed, epoch,
    image). An image's captions stay together and are cut into micro-batches in order: a batch
    holds whole caption groups, except that a group may straddle two consecutive batches when it
    does not fit (it is then in both batches' pixel_values, decoded once: a worker keeps the last
    image it decoded). `pixel_values` has one row per image and `image_index` maps each example to
    its row, so the vision encoder can run once per image.
  * The DataLoader takes batches from its workers round-robin: batch i of a rank is batch i // W
    of worker i % W. Deterministic, so a rank's batch sequence is a function of (seed, epoch).

Bad samples (unreadable tar member, missing image or JSON part, bad JSON, no captions, an image
PIL cannot identify) are skipped before batching with a counted, rate-limited warning naming the
shard and key; a shard that ends early is reported with the number of samples lost. Skipping
makes a slot shorter than planned: the slot then starts again from its start (a new shuffle) and
fills its missing batches with those repeats (counted as `repeated_examples`), so every rank still
takes exactly steps_per_epoch steps. An image whose pixel data fails to decode later (a truncated
JPEG with a good header) is left out of its batch, which then has fewer than micro_batch examples
(`num_examples`); counted too. Each worker sends its counters after its last batch; they are
summed in `TrainStream.last_epoch_stats` / `EvalStream.last_stats` (this rank) and logged.

Resume: `epoch(e, start_batch=k)` yields exactly the batches k.. of the uninterrupted epoch e
(tensors equal; augmentation is seeded per image, so it replays too). Each worker skips its share
of the first k batches before anything is decoded or tokenised (their samples are read, not
decoded), and the workers' roles are rotated by k % W so the DataLoader's round-robin continues
where it stopped. `state_dict()` holds (epoch, batches handed
out); the same seed, world size, workers, micro-batch and caption mode are needed for an exact
resume (a changed configuration is warned about and resumes at the same fraction of the epoch).
One exception: if every image of a batch fails to decode, the worker repeats its previous batch
(counted); right after a resume there is none, and that case raises instead.

Batch fields: pixel_values float32 [n_images, 3, S, S] (uint8 with normalize=False),
image_index long [n_examples], input_ids / attention_mask / labels long [n_examples, L] (see
transforms.py for the layout), image_ids (per image), captions (per example), num_examples.

Why not webdataset's own stages: its split_by_node / split_by_worker hand out whole shards, so with
fewer shards than ranks x workers a rank gets none and the others wait for it forever (webdataset
issue 188), and step counts differ between ranks. Taken from it: URL opening (gopen), the tar
iterator, the grouping rule (key = path up to the first dot of the basename, `base_plus_ext`) and
the shuffle buffer's idea. Workers are started per
epoch (the epoch and the resume position are fixed when they start; ~0.1-0.3 s) and send numpy
arrays through the DataLoader's pipe: for ~1 MB batches that measured several times cheaper than
torch's shared-memory tensors (a new segment and fd per tensor).

The pipeline of one training slot, in order (see `TrainStream._slot_batches`):
  seeded shard order -> split by node/rank -> split by worker (the slot's range) -> tar expansion
  (skip bad samples, counted) -> shuffle buffer -> caption choice -> micro-batches of caption groups
  -> [resume skip] -> decode + resize (uint8) -> tokenise (batched) -> DataLoader, as numpy
  -> main process: normalise (batched, optionally into pinned memory, or left to the GPU).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from blip2_dist.data.reader import LoaderStats, SampleLog, read_pieces, resolve_shards
from blip2_dist.data.stages import (
    Record,
    can_pin,
    caption_batches,
    choose_captions,
    compose,
    mark_repeat,
    passes,
    range_pieces,
    seeded_rng,
    shuffled,
    slot_range,
    to_torch,
    valid_samples,
    worker_loader,
)
from blip2_dist.data.transforms import CaptionFormat, ImageTransform
from blip2_dist.data.urls import DEFAULT_RETRY, RetryPolicy
from blip2_dist.errors import UserError

log = logging.getLogger(__name__)

CAPTION_MODES = ("all", "random")


# --------------------------------------------------------------------------------------------
# Plan: identical on every rank, from the shard list alone
# --------------------------------------------------------------------------------------------


def epoch_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_shards))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


@dataclass
class LoaderState:
    """The loader's position: `batch` batches of `epoch` have been handed out."""

    epoch: int = 0
    batch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.batch = int(d["epoch"]), int(d["batch"])


# --------------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------------


class TrainStream:
    """Equal, exactly-once, resumable micro-batches per rank from shards (see the module docstring).

    micro_batch counts examples (captions). caption_mode: "all" (every caption once per epoch) or
    "random" (one seeded caption per image per epoch). shuffle_buffer: images per worker buffer.
    normalize=False hands out uint8 pixel_values (N, 3, H, W) for `transform.normalize_device` on
    the GPU (4x less host memory and copy); pin_memory pins what is handed out. Plan attributes,
    equal on every rank: steps_per_epoch, examples_per_epoch and dropped_examples_per_epoch (all
    ranks), num_images, num_captions; `summary()` returns them as a dict for logging. retry: how
    remote shards are retried (reader.RetryPolicy).
    """

    read = staticmethod(read_pieces)  # (pieces, SampleLog, RetryPolicy) -> raw samples

    def __init__(
        self,
        source: str | os.PathLike | list[str],
        split: str,
        fmt: CaptionFormat,
        transform: ImageTransform,
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        num_workers: int = 2,
        seed: int = 0,
        caption_mode: str = "all",
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
        normalize: bool = True,
        prefetch_factor: int = 2,
        multiprocessing_context: Any = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ):
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if micro_batch < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError("micro_batch and shuffle_buffer must be >= 1, num_workers >= 0")
        self.source, self.split, self.fmt, self.transform = source, split, fmt, transform
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.num_workers, self.seed, self.caption_mode = num_workers, seed, caption_mode
        self.shuffle_buffer, self.pin_memory, self.normalize = shuffle_buffer, can_pin(pin_memory), normalize
        self.prefetch_factor, self.mp_context, self.retry = prefetch_factor, multiprocessing_context, retry
        self.shards = resolve_shards(source, split, retry)
        self.state = LoaderState()
        self.last_epoch_stats = LoaderStats()
        self._plan()

    def _plan(self) -> None:
        counts = sorted(c for s in self.shards for c in s.caption_counts)
        self.num_images, self.num_captions = len(counts), sum(counts)
        self.slots_per_rank = max(self.num_workers, 1)
        self.num_slots = self.world_size * self.slots_per_rank
        per_slot = self.num_images // self.num_slots  # every slot has per_slot or per_slot + 1 images
        if self.caption_mode == "all":
            total, min_examples = self.num_captions, sum(counts[:per_slot])
        else:
            total, min_examples = self.num_images, per_slot
        self.batches_per_slot = min_examples // self.micro_batch
        if self.batches_per_slot == 0:
            unit = "captions" if self.caption_mode == "all" else "images"
            raise ValueError(
                f"split {self.split!r} has {self.num_captions} captions in {self.num_images} images; "
                f"{self.world_size} ranks x {self.slots_per_rank} workers x micro-batch {self.micro_batch} needs "
                f"at least {self.num_slots * self.micro_batch} {unit} "
                f"(each of the {self.num_slots} slots gets >= {per_slot} images = {min_examples} examples): "
                "lower micro_batch, num_workers or the number of ranks"
            )
        self.steps_per_epoch = self.slots_per_rank * self.batches_per_slot
        self.examples_per_epoch = self.num_slots * self.batches_per_slot * self.micro_batch  # all ranks
        self.dropped_examples_per_epoch = total - self.examples_per_epoch
        if self.rank == 0:
            log.info(
                "%s %s: %d images, %d captions; %d ranks x %d workers = %d slots; %d steps/epoch/rank of %d "
                "examples (%s captions); %d examples/epoch, %d dropped by rounding (%.2f%%)",
                self.source,
                self.split,
                self.num_images,
                self.num_captions,
                self.world_size,
                self.slots_per_rank,
                self.num_slots,
                self.steps_per_epoch,
                self.micro_batch,
                self.caption_mode,
                self.examples_per_epoch,
                self.dropped_examples_per_epoch,
                100.0 * self.dropped_examples_per_epoch / max(total, 1),
            )

    def summary(self) -> dict:
        return dict(
            images=self.num_images,
            captions=self.num_captions,
            slots=self.num_slots,
            steps_per_epoch=self.steps_per_epoch,
            micro_batch=self.micro_batch,
            caption_mode=self.caption_mode,
            examples_per_epoch=self.examples_per_epoch,
            dropped_examples_per_epoch=self.dropped_examples_per_epoch,
        )

    # -- the epoch iterator (main process) ---------------------------------------------------
    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        """Batches start_batch..steps_per_epoch-1 of `epoch` for this rank (exactly that many)."""
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch {start_batch} not in [0, {self.steps_per_epoch}]")
        self.state = LoaderState(epoch, start_batch)
        worker_stats: dict[int, dict] = {}
        handed = 0
        if start_batch < self.steps_per_epoch:
            loader = worker_loader(
                _TrainEpoch(self, epoch, start_batch), self.num_workers, self.prefetch_factor, self.mp_context
            )
            for wire in loader:
                if "_final" in wire:  # a worker's counters, sent after its last batch
                    role, stats = wire["_final"]
                    worker_stats[role] = stats
                    continue
                handed += 1
                self.state.batch += 1  # counted before the yield: a checkpoint after this step includes it
                yield to_torch(wire, self.transform, self.normalize, self.pin_memory)
        expected = self.steps_per_epoch - start_batch
        if handed != expected:  # cannot happen by construction; never hide it
            raise RuntimeError(f"epoch {epoch}: loader gave {handed} batches, expected {expected}")
        total: Counter[str] = Counter()
        for stats in worker_stats.values():
            total.update(stats)
        self.last_epoch_stats = LoaderStats(dict(total))
        if total:
            log.warning("rank %d epoch %d loader counters: %s", self.rank, epoch, dict(sorted(total.items())))
        self.state = LoaderState(epoch + 1, 0)

    def resume(self) -> Iterator[dict]:
        """The rest of the epoch `state` points at (epoch(state.epoch, state.batch))."""
        return self.epoch(self.state.epoch, self.state.batch)

    # -- checkpoint state --------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return dict(
            seed=self.seed,
            world_size=self.world_size,
            num_workers=self.num_workers,
            micro_batch=self.micro_batch,
            caption_mode=self.caption_mode,
            shards=[s.name for s in self.shards],
            num_captions=self.num_captions,
            steps_per_epoch=self.steps_per_epoch,
        )

    def state_dict(self) -> dict:
        return {**self.state.state_dict(), "config": self._fingerprint()}

    def load_state_dict(self, d: dict) -> None:
        epoch, batch = int(d["epoch"]), int(d["batch"])
        old = d.get("config", {})
        changed = {k: (old[k], v) for k, v in self._fingerprint().items() if k in old and old[k] != v}
        if changed:
            old_steps = max(int(old.get("steps_per_epoch", self.steps_per_epoch)), 1)
            batch = min(batch * self.steps_per_epoch // old_steps, self.steps_per_epoch)
            log.warning(
                "loader configuration changed since the checkpoint (%s): the batches after this resume "
                "differ from the interrupted run's; resuming epoch %d at batch %d of %d",
                ", ".join(k for k in changed),
                epoch,
                batch,
                self.steps_per_epoch,
            )
        if batch >= self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        self.state = LoaderState(epoch, batch)

    # -- one slot (runs in a DataLoader worker) ----------------------------------------------
    def _slot_batches(self, epoch: int, slot: int, skip: int, role: int) -> Iterator[dict]:
        slog = SampleLog(f"rank {self.rank} worker {role} epoch {epoch}")
        start, stop = slot_range(self.num_images, self.num_slots, slot)
        pieces = range_pieces(self.shards, epoch_order(len(self.shards), self.seed, epoch), start, stop)

        def one_pass(n: int) -> Iterable[Record]:
            # Pass 0 is the slot; later passes (only after bad samples) fill the slot's missing batches.
            plog = slog if n == 0 else SampleLog(slog.where, first=0, every_s=math.inf)
            return compose(
                self.read(pieces, plog, self.retry),  # tar expansion of this slot's range only (retried)
                partial(valid_samples, slog=plog),  # bad samples skipped: counted, rate-limited warning
                partial(shuffled, bufsize=self.shuffle_buffer, rng=seeded_rng(self.seed, epoch, slot, n)),
                partial(choose_captions, mode=self.caption_mode, seed_key=f"{self.seed}:{epoch}:{n}"),
                partial(mark_repeat, repeat=n > 0),
            )

        batches = compose(
            passes(one_pass, f"{slog.where} slot {slot} ({start}..{stop - 1})"),
            partial(caption_batches, micro_batch=self.micro_batch),  # exactly micro_batch examples each
            lambda b: islice(b, skip, self.batches_per_slot),  # equal count; resume skip before decoding
        )
        previous, last = None, {}
        for raw in batches:
            batch = _collate_train(raw, self.fmt, self.transform, slog, f"{self.seed}:{epoch}", previous, last)
            previous = batch
            yield batch
        if slog.counts:
            log.warning("%s: %s", slog.where, dict(sorted(slog.counts.items())))
        yield {"_final": (role, dict(slog.counts))}


class _TrainEpoch(IterableDataset):
    """One epoch of one rank; each DataLoader worker plays one slot."""

    def __init__(self, stream: TrainStream, epoch: int, start_batch: int):
        super().__init__()
        self.stream, self.epoch, self.start_batch = stream, epoch, start_batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = self.stream.slots_per_rank
        # After a resume at batch k the loader starts again at worker 0, which must continue where
        # worker k % W stopped: rotate the roles so the round-robin order is unchanged.
        role = ((info.id if info is not None else 0) + self.start_batch) % w
        skip = max(0, -(-(self.start_batch - role) // w))  # batches i < k with i % W == role
        slot = self.stream.rank * w + role
        return self.stream._slot_batches(self.epoch, slot, skip, role)


def _collate_train(
    raw: list[tuple[Record, list[str]]],
    fmt: CaptionFormat,
    transform: ImageTransform,
    slog: SampleLog,
    aug_key: str,
    previous: dict | None,
    last: dict,
) -> dict:
    """Decode + resize each image once, stack them (uint8), tokenise the captions in one call."""
    images, index, captions, ids = [], [], [], []
    for rec, caps in raw:
        if last.get("record") is rec:  # straddles from the previous batch: decoded (or failed) already
            pixels = last["pixels"]
        else:
            rng = random.Random(f"{aug_key}:{rec.key}") if transform.augment else None
            try:
                pixels = transform.load(rec.image, rng)
            except Exception as e:  # noqa: BLE001 - e.g. a truncated JPEG with a good header
                slog.bad("decode", rec.shard, rec.key, repr(e))
                pixels = None
            last.update(record=rec, pixels=pixels)
        if pixels is None:
            slog.add("examples_left_out", len(caps))
            continue
        index += [len(images)] * len(caps)
        images.append(pixels)
        ids.append(rec.image_id)
        captions += caps
        slog.add("repeated_examples", len(caps) if rec.repeat else 0)
    if not images:
        if previous is None:
            raise UserError(f"{slog.where}: no image of a micro-batch could be decoded: {[r.key for r, _ in raw]}")
        slog.add("repeated_batches")
        return dict(previous)
    enc, truncated = fmt.encode_train_counted(captions)
    slog.add("truncated_captions", truncated)
    return {
        "pixels": transform.stack(images),  # uint8 NHWC: 4x less to send than float32
        "image_index": np.asarray(index, dtype=np.int64),
        **{k: v.numpy() for k, v in enc.items()},
        "image_ids": ids,
        "captions": captions,
        "num_examples": len(captions),
    }
