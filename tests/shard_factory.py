"""Shards written in the test, shared by the loader tests: small random JPEGs and shards of exact sizes.

    write_shards(tmp_path, [9, 6, 5])          # three train shards of 9, 6 and 5 images, 5 captions each
    jpeg_bytes(3)                              # the image of "img3" (same seed, same bytes)

Captions are "img{i} cap {j}": unique strings, so a test can tell which caption of which image a batch
holds. Whole synthetic datasets (shapes with captions that describe them) come from the library's
`blip2_dist.data.synthetic.write_synthetic`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from blip2_dist.data.shards import Sample, ShardWriter


def jpeg_bytes(i: int, size: tuple[int, int] = (24, 18), mode: str = "RGB") -> bytes:
    """A small noise JPEG, the same bytes for the same `i`."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def write_shards(
    out: Path, shard_sizes: list[int], caps: Callable[[int], int] = lambda i: 5, split: str = "train"
) -> Path:
    """Shards of exactly the given sizes (images img0, img1, ... in order) and their manifest."""
    i = 0
    with ShardWriter(out, samples_per_shard=10**6) as w:
        for size in shard_sizes:
            for _ in range(size):
                w.write(Sample(f"img{i}", split, [f"img{i} cap {j}" for j in range(caps(i))], jpeg_bytes(i)))
                i += 1
            w._finish_shard(split)  # one shard per requested size (uneven sizes)
    return out
