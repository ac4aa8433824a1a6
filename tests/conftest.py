"""Shared test set-up: CPU only, one thread per process, no hub access."""

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
