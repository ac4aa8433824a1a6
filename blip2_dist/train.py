"""The trainer: LoRA-adapted BLIP-2 in a DeepSpeed engine, fed by the shard stream.

    train(cfg)   # cfg from blip2_dist.config.parse_config; launch/train.py is the CLI

Order of work: validate everything that can be checked without other ranks (so a bad argument
fails fast instead of hanging a process group) -> start the process group and the heartbeat
watchdog -> model + LoRA -> engine -> resume -> loop (train_step, log, evaluate, checkpoint, early
stop) -> final save + eval -> every rank reports its exit code, waits for the others, stops its watchdog.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blip2_dist import dist
from blip2_dist.adapters import caption_format_record, save_adapter
from blip2_dist.checkpoint import Checkpointer, TrainState
from blip2_dist.checks import EVAL_METRICS, TrainingPlan, check_training, improved, plan_steps, validate_eval_plan
from blip2_dist.config import Config
from blip2_dist.data.stream import TrainStream
from blip2_dist.data.transforms import CaptionFormat, ImageTransform
from blip2_dist.data.urls import RetryPolicy
from blip2_dist.deepspeed_config import fill_deepspeed_config, precision_of
from blip2_dist.engine import (
    DTYPES,
    build_engine,
    build_model,
    check_fp16_family,
    device_precisions,
    seed_step,
    to_device,
    train_step,
)
from blip2_dist.errors import EXIT_PREEMPTED, write_exit_report
from blip2_dist.io import write_json_atomic
from blip2_dist.lora import describe_trainable
from blip2_dist.models import family_from_name, family_of
from blip2_dist.run_record import ExampleLog, training_record
from blip2_dist.tensorboard import ThroughputMeter, build_writer, hparams_of, memory_gib, tensorboard_layout
from blip2_dist.watchdog import Watchdog


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption) ask for a save and a clean exit at the next step.

    A signal may reach only some ranks, so the decision is all-reduced: every rank saves together.
    """

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        return dist.all_reduce_max(1.0 if self.requested else 0.0) > 0


def validate(cfg: Config, world_size: int, rank: int = 0) -> TrainingPlan:
    """Checks that need no other rank (blip2_dist.checks: flags, data, DeepSpeed JSON, model, output,
    resume), with the precisions this device has: a FLAN-T5 that would train in fp16 is refused here."""
    validate_eval_plan(cfg)
    checked = check_training(cfg, world_size, rank, device_precisions())
    check_fp16_family(checked.precision, family_from_name(cfg.model.model), cfg)
    return checked


class Trainer:
    """Holds the run's objects; `fit()` is the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        info = dist.world_info_from_env()
        checked = validate(cfg, info.world_size, info.rank)  # before the process group: fail fast, once
        for note in checked.resume.notes:
            dist.print0(note)
        ds_raw, self.resume_from = checked.deepspeed, checked.resume.path
        self.info = dist.init_distributed(cfg.train.dist_timeout)  # binds this rank's GPU first
        # Right after the process group: a rank that dies from here on (even while the others
        # load the model or wait in DeepSpeed's first broadcast) ends every rank in bounded time.
        self.watchdog = Watchdog(
            self.info.rank, self.info.world_size, *dist.store_address(), timeout_s=cfg.train.heartbeat_timeout
        )
        self.watchdog.start()
        self.out = Path(cfg.train.output_dir)
        self.is_main = self.info.is_main
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.precision = precision_of(
            fill_deepspeed_config(ds_raw, cfg, self.info.world_size, None, *device_precisions())
        )
        model, self.processor = build_model(cfg, DTYPES[self.precision], dist.device_for(self.info))
        check_fp16_family(self.precision, family_of(model), cfg)
        dist.print0(describe_trainable(model))
        self.fmt = CaptionFormat.from_processor(
            self.processor, model.config, prompt=cfg.data.prompt, max_caption_tokens=cfg.data.max_caption_tokens
        )
        self.transform = ImageTransform.from_processor(self.processor, augment=cfg.data.augment)
        self.stream = TrainStream(
            cfg.data.data,
            cfg.data.train_split,
            self.fmt,
            self.transform,
            micro_batch=cfg.data.micro_batch,
            rank=self.info.rank,
            world_size=self.info.world_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.train.seed,
            caption_mode=cfg.data.caption_mode,
            shuffle_buffer=cfg.data.shuffle_buffer,
            pin_memory=torch.cuda.is_available(),
            retry=RetryPolicy(retries=cfg.data.data_retries),
        )
        self.plan = plan_steps(cfg, self.stream.steps_per_epoch)
        self.ds = fill_deepspeed_config(ds_raw, cfg, self.info.world_size, self.plan.total_steps, *device_precisions())
        self.engine = build_engine(model, cfg, dict(self.ds), self.plan.total_steps)
        # from_pretrained hands the model over in eval mode (dropout off, activation checkpointing idle) while
        # peft's new LoRA layers are in train mode: train everything from step 1, as after an evaluation.
        self.engine.train()
        self.model = self.engine.module.model
        # A subfolder, so `tensorboard --logdir OUT/tensorboard` names this run "training" beside others
        # (e.g. an evaluation of the untrained model in OUT/tensorboard/before-training).
        self.writer = build_writer(self.out / "tensorboard" / "training", self.is_main)
        self.checkpointer = Checkpointer(self.out, cfg.train.keep_last, self._export_adapter)
        self.state = TrainState()
        self.saved_step = -1  # the step of the checkpoint this run saved or resumed from
        self.stop = StopFlag()
        self.example_log = ExampleLog(self.out / "samples", self.info.rank, cfg.train.sample_log)
        self.last_eval: dict | None = None  # {"split", "step", "values"} of the latest evaluation
        self.log_window: list[float] = []  # step losses since the last TensorBoard point

    def _export_adapter(self, out_dir: Path) -> None:
        """Collective. Under ZeRO-3 parameters are partitioned: gather them (all of them, since a
        tiny base is saved beside its adapter) so rank 0 writes whole tensors."""
        import deepspeed

        gather = self.engine.zero_optimization_stage() == 3
        params = list(self.model.parameters()) if gather else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=gather):
            if self.is_main:
                save_adapter(
                    self.model, self.processor, out_dir, base_name=self.cfg.model.model, record=self._adapter_record()
                )

    def _adapter_record(self) -> dict:
        """Prompt, caption format, generation settings, run facts, and the metrics of this step if evaluated."""
        step = self.state.step
        evaluated = self.last_eval if self.last_eval and self.last_eval["step"] == step else None
        return {
            "step": step,
            "caption_format": caption_format_record(self.fmt),
            "generation": self.cfg.eval.generation(),
            "training": training_record(self.cfg, self.info.world_size, self.precision),
            "metrics": evaluated,
        }

    def _write_config(self) -> None:
        placement = dist.rank_placement()
        print(
            f"rank {self.info.rank}/{self.info.world_size} on {placement['host']}: {placement['cpus']} CPUs, "
            f"{placement['torch_threads']} torch threads",
            flush=True,
        )
        resolved = {
            **self.cfg.to_dict(),
            "deepspeed_resolved": self.ds,
            "world_size": self.info.world_size,
            "plan": vars(self.plan),
            "dropped_examples_per_epoch": self.stream.dropped_examples_per_epoch,
            "ranks": dist.all_gather_object(placement),
        }
        if self.is_main:
            write_json_atomic(self.out / "config.json", resolved)
        self.writer.text("config", "```\n" + _json(resolved) + "\n```")

    def resume(self) -> None:
        path = self.resume_from
        if path is not None:
            self.state = self.checkpointer.load(self.engine, path)
            self.saved_step = self.state.step
            dist.print0(
                f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                f"micro-batch {self.state.batch_in_epoch})"
            )
            self._rescale_position()
        self.state.micro_per_epoch = self.plan.micro_per_epoch
        self.state.world_size = self.info.world_size

    def _rescale_position(self) -> None:
        """Another world size, worker count or batch size gives another epoch length: continue at
        the same fraction of the epoch (the data order cannot be replayed exactly then)."""
        state, new = self.state, self.plan.micro_per_epoch
        old = state.micro_per_epoch
        if old and old != new:
            accum = self.cfg.optim.grad_accum
            state.batch_in_epoch = min(new, state.batch_in_epoch * new // old) // accum * accum
            dist.print0(
                f"warning: the launch shape changed since the checkpoint ({old} -> {new} micro-batches "
                f"per epoch): continuing at micro-batch {state.batch_in_epoch}, data order not replayed"
            )

    def fit(self) -> int:
        """Returns the process exit code: 0 done, EXIT_PREEMPTED saved after a signal."""
        self._write_config()
        self.resume()
        self._describe_run_to_tensorboard()
        cfg, plan, state = self.cfg, self.plan, self.state
        if self._run_pending_eval():
            return EXIT_PREEMPTED
        # In a log file (SLURM, CI) a bar update every 30 s instead of every step.
        bar = tqdm(
            total=plan.total_steps,
            initial=state.step,
            disable=not self.is_main,
            desc="train",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        )
        meter, window = ThroughputMeter(), []
        while state.step < plan.total_steps and not state.stopped_early:
            if state.batch_in_epoch >= plan.micro_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            batches = self.stream.epoch(state.epoch, start_batch=state.batch_in_epoch)
            t_wait, start = time.perf_counter(), state.batch_in_epoch
            for batch in batches:
                if state.batch_in_epoch >= plan.micro_per_epoch or state.step >= plan.total_steps:
                    break
                wait = time.perf_counter() - t_wait
                seed_step(
                    cfg.train.seed,
                    self.info.rank,
                    state.step * cfg.optim.grad_accum + state.batch_in_epoch % cfg.optim.grad_accum,
                )
                loss = train_step(self.engine, to_device(batch, self.engine.device), state, cfg)
                self.example_log.write(state, batch)
                state.batch_in_epoch += 1
                meter.add(batch["num_examples"], len(batch["image_ids"]), self._tokens(batch), wait)
                if loss is not None:
                    window.append(loss)
                if state.batch_in_epoch % cfg.optim.grad_accum == 0:  # DeepSpeed stepped the optimizer
                    self._after_step(window, meter, bar)
                    window = []
                    if self._maybe_stop_or_save():
                        bar.close()
                        return EXIT_PREEMPTED
                    if state.stopped_early:
                        break
                t_wait = time.perf_counter()
            if state.batch_in_epoch == start and state.step < plan.total_steps:
                raise RuntimeError(f"epoch {state.epoch} yielded no batch after micro-batch {start}: loader bug")
        bar.close()
        return self._finish()

    def close(self, code: int) -> None:
        """Every rank reports its exit code, then waits for the others: no rank leaves (and makes
        srun end the rest) before every report is written. Then the watchdog stands down, so this
        rank leaving is not taken for a loss by a slower one."""
        write_exit_report(code)
        dist.barrier()
        self.watchdog.stop()
        self.example_log.close()

    def _tokens(self, batch: dict) -> int:
        """Language-model tokens of a micro-batch: its input sequence, plus T5's decoder targets."""
        tokens = int(batch["attention_mask"].sum())
        if not self.model.config.use_decoder_only_language_model:
            tokens += int((batch["labels"] != -100).sum())
        return tokens

    def _after_step(self, window: list[float], meter: ThroughputMeter, bar) -> None:
        state, cfg = self.state, self.cfg
        state.step += 1
        local = sum(window) / len(window) if window else float("nan")
        loss = dist.all_reduce_mean(local)
        state.losses.append(loss)
        state.examples_seen += cfg.data.micro_batch * cfg.optim.grad_accum * self.info.world_size
        meter.step()
        # refresh=False: the bar redraws at its own interval (30 s in a log file), not at every step.
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._lr():.2e}", refresh=False)
        bar.update(1)
        self.log_window.append(loss)
        if state.step % cfg.train.log_steps == 0 or state.step == 1:
            self._log_scalars(meter)
            meter.reset()
        if cfg.train.eval_steps and state.step % cfg.train.eval_steps == 0 and state.step < self.plan.total_steps:
            self.evaluate()
            self._check_early_stop()

    def _lr(self) -> float:
        return self.engine.get_lr()[0]

    def _log_scalars(self, meter: ThroughputMeter) -> None:
        """Train/loss: the mean step loss over the window since the last point (as throughput is)."""
        step = self.state.step
        finite = [v for v in self.log_window if math.isfinite(v)]
        self.log_window = []
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "Train/loss": sum(finite) / len(finite) if finite else float("nan"),
            "Train/lr": self._lr(),
            "progress/epoch": self.state.epoch,
            "progress/captions_seen": self.state.examples_seen,
        }
        if grad_norm is not None:
            values["optim/grad_norm"] = float(grad_norm)
        values.update({f"perf/{k}": v for k, v in meter.summary(self.info.world_size).items()})
        values.update(memory_gib(self.engine.device))
        self.writer.scalars(values, step)
        self.writer.flush()

    def _describe_run_to_tensorboard(self) -> None:
        """HParams (the settings, ranked by the best metrics) and the custom-scalars layout."""
        metrics = [f"best/{m}" for m in EVAL_METRICS] + ["best/step", "Train/loss"]
        self.writer.hparams_start(
            hparams_of(self.cfg, self.info.world_size, self.plan.total_steps, self.precision), metrics
        )
        self.writer.layout(tensorboard_layout(self.cfg.data.eval_split, self.cfg.eval.best_metric))

    def _maybe_stop_or_save(self) -> bool:
        state = self.state
        if self.stop.agreed():
            self._save_and_stop()
            return True
        if (
            state.step % self.cfg.train.save_steps == 0
            and state.step < self.plan.total_steps
            and not state.stopped_early
        ):  # an early stop saves in _finish
            self.checkpointer.save(self.engine, state)
        return False

    def _save_and_stop(self) -> None:
        dist.print0(f"signal received: saving at step {self.state.step} and exiting with {EXIT_PREEMPTED}")
        self.checkpointer.save(self.engine, self.state)
        self.writer.close()

    def _run_pending_eval(self) -> bool:
        """A stop signal interrupted the evaluation of the step we resumed at: run it now, so the
        eval results and best/ are those of an uninterrupted run. True if a signal came again."""
        state = self.state
        if not state.eval_pending:
            return False
        state.eval_pending = False
        if state.step >= self.plan.total_steps:
            return False  # the final evaluation runs in _finish anyway
        self.evaluate()
        if state.eval_pending:
            self._save_and_stop()
            return True
        self._check_early_stop()  # the evaluation may have been the one that ends the run
        return False

    def evaluate(self) -> dict | None:
        """Collective. A stop signal during it interrupts it (within one generation batch): it is
        then marked pending in the TrainState and runs first when the run resumes."""
        if self.cfg.train.skip_eval:
            return None
        from blip2_dist.evaluate import EvaluationInterrupted, evaluate_in_training

        try:
            metrics = evaluate_in_training(
                self.model,
                self.processor,
                self.cfg,
                self.out,
                self.state.step,
                self.writer,
                lockstep=self.engine.zero_optimization_stage() == 3,
                should_stop=lambda: self.stop.requested,
            )
        except EvaluationInterrupted:
            self.state.eval_pending = True
            dist.print0(
                f"evaluation at step {self.state.step} interrupted by a stop signal: it runs when the run resumes"
            )
            return None
        state, key = self.state, self.cfg.eval.best_metric
        self.last_eval = {"split": self.cfg.data.eval_split, "step": state.step, "values": metrics}
        if metrics and key not in metrics:
            dist.print0(
                f"warning: --best-metric {key} was not computed in this evaluation (see results.json "
                "'scoring'): no best adapter from it"
            )
        if metrics and key in metrics and improved(key, metrics[key], state.best_metric):
            state.best_metric, state.best_step, state.evals_since_best = metrics[key], state.step, 0
            self.writer.scalars({**metrics, "step": state.step}, state.step, prefix="best/")
            self.checkpointer.save_best(state.step, metrics)
        else:
            state.evals_since_best += 1
        return metrics

    def _check_early_stop(self) -> None:
        """After an evaluation: stop once --early-stop-patience evaluations in a row brought no better
        --best-metric. Every rank holds the same broadcast metrics, so they agree; the all-reduce makes
        sure they stop at the same step regardless."""
        patience, state = self.cfg.train.early_stop_patience, self.state
        if not patience or self.cfg.train.skip_eval:
            return
        if dist.all_reduce_max(1.0 if state.evals_since_best >= patience else 0.0) > 0:
            state.stopped_early = True
            dist.print0(
                f"early stop at step {state.step}: no better {self.cfg.eval.best_metric} in {patience} "
                f"evaluations (best {state.best_metric} at step {state.best_step}); best adapter in "
                f"{self.out / 'best'}"
            )

    def _finish(self) -> int:
        state = self.state
        # Save first: a failed final evaluation (scoring, a full disk) must not cost the trained weights.
        if self.saved_step != state.step:
            self.checkpointer.save(self.engine, state)
            self.saved_step = state.step
        if not state.stopped_early:  # an early stop has just evaluated this step
            self.evaluate()
        if state.eval_pending:  # a stop signal interrupted it: the resumed run evaluates again
            dist.print0(f"signal received during the final evaluation: exiting with {EXIT_PREEMPTED}")
            self.writer.close()
            return EXIT_PREEMPTED
        if self.is_main:
            write_json_atomic(
                self.out / "final_state.json",
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss_history": state.losses,
                    "examples_seen": state.examples_seen,
                    "best_metric": state.best_metric,
                    "best_step": state.best_step,
                    "stopped_early": state.stopped_early,
                },
            )
        self.writer.hparams_end()
        self.writer.close()
        dist.print0(f"done: {state.step} steps, final loss {state.losses[-1]:.4f}, run in {self.out}")
        return 0


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def train(cfg: Config) -> int:
    """Run the training; returns the exit code (0 done, EXIT_PREEMPTED saved after a signal)."""
    trainer = Trainer(cfg)
    code = trainer.fit()
    trainer.close(code)
    return code
