"""Checkpoints: the one module that reads and writes them, and owns their rank logic.

Layout of `OUTPUT_DIR/checkpoints/`:
    step_00000100/        DeepSpeed checkpoint (trainable params only, optimizer, scheduler,
                          TrainState in client_state) + adapter/ (peft adapter, processor, extras)
                          + COMPLETE (written last, after every rank finished writing)
    latest                text file naming the newest COMPLETE checkpoint, replaced atomically
and `OUTPUT_DIR/best/` (adapter of the best evaluation so far + metrics.json).

A crash at any point of a save leaves `latest` naming the previous complete checkpoint; resume
also ignores any folder without COMPLETE. Old checkpoints beyond `keep_last` are deleted only
after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blip2_dist import dist
from blip2_dist.data.shards import write_json_atomic, write_text_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"


@dataclass
class TrainState:
    """Everything beyond the engine's tensors that an exact resume needs."""

    step: int = 0               # optimizer steps done
    epoch: int = 0              # current epoch
    batch_in_epoch: int = 0     # micro-batches of `epoch` consumed (the loader's position)
    micro_per_epoch: int = 0    # the epoch length that position refers to (detects a changed launch shape)
    world_size: int = 0         # ranks that wrote the checkpoint (ZeRO partitions optimizer state by it)
    examples_seen: int = 0      # captions, all ranks
    nonfinite_skipped: int = 0
    losses: list[float] = field(default_factory=list)   # mean loss of every optimizer step
    best_metric: float | None = None
    best_step: int | None = None
    eval_pending: bool = False  # a stop signal interrupted the evaluation at `step`: run it on resume
    evals_since_best: int = 0   # evaluations in a row without a better --best-metric (early stopping)
    stopped_early: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict) -> "TrainState":
        return cls(**d)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def find_resume_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """'auto': the checkpoint `latest` names (else the newest complete one), or None for a fresh
    run. A path: that checkpoint, which must be complete."""
    if not resume:
        return None
    root = Path(output_dir) / "checkpoints"
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} file)")
        return path
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if (named / COMPLETE).is_file():
            return named
    found = complete_checkpoints(root)
    return found[-1] if found else None


class Checkpointer:
    """Saves and restores a DeepSpeed engine plus TrainState; exports the adapter on rank 0."""

    def __init__(self, output_dir: str | Path, keep_last: int, export_adapter):
        self.root = Path(output_dir) / "checkpoints"
        self.best_dir = Path(output_dir) / "best"
        self.keep_last = max(1, keep_last)
        self.export_adapter = export_adapter  # callable(out_dir), collective: every rank calls it, rank 0 writes
        self.is_main = dist.get_rank() == 0

    def save(self, engine, state: TrainState) -> Path:
        tag = tag_for(state.step)
        path = self.root / tag
        if self.is_main and path.exists():
            shutil.rmtree(path)  # a partial save of this same step from a crashed run
        dist.barrier()
        engine.save_checkpoint(
            str(self.root), tag=tag, client_state={"train_state": state.state_dict()},
            save_latest=False, exclude_frozen_parameters=True,
        )
        self.export_adapter(path / "adapter")
        if self.is_main:
            write_json_atomic(path / "train_state.json", state.state_dict())
        dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        if self.is_main:
            write_text_atomic(path / COMPLETE, tag + "\n")
            write_text_atomic(self.root / LATEST, tag + "\n")
            self._prune()
        dist.barrier()
        return path

    def load(self, engine, path: Path) -> TrainState:
        """Weights, optimizer, LR schedule and TrainState. ZeRO cannot repartition optimizer state
        for another world size: then the Adam moments restart from zero (with a warning)."""
        saved = json.loads((path / "train_state.json").read_text()).get("world_size", 0)
        same_world = saved in (0, dist.get_world_size())
        if not same_world:
            dist.print0(f"warning: {path} was written by {saved} ranks, this run has {dist.get_world_size()}: "
                        "weights, LR schedule and position restored, optimizer moments restart")
        load_path, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_module_strict=False,
            load_optimizer_states=same_world, load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        return TrainState.from_state_dict(client["train_state"])

    def save_best(self, step: int, metrics: dict) -> None:
        """Export the current adapter as best/, atomically (tmp folder + rename). Every rank calls it."""
        tmp = self.best_dir.with_name("best.tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.export_adapter(tmp)
        if not self.is_main:
            return
        write_json_atomic(tmp / "metrics.json", {"step": step, **metrics})
        old = self.best_dir.with_name("best.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.best_dir.exists():
            os.replace(self.best_dir, old)
        os.replace(tmp, self.best_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        # Incomplete folders older than the newest complete one are leftovers of crashed saves.
        newest = done[-1].name if done else ""
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and not (p / COMPLETE).exists() and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)
