"""Checkpoints: the one module that reads and writes them, and owns their rank logic.

Layout of `OUTPUT_DIR/checkpoints/`:
    step_00000100/        DeepSpeed checkpoint (trainable params only, optimizer, scheduler,
                          TrainState in client_state) + adapter/ (peft adapter, processor, extras)
                          + COMPLETE (written last, after every rank finished writing: the tag
                          and every file of the checkpoint with its size, in JSON)
    latest                text file naming the newest COMPLETE checkpoint, replaced atomically
and `OUTPUT_DIR/best/` (adapter of the best evaluation so far + metrics.json).

A crash at any point of a save leaves `latest` naming the previous complete checkpoint. A
checkpoint is usable when it has COMPLETE and every file COMPLETE lists is there with its size
(a deleted or truncated file makes it unusable). `--resume auto` takes `latest` if usable, else the
newest usable one, and says which, or that it starts fresh and why; every unusable checkpoint it
passes over is named. Unusable checkpoints are never deleted: a save that finds its folder taken
moves the old folder aside (`step_N.aside-K`). After a save, complete checkpoints older than it
beyond `keep_last` are deleted; newer ones (a run resumed from an earlier step) are left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blip2_dist import dist
from blip2_dist.errors import UserError
from blip2_dist.io import write_json_atomic, write_text_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"step_\d{8}")


@dataclass
class TrainState:
    """Everything beyond the engine's tensors that an exact resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches of `epoch` consumed (the loader's position)
    micro_per_epoch: int = 0  # the epoch length that position refers to (detects a changed launch shape)
    world_size: int = 0  # ranks that wrote the checkpoint (ZeRO partitions optimizer state by it)
    examples_seen: int = 0  # captions, all ranks
    nonfinite_skipped: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of every optimizer step
    best_metric: float | None = None
    best_step: int | None = None
    eval_pending: bool = False  # a stop signal interrupted the evaluation at `step`: run it on resume
    evals_since_best: int = 0  # evaluations in a row without a better --best-metric (early stopping)
    stopped_early: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict) -> TrainState:
        return cls(**d)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_folders(root: Path) -> list[Path]:
    """Every `step_NNNNNNNN` folder under `root`, oldest first (usable or not)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _TAG.fullmatch(p.name) and p.is_dir())


def complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in checkpoint_folders(root) if (p / COMPLETE).is_file()]


def file_sizes(path: Path) -> dict[str, int]:
    """Every file under a checkpoint folder (relative path -> bytes), COMPLETE itself excluded."""
    return {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != COMPLETE
    }


def unusable_reason(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded, or None when it can."""
    if not path.is_dir():
        return "does not exist"
    marker = path / COMPLETE
    if not marker.is_file():
        return f"has no {COMPLETE} marker (its save did not finish)"
    try:
        listed = json.loads(marker.read_text()).get("files", {})
    except (ValueError, AttributeError):  # written before COMPLETE listed the files: the marker only
        listed = {}
    for name, size in listed.items():
        f = path / name
        if not f.is_file():
            return f"lacks {name} (deleted?)"
        if f.stat().st_size != size:
            return f"has {name} at {f.stat().st_size} bytes, {size} when saved (truncated or changed)"
    try:
        json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"has no readable train_state.json ({e.__class__.__name__})"
    return None


@dataclass
class ResumePlan:
    """What `--resume` resolved to: the checkpoint to load (None: start fresh), and what to tell
    the user about it (every line is printed by rank 0 before the process group starts)."""

    path: Path | None
    notes: list[str] = field(default_factory=list)


def plan_resume(output_dir: str | Path, resume: str) -> ResumePlan:
    """'' -> fresh. 'auto' -> `latest` if usable, else the newest usable checkpoint, else fresh;
    every unusable checkpoint passed over is named. A step number or a path -> that checkpoint,
    which must be usable (UserError otherwise). Reads files only: call it before the process group."""
    if not resume:
        return ResumePlan(None)
    out = Path(output_dir)
    root = out / "checkpoints"
    if resume != "auto":
        path = root / tag_for(int(resume)) if resume.isdigit() else Path(resume)
        reason = unusable_reason(path)
        if reason is not None:
            hint = "" if path.parent.is_dir() else f" ({path.parent} does not exist either)"
            raise UserError(f"--resume {resume}: checkpoint {path} {reason}{hint}")
        return ResumePlan(path, [f"--resume {resume}: resuming from {path}"])
    if not root.is_dir():
        why = f"{out} does not exist" if not out.exists() else f"{out} has no checkpoints folder"
        return ResumePlan(
            None, [f"--resume auto: starting fresh: {why} (check --output-dir if you meant to continue a run)"]
        )
    notes: list[str] = []
    candidates = checkpoint_folders(root)[::-1]  # newest first
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if unusable_reason(named) is None:
            candidates = [named] + [c for c in candidates if c != named]
        elif named not in candidates:
            notes.append(f"warning: {latest} names {named.name}, which does not exist")
    for path in candidates:
        reason = unusable_reason(path)
        if reason is None:
            return ResumePlan(path, notes + _newer_than(path, candidates) + [f"--resume auto: resuming from {path}"])
        notes.append(f"warning: checkpoint {path} {reason}: skipped, left in place")
    return ResumePlan(None, notes + [f"--resume auto: starting fresh: no usable checkpoint in {root}"])


def _newer_than(chosen: Path, candidates: list[Path]) -> list[str]:
    """Notes on the checkpoint folders newer than the one `latest` chose (they were not looked at)."""
    notes = []
    for path in sorted(c for c in candidates if c.name > chosen.name):
        reason = unusable_reason(path)
        notes.append(
            f"warning: checkpoint {path} {reason}: skipped, left in place"
            if reason
            else f"note: checkpoint {path} is newer than the one {LATEST} names, not used (from before a resume "
            f"at an earlier step, or a crash before {LATEST} was updated)"
        )
    return notes


def find_resume_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint `--resume` names, or None for a fresh run (see plan_resume)."""
    return plan_resume(output_dir, resume).path


class Checkpointer:
    """Saves and restores a DeepSpeed engine plus TrainState; exports the adapter on rank 0."""

    def __init__(self, output_dir: str | Path, keep_last: int, export_adapter):
        self.root = Path(output_dir) / "checkpoints"
        self.best_dir = Path(output_dir) / "best"
        self.keep_last = max(1, keep_last)
        self.export_adapter = export_adapter  # callable(out_dir), collective: every rank calls it, rank 0 writes
        self.is_main = dist.get_rank() == 0
        self._loaded: tuple[Path, int] | None = None  # (checkpoint, step) this run resumed from

    def save(self, engine, state: TrainState) -> Path:
        tag = tag_for(state.step)
        path = self.root / tag
        if self._loaded == (path.absolute(), state.step):
            return path  # resumed from this very checkpoint and not a step further: it holds this state
        if self.is_main and path.exists():
            # An unusable save of this step from a crashed run, or a checkpoint of a run resumed
            # from an earlier step: never deleted, moved aside.
            aside = _free_name(path)
            os.replace(path, aside)
            print(f"warning: checkpoint folder {path} already existed: moved to {aside} (not deleted)", flush=True)
        dist.barrier()
        engine.save_checkpoint(
            str(self.root),
            tag=tag,
            client_state={"train_state": state.state_dict()},
            save_latest=False,
            exclude_frozen_parameters=True,
        )
        self.export_adapter(path / "adapter")
        if self.is_main:
            write_json_atomic(path / "train_state.json", state.state_dict())
        dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        if self.is_main:
            write_json_atomic(path / COMPLETE, {"tag": tag, "files": file_sizes(path)})
            write_text_atomic(self.root / LATEST, tag + "\n")
            self._prune(path)
        dist.barrier()
        return path

    def load(self, engine, path: Path) -> TrainState:
        """Weights, optimizer, LR schedule and TrainState. ZeRO cannot repartition optimizer state
        for another world size: then the Adam moments restart from zero (with a warning)."""
        reason = unusable_reason(path)  # checked before the process group; files may have changed since
        if reason is not None:
            raise UserError(f"checkpoint {path} {reason}")
        saved = json.loads((path / "train_state.json").read_text()).get("world_size", 0)
        same_world = saved in (0, dist.get_world_size())
        if not same_world:
            dist.print0(
                f"warning: {path} was written by {saved} ranks, this run has {dist.get_world_size()}: "
                "weights, LR schedule and position restored, optimizer moments restart"
            )
        try:
            load_path, client = engine.load_checkpoint(
                str(path.parent),
                tag=path.name,
                load_module_strict=False,
                load_optimizer_states=same_world,
                load_lr_scheduler_states=True,
            )
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises bare AssertionErrors, torch zip errors...
            detail = " ".join(str(e).split())[:300] or "no message"
            raise UserError(
                f"checkpoint {path} cannot be loaded ({type(e).__name__}: {detail}); a file in it "
                "is damaged: resume from another one with --resume STEP"
            ) from e
        if load_path is None:
            raise UserError(f"DeepSpeed found no checkpoint to load in {path}")
        state = TrainState.from_state_dict(client["train_state"])
        self._loaded = (path.absolute(), state.step)
        return state

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

    def _prune(self, saved: Path) -> None:
        """Keep the `keep_last` newest complete checkpoints up to the one just saved. Newer ones
        (from before a resume at an earlier step) and unusable ones are never deleted."""
        done = [p for p in complete_checkpoints(self.root) if p.name <= saved.name]
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _free_name(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.aside-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.aside-{n}")
