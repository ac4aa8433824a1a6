"""Loader benchmark: the shard stream against the seed notebook's per-item Blip2Processor loader.

    python benchmarks/bench.py loader --synthesize 400 --images /tmp/flickr_like            # make + bench
    python benchmarks/bench.py loader --images /tmp/flickr_like --max-side 364              # re-encoded shards
    python benchmarks/bench.py loader --images shards/flickr8k --workers 2 --json out.json  # packed shards

The loaders run in this process with the same worker count, image size and processor:
  * stream: `TrainStream` over shards (world size 1), one epoch or `--max-batches`, reading
    through webdataset (gopen + its tar iterator). The reader alone (no decode) is timed too, and
    the cost of starting a range deep in a shard (webdataset reads and discards the members before it).
  * baseline (the seed notebook): a map-style Dataset of (image file, caption) pairs, one item per
    caption, `processor(images=img, text=caption, padding="max_length", return_tensors="pt")` per
    item, a DataLoader with shuffle and the same workers and batch size.
Reported per loader (median of `--repeat` alternating runs): images decoded/s and examples
(image-caption pairs)/s, per worker process (wall), and per CPU-second (user+sys of the main
process and its workers: what one fully busy core delivers), with and without worker start-up. The
baseline decodes one image per example, so its images/s equals its examples/s; the stream with
`--caption-mode all` decodes each image once for all its captions. Both ratios are printed; say
which one you quote.

Inputs: a packed folder (manifest.json; the baseline then reads the same JPEG bytes, written to
files through the library's reader) or a folder of JPEGs (+ optional captions.json {stem: [captions]};
else 5 synthetic captions per image), which is packed first by the packer itself
(`pack.pack_records`: verified, and re-encoded to `--max-side` if given, as `pack --max-side` does),
while the baseline reads the original files as the notebook does.
The processor: BlipImageProcessorPil at `--image-size` (224 by default) and the tiny tokenizer (the
real tokenizers can't be downloaded here), 32 query tokens like the real checkpoints.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from blip2_dist.config import option
from blip2_dist.data.flickr8k import Record
from blip2_dist.data.pack import pack_records
from blip2_dist.data.reader import SampleLog, image_part, parse_sample, read_shard, resolve_shards
from blip2_dist.data.shards import MANIFEST, read_manifest
from blip2_dist.data.stream import TrainStream
from blip2_dist.data.synthetic import natural_image
from blip2_dist.data.transforms import CaptionFormat, ImageTransform

SYNTH_CAPTIONS = (
    "a dog runs across the green grass",
    "two children are playing with a ball on the beach",
    "a man in a red shirt is riding a bike down the street",
    "a woman stands next to a large white dog in the snow",
    "people are sitting near the water on a sunny day",
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def synthesize(out_dir: str | os.PathLike, n: int, seed: int = 0, quality: int = 93) -> dict:
    """n Flickr8k-sized JPEGs (500x375, ~110 KB at quality 93) + captions.json in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = {}
    for i in range(n):
        stem = f"photo_{i:05d}"
        natural_image(rng).save(out / f"{stem}.jpg", "JPEG", quality=quality)
        captions[stem] = [f"{c} {i}" for c in SYNTH_CAPTIONS]
    (out / "captions.json").write_text(json.dumps(captions))
    sizes = [p.stat().st_size for p in out.glob("*.jpg")]
    return {"images": n, "mean_kb": float(np.mean(sizes)) / 1000}


def folder_items(folder: str | os.PathLike) -> list[tuple[Path, list[str]]]:
    folder = Path(folder)
    caption_file = folder / "captions.json"
    known = json.loads(caption_file.read_text()) if caption_file.is_file() else {}
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no .jpg files and no manifest.json")
    return [(p, known.get(p.stem) or [f"{c} {i}" for c in SYNTH_CAPTIONS]) for i, p in enumerate(paths)]


def pack_folder(items: list[tuple[Path, list[str]]], out: Path, max_side: int | None) -> None:
    """The JPEG folder packed by the packer itself (train split), as `pack --max-side` would."""
    records = [Record(path.stem, "train", caps, path=str(path)) for path, caps in items]
    pack_records(
        records,
        out,
        source={"layout": "bench", "path": str(items[0][0].parent)},
        samples_per_shard=100,
        max_side=max_side,
        workers=1,
        progress=False,
    )


def extract_items(shard_dir: str | os.PathLike, split: str, out: Path) -> list[tuple[Path, list[str]]]:
    """The shards' images as files (for the baseline, which reads JPEG files), read by the library's reader."""
    items = []
    out.mkdir(parents=True, exist_ok=True)
    for shard in resolve_shards(str(shard_dir), split):
        for raw in read_shard(shard.url, shard.name, 0, shard.samples, SampleLog("bench")):
            _, captions = parse_sample(raw["parts"], raw["key"])
            path = out / f"{raw['key']}.{image_part(raw['parts'])}"
            path.write_bytes(raw["parts"][image_part(raw["parts"])])
            items.append((path, captions))
    return items


def bench_processor(image_size: int = 224, num_query_tokens: int = 32):
    """A Blip2Processor at the real image size with the tiny tokenizer, and a matching config."""
    from transformers import Blip2Config, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from blip2_dist.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("opt")
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size}, do_convert_rgb=True)
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    config = Blip2Config(
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_config={"image_size": image_size},
    )
    return processor, config


def measure_reader(shards_dir: str, repeat: int = 3) -> dict:
    """The reader alone (no decode): CPU per image over every shard, and the cost of starting a range
    at the last sample of the largest shard (webdataset reads and discards what it skips)."""
    shards = resolve_shards(shards_dir, "train")
    biggest = max(shards, key=lambda s: s.samples)
    full, skip = [], []
    for _ in range(repeat):
        c0 = _own_cpu()
        n = sum(1 for s in shards for _ in read_shard(s.url, s.name, 0, s.samples, SampleLog("bench")))
        full.append((_own_cpu() - c0) / n * 1e6)
        t0 = time.perf_counter()
        got = list(read_shard(biggest.url, biggest.name, biggest.samples - 1, biggest.samples, SampleLog("bench")))
        skip.append((time.perf_counter() - t0) * 1e3)
        assert len(got) == 1 and n == sum(s.samples for s in shards)
    return {
        "images": sum(s.samples for s in shards),
        "skip_samples": biggest.samples - 1,
        "skip_mb": os.path.getsize(biggest.url) / 1e6,
        "cpu_us_per_image": float(np.median(full)),
        "skip_ms": float(np.median(skip)),
    }


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    workers: int
    images: int  # images decoded
    examples: int  # image-caption pairs delivered
    wall_s: float
    cpu_s: float  # user+sys, main process + its (joined) workers
    startup_s: float  # until the first batch
    steady_wall_s: float  # from the first batch to the end
    steady_cpu_s: float  # CPU spent from the first batch to the end (worker start-up excluded)
    steady_images: int
    steady_examples: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.wall_s

    def row(self) -> dict:
        procs = max(self.workers, 1)
        return dict(
            asdict(self),
            images_per_s=self.images_per_s,
            examples_per_s=self.examples_per_s,
            images_per_s_per_worker=self.images_per_s / procs,
            examples_per_s_per_worker=self.examples_per_s / procs,
            images_per_cpu_s=self.images / self.cpu_s,
            examples_per_cpu_s=self.examples / self.cpu_s,
            steady_images_per_cpu_s=self.steady_images / max(self.steady_cpu_s, 1e-9),
            steady_examples_per_cpu_s=self.steady_examples / max(self.steady_cpu_s, 1e-9),
            steady_images_per_s=self.steady_images / max(self.steady_wall_s, 1e-9),
            steady_examples_per_s=self.steady_examples / max(self.steady_wall_s, 1e-9),
        )


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _live_children_cpu() -> float:
    """CPU seconds of this process's running children (the DataLoader workers), from /proc."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
    return total


def _own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _measure(name: str, workers: int, batches, count) -> Result:
    t0, c0 = time.perf_counter(), _cpu_seconds()
    images = examples = 0
    first = None
    for batch in batches:
        n_img, n_ex = count(batch)
        if first is None:  # steady state starts after the first batch (workers are up by then)
            first = time.perf_counter()
            first_cpu = _own_cpu() + _live_children_cpu() + (_cpu_seconds() - _own_cpu())
            n_img0, n_ex0 = n_img, n_ex
        images, examples = images + n_img, examples + n_ex
    del batches  # workers are joined once the loader is exhausted, so their CPU time is counted
    end, cpu = time.perf_counter(), _cpu_seconds()
    return Result(
        name,
        workers,
        images,
        examples,
        end - t0,
        cpu - c0,
        (first or end) - t0,
        end - (first or end),
        cpu - first_cpu,
        images - n_img0,
        examples - n_ex0,
    )


def measure_stream(
    shards: str,
    processor,
    config,
    *,
    workers: int,
    micro_batch: int,
    caption_mode: str,
    max_batches: int | None,
    prompt: str = "",
    normalize: bool = True,
) -> Result:
    fmt = CaptionFormat.from_processor(processor, config, prompt=prompt)
    transform = ImageTransform.from_processor(processor)
    stream = TrainStream(
        shards,
        "train",
        fmt,
        transform,
        micro_batch=micro_batch,
        rank=0,
        world_size=1,
        num_workers=workers,
        caption_mode=caption_mode,
        normalize=normalize,
    )
    batches = stream.epoch(0)
    if max_batches:
        batches = _take(batches, max_batches)
    seen: set[str] = set()

    def count(batch: dict) -> tuple[int, int]:
        # An image whose captions straddle two batches is in both but decoded once: count it once.
        new = [i for i in batch["image_ids"] if i not in seen]
        seen.update(new)
        return len(new), batch["num_examples"]

    name = f"stream ({caption_mode}{'' if normalize else ', uint8'})"
    return _measure(name, workers, batches, count)


def _take(iterator, n):
    for i, item in enumerate(iterator):
        yield item
        if i + 1 >= n:
            iterator.close()
            return


class NotebookDataset(Dataset):
    """The seed notebook's loader: one item per (image, caption), the HF processor per item.

    `padding="max_length"` needs a length (the tokenizers' model_max_length is unset, ~1e30): the
    query tokens + 32 caption tokens, truncated, so the default collate can stack the items.
    """

    def __init__(self, items: list[tuple[Path, list[str]]], processor, text_tokens: int = 32):
        self.pairs = [(path, caption) for path, caps in items for caption in caps]
        self.processor = processor
        self.max_length = processor.num_query_tokens + text_tokens

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        path, caption = self.pairs[i]
        image = Image.open(path)
        encoding = self.processor(
            images=image,
            text=caption,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {k: v.squeeze(0) for k, v in encoding.items()}


def measure_baseline(items, processor, *, workers: int, batch_size: int, max_items: int) -> Result:
    dataset = NotebookDataset(items, processor)
    sub = torch.utils.data.Subset(dataset, np.random.default_rng(0).permutation(len(dataset))[:max_items].tolist())
    loader = DataLoader(sub, batch_size=batch_size, num_workers=workers, shuffle=False)
    return _measure(
        "baseline (notebook)", workers, iter(loader), lambda b: (b["pixel_values"].shape[0], b["pixel_values"].shape[0])
    )


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass
class LoaderBenchConfig:
    """`bench.py loader`: its flags are generated from these fields (blip2_dist.config.add_section_args)."""

    images: str = option(
        "", "packed shard folder (manifest.json) or a folder of JPEGs (+ optional captions.json)", required=True
    )
    synthesize: int = option(0, "first write N Flickr8k-sized (500x375, ~110 KB) synthetic JPEGs into --images", min=0)
    max_side: int = option(
        0, "re-encode images to this long side when packing a JPEG folder, as pack --max-side (0 = keep)", min=0
    )
    workers: int = option(2, "DataLoader workers for both loaders", min=0)
    micro_batch: int = option(16, "examples per batch for both loaders", min=1)
    image_size: int = option(224, "model image size (224 or 364 for real BLIP-2)", min=16)
    caption_mode: str = option("all", "stream caption handling", choices=["all", "random"])
    prompt: str = option("", "stream prompt, e.g. 'a photo of'")
    max_batches: int = option(0, "stop the stream after this many batches (0 = one epoch)", min=0)
    baseline_items: int = option(400, "examples the baseline loads", min=1)
    skip_baseline: bool = option(False, "measure the stream only")
    shards_out: str = option("", "when packing a JPEG folder, write the shards here (kept) instead of a temp folder")
    repeat: int = option(3, "runs per loader (alternating); the median is shown", min=1)
    uint8: bool = option(False, "stream hands out uint8 pixels (normalize=False: the trainer normalises on the GPU)")


def prepare_inputs(
    images: str, *, max_side: int | None, shards_out: str | None, need_files: bool, echo=print
) -> tuple[str, list[tuple[Path, list[str]]]]:
    """(shard folder for the stream, JPEG files + captions for the baseline)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    if (Path(images) / MANIFEST).is_file():
        if max_side:
            echo("--max-side ignored: the input is already packed")
        return images, extract_items(images, "train", tmp / "files") if need_files else []
    items = folder_items(images)
    shards = shards_out or str(tmp / "shards")
    pack_folder(items, Path(shards), max_side)
    return shards, items


def run(cfg: LoaderBenchConfig, echo=print) -> dict:
    torch.set_num_threads(1)
    if cfg.synthesize:
        info = synthesize(cfg.images, cfg.synthesize)
        echo(f"synthesized {info['images']} JPEGs into {cfg.images} (mean {info['mean_kb']:.0f} KB)")
    processor, config = bench_processor(cfg.image_size)
    shards, items = prepare_inputs(
        cfg.images,
        max_side=cfg.max_side or None,
        shards_out=cfg.shards_out or None,
        need_files=not cfg.skip_baseline,
        echo=echo,
    )
    shard_bytes = sum(p.stat().st_size for p in Path(shards).glob("*.tar"))
    split = read_manifest(shards)["splits"]["train"]
    echo(
        f"stream reads {shards}: {split['images']} images, {split['captions']} captions, "
        f"{shard_bytes / split['images'] / 1000:.0f} KB/image in the tars; image size {cfg.image_size}; "
        f"{cfg.workers} workers; micro-batch {cfg.micro_batch}; {cfg.repeat} runs each, median shown; "
        f"cpu count {os.cpu_count()}"
    )
    if items:
        sizes = [p.stat().st_size for p, _ in items]
        echo(
            f"baseline reads {len(items)} JPEG files from {items[0][0].parent} "
            f"({np.mean(sizes) / 1000:.0f} KB mean), {min(cfg.baseline_items, len(items) * 5)} items per run"
        )
    runs: dict[str, list[Result]] = {"stream": [], "baseline": []}
    for _ in range(cfg.repeat):  # alternate, so a burst of load on the shared machine hits both
        runs["stream"].append(
            measure_stream(
                shards,
                processor,
                config,
                workers=cfg.workers,
                micro_batch=cfg.micro_batch,
                caption_mode=cfg.caption_mode,
                max_batches=cfg.max_batches or None,
                prompt=cfg.prompt,
                normalize=not cfg.uint8,
            )
        )
        if not cfg.skip_baseline:
            runs["baseline"].append(
                measure_baseline(
                    items, processor, workers=cfg.workers, batch_size=cfg.micro_batch, max_items=cfg.baseline_items
                )
            )
    rows = [_median(r) for r in runs.values() if r]
    echo(_table(rows))
    report = {"rows": rows, "config": {**asdict(cfg), "shards": shards, "cpu_count": os.cpu_count()}}
    reader = report["reader"] = measure_reader(shards, cfg.repeat)
    echo(
        f"reader alone (no decode), median of {cfg.repeat}: {reader['cpu_us_per_image']:.0f} us CPU per image; "
        f"starting a range {reader['skip_samples']} samples ({reader['skip_mb']:.1f} MB) into a shard: "
        f"{reader['skip_ms']:.1f} ms (webdataset reads and discards what it skips)"
    )
    if len(rows) == 2:
        keys = (
            "steady_images_per_cpu_s",
            "steady_examples_per_cpu_s",
            "images_per_cpu_s",
            "examples_per_cpu_s",
            "images_per_s",
            "examples_per_s",
        )
        r = report["ratio"] = {k: rows[0][k] / rows[1][k] for k in keys}
        echo(
            f"stream / baseline per CPU-second, steady state: images x{r['steady_images_per_cpu_s']:.2f}, "
            f"examples x{r['steady_examples_per_cpu_s']:.2f}; with worker start-up: images "
            f"x{r['images_per_cpu_s']:.2f}, examples x{r['examples_per_cpu_s']:.2f}; wall: images "
            f"x{r['images_per_s']:.2f}, examples x{r['examples_per_s']:.2f}"
        )
    echo(
        f"H100 feed check (400 examples/s from 16 cores = 25/s per core): the stream gives "
        f"{rows[0]['steady_examples_per_cpu_s']:.0f} examples and {rows[0]['steady_images_per_cpu_s']:.0f} "
        f"images per CPU-second"
    )
    return report


def _median(results: list[Result]) -> dict:
    rows = sorted((r.row() for r in results), key=lambda row: row["steady_images_per_cpu_s"])
    row = dict(rows[len(rows) // 2])
    row["steady_images_per_cpu_s_all_runs"] = [round(x["steady_images_per_cpu_s"], 1) for x in rows]
    return row


def _table(rows: list[dict]) -> str:
    cols = [  # (header, key, format)
        ("loader", "name", "22s"),
        ("imgs", "images", "5d"),
        ("exs", "examples", "5d"),
        ("wall s", "wall_s", "6.2f"),
        ("start s", "startup_s", "7.2f"),
        ("img/s", "images_per_s", "6.1f"),
        ("ex/s", "examples_per_s", "7.1f"),
        ("img/s/wk", "images_per_s_per_worker", "8.1f"),
        ("ex/s/wk", "examples_per_s_per_worker", "8.1f"),
        ("img/cpu-s", "images_per_cpu_s", "9.1f"),
        ("ex/cpu-s", "examples_per_cpu_s", "8.1f"),
        ("steady img/cpu-s", "steady_images_per_cpu_s", "16.1f"),
        ("steady ex/cpu-s", "steady_examples_per_cpu_s", "15.1f"),
    ]
    lines = [
        " ".join(
            f"{h:{'<' if f.endswith('s') and k == 'name' else '>'}{f.rstrip('sdf').split('.')[0]}}" for h, k, f in cols
        )
    ]
    for r in rows:
        lines.append(" ".join(format(r[k], f) for _, k, f in cols))
    return "\n".join(lines)
