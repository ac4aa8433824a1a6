"""TensorBoard on rank 0 (a writer that does nothing elsewhere), throughput meter, peak memory.

Which rank writes is decided once, when the writer is built: the train loop calls `log.scalar(...)`
on every rank and never asks for its rank.

Tag names decide what a user sees first. TensorBoard's default (Time Series) page groups tags by the
part before the first "/", sorts the groups case-sensitively (uppercase first) and opens only the
first two. So the curves to watch have capitalised groups, the rest lowercase (collapsed):
    Train/loss Train/lr                  training loss (mean over the log window) and learning rate
    Val/loss Val/CIDEr ... (the split)   validation loss beside the caption metrics (blip2_dist.evaluate)
    best/CIDEr ...                       the metrics of the best evaluation so far (what HParams ranks by)
    optim/grad_norm  progress/epoch  perf/captions_per_s ...  memory/device_peak_allocated_gib ...
    gallery/Val/<image id>               caption cards (images), gallery/Val (a table, in the Text tab)
A custom-scalars layout puts train and validation loss in one chart (the Custom Scalars tab).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from blip2_dist.config import Config


class NullWriter:
    """What every rank but 0 gets: same methods, no side effects."""

    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None: ...
    def text(self, tag: str, text: str, step: int = 0) -> None: ...
    def image(self, tag: str, image_chw, step: int) -> None: ...
    def hparams_start(self, hparams: dict, metric_tags: list[str]) -> None: ...
    def hparams_end(self) -> None: ...
    def layout(self, layout: dict) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoardWriter(NullWriter):
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._w.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(prefix + k, v, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self._w.add_text(tag, text, step)

    def image(self, tag: str, image_chw, step: int) -> None:
        self._w.add_image(tag, image_chw, step, dataformats="CHW")

    def hparams_start(self, hparams: dict, metric_tags: list[str]) -> None:
        """The run's settings for the HParams tab, ranked by `metric_tags`: ordinary scalar tags whose
        latest value HParams shows (best/* are logged at each new best). Written when the run starts, so
        an unfinished or preempted run is listed too; hparams_end marks it finished."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        # HParams takes numbers, strings and booleans; lists and None become strings.
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in hparams.items()}
        experiment, session_start, _ = hparams_summaries(flat, {tag: 0.0 for tag in metric_tags})
        for summary in (experiment, session_start):
            self._w._get_file_writer().add_summary(summary)

    def hparams_end(self) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self._w._get_file_writer().add_summary(hparams_summaries({}, {})[2])  # session end: success

    def layout(self, layout: dict) -> None:
        """A custom-scalars layout: {category: {chart: ["Multiline", [tag regexes]]}}."""
        self._w.add_custom_scalars(layout)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def split_group(split: str) -> str:
    """TensorBoard group of an evaluation split's scalars: "val" -> "Val" (see the module docstring)."""
    return split[:1].upper() + split[1:]


def hparams_of(cfg: Config, world_size: int, total_steps: int, precision: str) -> dict:
    """The settings that tell runs apart, for TensorBoard's HParams tab."""
    m, o = cfg.model, cfg.optim
    return {
        "model": m.model,
        "lr": o.lr,
        "lora_r": m.lora_r,
        "lora_alpha": m.lora_alpha,
        "lora_dropout": m.lora_dropout,
        "lora_targets": ",".join(m.lora_targets or ["default"]),
        "qformer_lora_targets": ",".join(m.qformer_lora_targets or []),
        "vision_lora_targets": ",".join(m.vision_lora_targets or []),
        "train_qformer": m.train_qformer,
        "train_query_tokens": m.train_query_tokens,
        "micro_batch": cfg.data.micro_batch,
        "grad_accum": o.grad_accum,
        "world_size": world_size,
        "global_batch": cfg.data.micro_batch * o.grad_accum * world_size,
        "steps": total_steps,
        "warmup_steps": o.warmup_steps,
        "weight_decay": o.weight_decay,
        "prompt": cfg.data.prompt,
        "caption_mode": cfg.data.caption_mode,
        "num_beams": cfg.eval.num_beams,
        "seed": cfg.train.seed,
        "precision": precision,
        "deepspeed": cfg.train.deepspeed,
    }


def tensorboard_layout(eval_split: str, best_metric: str) -> dict:
    """Custom Scalars tab: train and validation loss in one chart, then the rest."""
    group = split_group(eval_split)
    return {
        "Training": {
            "loss: train (window mean) and validation": ["Multiline", ["^Train/loss$", f"^{group}/loss$"]],
            "learning rate": ["Multiline", ["^Train/lr$"]],
            f"{best_metric} on {eval_split}": ["Multiline", [f"^{group}/{best_metric}$"]],
        },
        "Speed and memory": {
            "captions/s": ["Multiline", ["^perf/captions_per_s$"]],
            "peak memory (GiB)": ["Multiline", ["^memory/"]],
        },
    }


def build_writer(log_dir: str | Path, is_main: bool) -> NullWriter:
    return TensorBoardWriter(log_dir) if is_main else NullWriter()


def memory_gib(device: torch.device) -> dict[str, float]:
    """Peak memory of this process, in GiB, device and host apart: memory/device_peak_allocated_gib and
    memory/device_peak_reserved_gib (CUDA's caching allocator) on a GPU; memory/host_peak_rss_gib always
    (the process's peak resident set, which on CPU training holds the model too)."""
    out = {}
    if device.type == "cuda":
        out["memory/device_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["memory/device_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["memory/host_peak_rss_gib"] = kib / 2**20 if sys.platform != "darwin" else kib / 2**30
    return out


class ThroughputMeter:
    """Accumulates examples, tokens, compute time and data-wait time between two log points."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.examples = self.images = self.tokens = self.steps = 0
        self.data_wait = 0.0

    def add(self, examples: int, images: int, tokens: int, data_wait: float) -> None:
        self.examples += examples
        self.images += images
        self.tokens += tokens
        self.data_wait += data_wait

    def step(self) -> None:
        self.steps += 1

    def summary(self, world_size: int) -> dict[str, float]:
        """Per-rank counts scaled by world size: ranks see equal-size batches by construction."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "captions_per_s": self.examples * world_size / elapsed,
            "images_per_s": self.images * world_size / elapsed,
            "tokens_per_s": self.tokens * world_size / elapsed,
            "sec_per_step": elapsed / max(self.steps, 1),
            "data_wait_frac": self.data_wait / elapsed,
        }
