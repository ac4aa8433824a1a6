"""TensorBoard on rank 0 (a writer that does nothing elsewhere), throughput meter, peak memory.

Which rank writes is decided once, when the writer is built: the train loop calls `log.scalar(...)`
on every rank and never asks for its rank.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


class NullWriter:
    """What every rank but 0 gets: same methods, no side effects."""

    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None: ...
    def text(self, tag: str, text: str, step: int = 0) -> None: ...
    def image(self, tag: str, image_chw, step: int) -> None: ...
    def hparams(self, hparams: dict, metrics: dict) -> None: ...
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

    def hparams(self, hparams: dict, metrics: dict) -> None:
        # add_hparams only takes scalars/strings; lists and None become strings.
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in hparams.items()}
        self._w.add_hparams(flat, metrics, run_name=".")

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def build_writer(log_dir: str | Path, is_main: bool) -> NullWriter:
    return TensorBoardWriter(log_dir) if is_main else NullWriter()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


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
            "samples_per_s": self.examples * world_size / elapsed,
            "images_per_s": self.images * world_size / elapsed,
            "tokens_per_s": self.tokens * world_size / elapsed,
            "sec_per_step": elapsed / max(self.steps, 1),
            "data_wait_frac": self.data_wait / elapsed,
        }
