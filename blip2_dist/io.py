"""Atomic file writers: a reader (another rank, a resumed run, a user's `cat`) sees the old file or
the new one, never half of one.

    write_json_atomic(run_dir / "config.json", resolved)
    write_text_atomic(ckpt_root / "latest", tag + "\n")

The packer's manifest, checkpoints' COMPLETE markers and `latest`, evaluation results and the
training run's config all go through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, rename: readers see the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
