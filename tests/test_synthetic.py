"""The synthetic set: deterministic, split as asked, and every caption true of its drawn image."""

import ast
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2_dist.data.pack_cli import main
from blip2_dist.data.shards import read_manifest
from blip2_dist.data.synthetic import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    caption_matches,
    make_scene,
    scene_captions,
    scene_for_id,
    write_synthetic,
)

REPO = Path(__file__).resolve().parents[1]


def samples_of(out):
    for split, info in read_manifest(out)["splits"].items():
        for shard in info["shards"]:
            with tarfile.open(Path(out) / shard["name"]) as tar:
                members = tar.getmembers()
                for jpg, meta in zip(members[::2], members[1::2]):
                    yield split, json.loads(tar.extractfile(meta).read()), tar.extractfile(jpg).read()


def components(mask):
    """4-connected components of a boolean mask, as pixel counts."""
    seen = np.zeros_like(mask)
    sizes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, size = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        sizes.append(size)
    return sizes


def what_is_drawn(jpeg, scene):
    """Colour, count and centroid read back from the pixels (not from the scene's boxes)."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
    far = np.abs(pixels - scene.background).max(axis=2)
    mask = far > 0.5 * far.max()
    mean = pixels[mask].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
    count = sum(size >= 6 for size in components(mask))
    ys, xs = np.nonzero(mask)
    return colour, count, xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]


def test_deterministic_and_split(tmp_path):
    a = write_synthetic(tmp_path / "a", n_train=30, n_val=7, n_test=5, samples_per_shard=8)
    b = write_synthetic(tmp_path / "b", n_train=30, n_val=7, n_test=5, samples_per_shard=8)
    assert a == b

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert {s: (v["images"], v["captions"], len(v["shards"])) for s, v in a["splits"].items()} == {
        "train": (30, 150, 4),
        "val": (7, 35, 1),
        "test": (5, 25, 1),
    }
    ids = [meta["image_id"] for _, meta, _ in samples_of(tmp_path / "a")]
    assert len(set(ids)) == 42 and all(
        i.startswith(f"syn-{s}-") for (s, _, _), i in zip(samples_of(tmp_path / "a"), ids)
    )
    write_synthetic(tmp_path / "c", n_train=30, n_val=7, n_test=5, samples_per_shard=8, seed=1)
    assert digest(tmp_path / "c") != digest(tmp_path / "a")


def test_captions_match_the_drawn_image(tmp_path):
    write_synthetic(tmp_path / "s", n_train=60, n_val=10, n_test=10, image_size=64)
    for split, meta, jpeg in samples_of(tmp_path / "s"):
        scene = scene_for_id(meta["image_id"])
        assert meta["split"] == split and meta["captions"] == scene_captions(scene)
        assert all(caption_matches(c, scene) for c in meta["captions"])
        colour, count, cx, cy = what_is_drawn(jpeg, scene)
        assert (colour, count) == (scene.colour, scene.count), meta
        where = {
            "left": cx < 0.45,
            "right": cx > 0.55,
            "top": cy < 0.45,
            "bottom": cy > 0.55,
            "center": 0.35 < cx < 0.65 and 0.35 < cy < 0.65,
        }
        assert where[scene.position], (meta, cx, cy)


def test_captions_need_the_image():
    scene = make_scene(0, "train", 3)
    other_colour = Scene(next(c for c in COLOURS if c != scene.colour), *list(scene.__dict__.values())[1:])
    other_count = Scene(scene.colour, scene.shape, scene.count % 3 + 1, scene.position, scene.background, scene.boxes)
    for caption in scene_captions(scene):
        assert not caption_matches(caption, other_colour) and not caption_matches(caption, other_count)
    assert scene_captions(scene) == scene_captions(make_scene(0, "train", 3))
    scenes = [make_scene(0, "train", i) for i in range(2000)]
    for attr, values in [("colour", COLOURS), ("shape", SHAPES), ("count", (1, 2, 3)), ("position", POSITIONS)]:
        freq = Counter(getattr(s, attr) for s in scenes)
        assert set(freq) == set(values) and min(freq.values()) > 0.7 * 2000 / len(values)


def tiny_corpus_words():
    """models.TINY_CORPUS_WORDS, read from the source when it is a literal `\"\"\"...\"\"\".split()`
    (importing models.py means importing torch and transformers: seconds)."""
    tree = ast.parse((REPO / "blip2_dist/models.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TINY_CORPUS_WORDS" for t in node.targets):
            value = node.value
            if (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Attribute)
                and value.func.attr == "split"
                and isinstance(value.func.value, ast.Constant)
                and not value.args
            ):
                return value.func.value.value.split()
    from blip2_dist.models import TINY_CORPUS_WORDS

    return TINY_CORPUS_WORDS


def test_words_are_in_the_tiny_corpus():
    TINY_CORPUS_WORDS = tiny_corpus_words()
    words = {w for i in range(300) for c in scene_captions(make_scene(0, "val", i)) for w in c.split()}
    assert words <= set(TINY_CORPUS_WORDS), words - set(TINY_CORPUS_WORDS)


def test_cli(tmp_path, capsys):
    args = ["--out", str(tmp_path / "a"), "--n-train", "6", "--n-val", "2", "--n-test", "2", "--samples-per-shard", "4"]
    assert main(["synthetic", *args]) == 0
    assert "packed synthetic" in capsys.readouterr().out
    run = subprocess.run(
        [sys.executable, "-m", "blip2_dist.data.pack_cli", "synthetic", *args[:1], str(tmp_path / "b"), *args[2:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "a/train-000001.tar").read_bytes() == (tmp_path / "b/train-000001.tar").read_bytes()
    wrong = subprocess.run(  # the packer module itself is not the command: it says which one is
        [sys.executable, "-m", "blip2_dist.data.pack", "synthetic", "--out", str(tmp_path / "c")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 1 and "blip2_dist.data.pack_cli" in wrong.stderr and not (tmp_path / "c").exists()


@pytest.mark.parametrize("size", [32, 96])
def test_other_image_sizes(tmp_path, size):
    write_synthetic(tmp_path / "s", n_train=4, n_val=1, n_test=1, image_size=size)
    _, meta, jpeg = next(samples_of(tmp_path / "s"))
    assert Image.open(io.BytesIO(jpeg)).size == (size, size)


def test_attribute_accuracy_scores_true_and_false_captions():
    from blip2_dist.data.synthetic import attribute_accuracy, make_scene, scene_captions

    ids = [f"syn-val-{i:06d}" for i in range(12)]
    truth = {i: scene_captions(make_scene(0, "val", int(i[-6:])))[k % 5] for k, i in enumerate(ids)}
    assert attribute_accuracy(truth) == {"colour": 1.0, "shape": 1.0, "count": 1.0, "all": 1.0}
    wrong = {i: "a drawing of nothing" for i in ids}
    assert attribute_accuracy(wrong)["all"] == 0.0 and attribute_accuracy(wrong)["colour"] == 0.0


def test_photo_flickr8k_tree_packs_as_flickr8k(tmp_path):
    """The benchmarks' Flickr8k-sized tree (here 16 photos) is what `pack flickr8k` reads: 6:1:1 splits,
    five captions per image, photo-sized JPEGs kept byte for byte."""
    from blip2_dist.data.synthetic import write_photo_flickr8k

    files = write_photo_flickr8k(tmp_path / "tree", n=16, workers=2)
    assert len(files) == 16 and all(Image.open(f).size in {(500, 375), (500, 333), (375, 500)} for f in files)
    assert min(f.stat().st_size for f in files) > 50_000  # photo-like, not flat colour
    assert main(["flickr8k", str(tmp_path / "tree"), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    splits = read_manifest(tmp_path / "s")["splits"]
    assert {k: (v["images"], v["captions"]) for k, v in splits.items()} == {
        "train": (12, 60),
        "val": (2, 10),
        "test": (2, 10),
    }
    _, meta, jpeg = next(samples_of(tmp_path / "s"))
    assert jpeg in {f.read_bytes() for f in files} and len(meta["captions"]) == 5
