"""The shard writer: contract layout, determinism, manifest, bad input."""

import json
import tarfile

import pytest

from blip2_dist.data.shards import (
    Sample,
    ShardWriter,
    expand_runs,
    read_manifest,
    run_length,
    split_shards,
)


def _write(out, n=5, per_shard=2, jpeg=b"\xff\xd8fakejpeg\xff\xd9"):
    with ShardWriter(out, samples_per_shard=per_shard) as w:
        for i in range(n):
            w.write(Sample(f"im.{i}", "train" if i < 3 else "val", [f"cap {i}"] * (i % 3 + 1), jpeg))
    return read_manifest(out)


def test_layout_and_manifest(tmp_path):
    m = _write(tmp_path)
    train = m["splits"]["train"]
    assert [s["name"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert train["images"] == 3 and train["captions"] == 1 + 2 + 3
    assert expand_runs(train["shards"][0]["caption_counts"]) == [1, 2]
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("im_1.json").read())
    assert names == ["im_0.jpg", "im_0.json", "im_1.jpg", "im_1.json"]
    assert meta == {"image_id": "im.1", "captions": ["cap 1", "cap 1"], "split": "train"}
    assert [s["path"] for s in split_shards(m, "val", tmp_path)][0].endswith("val-000000.tar")


def test_byte_identical(tmp_path):
    a = _write(tmp_path / "a")
    b = _write(tmp_path / "b")
    assert a == b
    assert (tmp_path / "a/train-000001.tar").read_bytes() == (tmp_path / "b/train-000001.tar").read_bytes()


def test_failure_leaves_no_manifest(tmp_path):
    with pytest.raises(ValueError, match="duplicate image id"):
        with ShardWriter(tmp_path) as w:
            w.write(Sample("x", "train", ["a"], b"j"))
            w.write(Sample("x", "train", ["a"], b"j"))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(tmp_path)


def test_rejects_empty_captions_and_bad_split(tmp_path):
    w = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="no captions"):
        w.write(Sample("x", "train", [], b"j"))
    with pytest.raises(ValueError, match="split must be"):
        w.write(Sample("y", "dev", ["a"], b"j"))
    w.abort()


def test_run_length_roundtrip():
    values = [5, 5, 5, 4, 5, 5]
    assert run_length(values) == [[5, 3], [4, 1], [5, 2]]
    assert expand_runs(run_length(values)) == values
