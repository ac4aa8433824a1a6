"""What a training run records about itself: the command as typed, the facts an adapter's model card
quotes, and (--sample-log) every example each rank trained on."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from blip2_dist.checkpoint import TrainState
from blip2_dist.config import Config


def command_line() -> str:
    """This process's command as the user typed it, minus the --local_rank the launcher appends."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            args.append(arg)
    script = os.path.relpath(sys.argv[0]) if os.path.abspath(sys.argv[0]).startswith(os.getcwd()) else sys.argv[0]
    return shlex.join([script, *args])


def training_record(cfg: Config, world_size: int, precision: str) -> dict:
    """What an adapter records about the run that made it (for its model card)."""
    micro, accum = cfg.data.micro_batch, cfg.optim.grad_accum
    return {
        "data": cfg.data.data,
        "train_split": cfg.data.train_split,
        "eval_split": cfg.data.eval_split,
        "micro_batch": micro,
        "grad_accum": accum,
        "world_size": world_size,
        "global_batch": micro * accum * world_size,
        "lr": cfg.optim.lr,
        "precision": precision,
        "deepspeed": cfg.train.deepspeed,
        "command": command_line(),
    }


class ExampleLog:
    """`--sample-log`: one JSON line per micro-batch with [image id, caption] of each example it
    trained on, per rank, appended (a resumed run repeats the lines of the micro-batches it
    replays after the checkpoint). For auditing what a run saw; off by default."""

    def __init__(self, folder: Path, rank: int, enabled: bool):
        self.file = None
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / f"rank-{rank}.jsonl", "a", encoding="utf-8")

    def write(self, state: TrainState, batch: dict) -> None:
        if self.file is None:
            return
        ids = batch["image_ids"]
        examples = [[ids[row], caption] for row, caption in zip(batch["image_index"].tolist(), batch["captions"])]
        line = {"step": state.step + 1, "epoch": state.epoch, "micro_batch": state.batch_in_epoch, "examples": examples}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
