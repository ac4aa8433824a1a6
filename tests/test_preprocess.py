"""Our image pixels against the hub image processor's (benchmarks/bench.py preprocess), on photo-like JPEGs:
the default (full decode) matches it; JPEG draft decoding, now opt-in, does not."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from launch_helpers import REPO, cpu_env

from blip2_dist.data.synthetic import natural_image
from blip2_dist.data.transforms import ImageTransform


def test_default_pixels_match_the_hub_processor_and_draft_does_not(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(640, 480), (500, 375)]):
        path = tmp_path / f"photo{i}.jpg"
        natural_image(rng, *size).save(path, quality=90)
        paths.append(str(path))
    out = tmp_path / "pre.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "preprocess", *paths, "--size", "224", "--json", str(out)],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    default = ImageTransform(size=(224, 224), mean=(0, 0, 0), std=(1, 1, 1))
    assert default.draft is False and default.backend == "torch"
    summary = report["summary"]
    assert summary["full+pil"]["max"] <= 0.01  # BlipImageProcessorPil's own arithmetic
    assert summary["full+torch (default)"]["mean"] < 0.05 and summary["full+torch (default)"]["max"] <= 2.0
    coco = report["photos"]["photo0.jpg 640x480"]
    assert coco["draft+pil"]["decoded"] == [320, 240]  # libjpeg halved it before the resize
    assert coco["draft+pil"]["mean"] > 10 * summary["full+torch (default)"]["mean"]
    assert "draft decoding reduced this JPEG" in proc.stdout
