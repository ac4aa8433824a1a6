"""blip2-dist: LoRA fine-tuning of BLIP-2 for captioning on DeepSpeed ZeRO-2 with WebDataset shards.

The public API, importable from here. Names load their module on first use, so `import blip2_dist`
stays instant and pulls in no torch, DeepSpeed or Java (the packer and the config need none of them).

    from blip2_dist import load_model, apply_lora, generate_captions, score_captions
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it (the README's code map lists the same)
_API = {
    # configuration: typed sections, defaults <- file <- command line
    "Config": "config",
    "parse_config": "config",
    # models, LoRA, captioning (no rank in any of them)
    "load_model": "models",
    "apply_lora": "lora",
    "caption_loss": "captioning",
    "generate_captions": "captioning",
    # training and evaluation (rank-aware); training itself is `blip2_dist.train.train(cfg)`: a name
    # "train" here would shadow the submodule of the same name
    "evaluate_model": "evaluate",
    "score_captions": "metrics",
    "score_captions_detailed": "metrics",
    # adapters and merged exports
    "save_adapter": "adapters",
    "load_for_inference": "adapters",
    "export_merged": "export",
    # data: shards, packers, streams
    "ShardWriter": "data.shards",
    "read_manifest": "data.shards",
    "pack_flickr8k": "data.pack",
    "TrainStream": "data.stream",
    "EvalStream": "data.eval_stream",
    "CaptionFormat": "data.transforms",
    "ImageTransform": "data.transforms",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'blip2_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"blip2_dist.{_API[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
