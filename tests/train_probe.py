"""The trainer as launch/train.py runs it, with observers: what the model looks like while it trains.

    python tests/train_probe.py PROBE.json --model DIR --data SHARDS ...   (any launch/train.py flags)

Builds `Trainer(parse_config(argv))` and calls `fit()` exactly as launch/train.py does; forward hooks
only record, into PROBE.json (rank 0):
  forwards        one entry per training forward (micro-batch): the modules of the BLIP-2 model not in
                  training mode at that moment, and how often a linear layer inside the language
                  model's first layer ran since the previous training forward (2 per micro-batch when
                  activation checkpointing recomputes the layer in the backward, 1 when it does not)
  evaluations     the number of training forwards before each evaluation
  engine          what the DeepSpeed engine made of the config: communication dtype, gradient
                  accumulation dtype, whether ZeRO-2 accumulates into its fp32 partition buffer
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from blip2_dist.config import parse_config
from blip2_dist.errors import run_main
from blip2_dist.lora import unwrap_blip2
from blip2_dist.train import Trainer


def first_lm_linear(blip2):
    """The first linear layer inside the language model's first checkpointed layer. transformers checkpoints
    a layer's `forward`, so hooks on the layer itself run once; those of a module inside it run again when
    the backward recomputes the layer."""
    layer = next(m for m in blip2.language_model.modules() if isinstance(m, GradientCheckpointingLayer))
    return next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))


def engine_facts(engine) -> dict:
    optimizer = engine.optimizer
    compact = getattr(optimizer, "_use_compact_grad_partition_buffer", None)
    return {
        "communication_data_type": str(engine.communication_data_type),
        "grad_accum_dtype": str(engine.get_data_types()[1]),
        "zero_fp32_partition_buffer": bool(compact(0)) if compact else None,
    }


def main(argv: list[str]) -> int:
    out, args = Path(argv[0]), argv[1:]
    trainer = Trainer(parse_config(args, description="probe"))
    blip2 = unwrap_blip2(trainer.model)
    record: dict = {"forwards": [], "evaluations": [], "engine": engine_facts(trainer.engine)}
    calls = {"layer": 0, "seen": 0}

    def count_layer(module, args):
        calls["layer"] += 1

    def on_train_forward(module, args):
        not_training = [name for name, m in blip2.named_modules() if not m.training]
        record["forwards"].append({"not_training": not_training, "layer_calls": calls["layer"] - calls["seen"]})
        calls["seen"] = calls["layer"]

    first_lm_linear(blip2).register_forward_pre_hook(count_layer)
    trainer.engine.module.register_forward_pre_hook(on_train_forward)  # CaptionLossModule: training only
    evaluate = trainer.evaluate

    def evaluate_and_note():
        record["evaluations"].append(len(record["forwards"]))
        calls["seen"] = calls["layer"]  # generation runs the layer too
        return evaluate()

    trainer.evaluate = evaluate_and_note
    code = trainer.fit()
    if trainer.is_main:
        out.write_text(json.dumps(record))
    trainer.close(code)  # as blip2_dist.train.train ends a run
    return code


if __name__ == "__main__":
    run_main(main)  # the entry points' exit path (hard_exit), so the process group cannot hold the exit
