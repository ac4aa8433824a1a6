"""Shared test set-up (CPU only, one thread per process, no hub access) and the fixtures tests share.

Fixtures here: `hub_opt_dir` / `hub_t5_dir` (tiny checkpoints saved like the hub's, hub_checkpoints.py),
`tiny` (both tiny families built in memory), `fmt_tf` (their caption format and image transform).
Helpers beside it: shard_factory.py (shards of exact sizes), fake_flickr8k.py / fake_coco.py (download
trees), engine_wrapper.py (an engine-shaped wrapper for code that expects DeepSpeed's), launch_helpers.py
(running launchers on 2 CPU ranks), http_server.py (a faulty HTTP server), slurm_cluster.py (real Slurm).
"""

import os
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions,
# keyed by the sources' paths): checkouts sharing one machine would rebuild it (~40-90 s) whenever another
# venv built it last. One cache per venv (inherited by the launched ranks) builds it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


@pytest.fixture(scope="session")
def hub_opt_dir(tmp_path_factory):
    """A tiny checkpoint shaped like Salesforce/blip2-opt-2.7b (tests/hub_checkpoints.py), read-only."""
    from hub_checkpoints import save_hub_checkpoint

    return save_hub_checkpoint("opt", tmp_path_factory.mktemp("hub") / "blip2-opt")


@pytest.fixture(scope="session")
def hub_t5_dir(tmp_path_factory):
    """A tiny checkpoint shaped like Salesforce/blip2-flan-t5-xl (tests/hub_checkpoints.py), read-only."""
    from hub_checkpoints import save_hub_checkpoint

    return save_hub_checkpoint("t5", tmp_path_factory.mktemp("hub") / "blip2-flan-t5")


@pytest.fixture(scope="module")
def tiny():
    """Both tiny BLIP-2 families, built in memory: {"opt": (model, processor), "t5": (...)}."""
    from blip2_dist.models import build_tiny

    return {family: build_tiny(family) for family in ("opt", "t5")}


@pytest.fixture(scope="module")
def fmt_tf(tiny):
    """The tiny OPT's caption format and image transform, as the loader gets them."""
    from blip2_dist.data.transforms import CaptionFormat, ImageTransform

    model, processor = tiny["opt"]
    return CaptionFormat.from_processor(processor, model.config), ImageTransform.from_processor(processor)
