"""The packer: the three Flickr8k layouts and the hf path → shards that honour the data contract."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fake_flickr8k import (
    fake_name,
    small_jpeg,
    write_kaggle,
    write_karpathy,
    write_original,
    write_split_files,
)
from PIL import Image, ImageFile

from blip2_dist.data.flickr8k import PackError, ratio_split
from blip2_dist.data.hf_datasets import hf_records
from blip2_dist.data.pack import pack_flickr8k, pack_hf, prepare_image, summarize_manifest
from blip2_dist.data.pack_cli import main
from blip2_dist.data.shards import MANIFEST, read_manifest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported (lazily, in the hf tests)
REPO = Path(__file__).resolve().parents[1]
FAST = dict(workers=1, progress=False)


def read_pack(out):
    """{image_id: (split, captions, jpeg)} and the image ids per split in shard order."""
    manifest = read_manifest(out)
    samples, order = {}, {}
    for split, info in manifest["splits"].items():
        order[split] = []
        for shard in info["shards"]:
            with tarfile.open(Path(out) / shard["name"]) as tar:
                members = tar.getmembers()
                for jpg, meta in zip(members[::2], members[1::2]):
                    assert jpg.name.endswith(".jpg") and meta.name == jpg.name[:-4] + ".json"
                    m = json.loads(tar.extractfile(meta).read())
                    assert m["split"] == split
                    samples[m["image_id"]] = (split, m["captions"], tar.extractfile(jpg).read())
                    order[split].append(m["image_id"])
    return samples, order


def shard_digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).glob("*.tar"))}


def assert_matches(out, fake):
    samples, order = read_pack(out)
    assert {k: v[:2] for k, v in samples.items()} == fake.expected
    assert order == {s: ids for s, ids in fake.order.items() if ids}
    packed = [c for _, caps, _ in samples.values() for c in caps]
    assert len(packed) == len(set(packed))  # every caption arrives once
    for image_id, (_, _, jpeg) in samples.items():
        assert jpeg == fake.files[image_id].read_bytes()  # original bytes kept
    return samples


def line_of(path, needle):
    return next(i for i, line in enumerate(Path(path).read_text().split("\n"), 1) if needle in line)


# ---- layouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("image_dir,nested", [("Flicker8k_Dataset", False), ("Flickr8k_Dataset", True)])
def test_original_layout(tmp_path, image_dir, nested):
    fake = write_original(tmp_path / "src", image_dir=image_dir, nested=nested)
    manifest = pack_flickr8k(tmp_path / "src", tmp_path / "out", samples_per_shard=5, **FAST)
    samples = assert_matches(tmp_path / "out", fake)
    assert len(samples) == 12 and fake_name(12)[:-4] not in samples  # token-file-only images stay out
    assert manifest["source"]["layout"] == "original" and manifest["source"]["samples_per_shard"] == 5
    assert manifest["source"]["max_side"] is None and manifest["skipped"] == []
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert (manifest["splits"]["val"]["images"], manifest["splits"]["val"]["captions"]) == (2, 10)
    assert read_manifest(tmp_path / "out") == manifest


def test_karpathy_layout_restval_is_train(tmp_path):
    fake = write_karpathy(tmp_path / "src", image_dir="Flicker8k_Dataset")
    manifest = pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)
    assert_matches(tmp_path / "out", fake)
    assert manifest["source"]["layout"] == "karpathy"
    assert manifest["splits"]["train"]["images"] == 8  # 4 train + 4 restval


def test_kaggle_layout_hash_split_and_quoted_commas(tmp_path):
    fake = write_kaggle(tmp_path / "src", n=50)  # the first 50 names hash into all three splits
    manifest = pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)
    samples = assert_matches(tmp_path / "out", fake)
    assert 'A sign that says "stop, look" .' in samples[fake_name(1)[:-4]][1]
    assert set(manifest["splits"]) == {"train", "val", "test"} and "sha1" in manifest["source"]["split_rule"]
    # With the official split files, those decide (and images in none stay out).
    names = [fake_name(i) for i in range(50)]
    splits = write_split_files(tmp_path / "splits", {"train": names[5:9], "val": names[:2], "test": [names[20]]})
    pack_flickr8k(tmp_path / "src", tmp_path / "out2", splits_dir=splits, **FAST)
    _, order = read_pack(tmp_path / "out2")
    assert order == {
        "train": [n[:-4] for n in names[5:9]],
        "val": [n[:-4] for n in names[:2]],
        "test": [names[20][:-4]],
    }


def test_detection_note_and_forced_format(tmp_path, capsys):
    fake = write_original(tmp_path / "src")
    write_karpathy(tmp_path / "src", n=3)  # dataset_flickr8k.json + Images/ beside the original
    pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)
    assert "using original" in capsys.readouterr().out
    assert len(read_pack(tmp_path / "out")[0]) == len(fake.expected)
    pack_flickr8k(tmp_path / "src", tmp_path / "out", format="karpathy", **FAST)
    assert len(read_pack(tmp_path / "out")[0]) == 3


def test_unknown_layout(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello\n")
    with pytest.raises(PackError, match="unknown layout"):
        pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)
    assert main(["flickr8k", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 1
    assert "unknown layout" in capsys.readouterr().err


# ---- bad input --------------------------------------------------------------------------------


def test_truncated_image_fails_and_keeps_the_old_pack(tmp_path, capsys):
    fake = write_original(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["flickr8k", str(tmp_path / "src"), "--out", str(out), "--workers", "1"]) == 0
    assert (out / MANIFEST).is_file()
    saved = json.loads((out / "pack_config.json").read_text())  # the resolved options, beside the manifest
    assert saved["command"] == "flickr8k" and saved["pack"]["workers"] == 1 and saved["pack"]["quality"] == 95
    assert saved["source"]["source"] == str(tmp_path / "src") and saved["output"]["out"] == str(out)
    before = shard_digests(out)
    bad = fake.files[fake.order["train"][3]]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    capsys.readouterr()
    assert main(["flickr8k", str(tmp_path / "src"), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated" in err and "is as it was" in err
    assert shard_digests(out) == before and read_manifest(out)  # the failed run changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # and left no temporary folder


def test_missing_image_fails_before_any_work(tmp_path):
    fake = write_original(tmp_path / "src")
    gone = fake.files[fake.order["test"][0]]
    gone.unlink()
    with pytest.raises(PackError, match="missing image file") as e:
        pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)
    assert str(gone) in str(e.value)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_skip_bad_packs_the_rest_and_reports(tmp_path, capsys):
    fake = write_original(tmp_path / "src")
    token = tmp_path / "src/Flickr8k_text/Flickr8k.token.txt"
    truncated, missing, thin = (fake.order["train"][i] for i in (0, 1, 2))
    fake.files[truncated].write_bytes(fake.files[truncated].read_bytes()[:300])
    fake.files[missing].unlink()
    line = line_of(token, f"{thin}.jpg#4\t")
    token.write_text(token.read_text().replace(fake.expected[thin][1][-1], "   "))
    out = tmp_path / "out"
    assert main(["flickr8k", str(tmp_path / "src"), "--out", str(out), "--workers", "1", "--skip-bad"]) == 0
    stdout = capsys.readouterr().out
    samples, _ = read_pack(out)
    assert truncated not in samples and missing not in samples
    assert samples[thin][1] == fake.expected[thin][1][:-1]  # the empty caption dropped, the image kept
    skipped = {s["image_id"]: s for s in read_manifest(out)["skipped"]}
    assert skipped[missing]["reason"] == "image skipped: missing image file"
    assert skipped[truncated]["reason"].startswith("image skipped: unreadable image")
    assert skipped[thin]["file"] == f"{token}:{line}" and skipped[thin]["reason"].startswith("caption dropped: empty")
    for name in (truncated, missing, thin):
        assert name in stdout
    assert "skipped: 3" in stdout


def test_empty_caption_error_names_file_and_line(tmp_path):
    fake = write_original(tmp_path / "src")
    token = tmp_path / "src/Flickr8k_text/Flickr8k.token.txt"
    image = fake.order["val"][0]
    line = line_of(token, f"{image}.jpg#0\t")
    text = token.read_text().split("\n")
    text[line - 1] = f"{image}.jpg#0\t  \t "
    token.write_text("\n".join(text))
    with pytest.raises(PackError, match=f"Flickr8k.token.txt:{line}: empty caption"):
        pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)


def test_image_without_caption(tmp_path):
    fake = write_original(tmp_path / "src")
    token = tmp_path / "src/Flickr8k_text/Flickr8k.token.txt"
    image = fake.order["test"][1]
    token.write_text("".join(line + "\n" for line in token.read_text().splitlines() if not line.startswith(image)))
    split_file = tmp_path / "src/Flickr8k_text/Flickr_8k.testImages.txt"
    with pytest.raises(PackError, match=f"testImages.txt:{line_of(split_file, image)}: {image}.jpg has no caption"):
        pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)


@pytest.mark.parametrize("layout", ["original", "kaggle", "karpathy"])
def test_non_utf8_text_names_file_and_line(tmp_path, layout):
    writer = {"original": write_original, "kaggle": write_kaggle, "karpathy": write_karpathy}[layout]
    fake = writer(tmp_path / "src")
    path = {
        "original": tmp_path / "src/Flickr8k_text/Flickr8k.token.txt",
        "kaggle": tmp_path / "src/captions.txt",
        "karpathy": tmp_path / "src/dataset_flickr8k.json",
    }[layout]
    image = fake.order["train"][0]
    old = fake.expected[image][1][0]
    data = path.read_bytes()
    line = data[: data.index(old.encode())].count(b"\n") + 1
    path.write_bytes(data.replace(old.encode(), b"caf\xe9 " + old.encode(), 1))
    with pytest.raises(PackError, match=f"{path.name}:{line}: .*not valid UTF-8"):
        pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)


def test_refuses_load_truncated_images(tmp_path, monkeypatch):
    write_original(tmp_path / "src")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(PackError, match="LOAD_TRUNCATED_IMAGES"):
        pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)


# ---- images and determinism --------------------------------------------------------------------


def test_deterministic_whatever_the_workers(tmp_path):
    write_original(tmp_path / "src")
    a = pack_flickr8k(tmp_path / "src", tmp_path / "a", samples_per_shard=3, max_side=24, workers=1, progress=False)
    b = pack_flickr8k(tmp_path / "src", tmp_path / "b", samples_per_shard=3, max_side=24, workers=2, progress=False)
    assert a == b
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b") != {}


def test_grayscale_cmyk_kept_png_converted_big_resized(tmp_path):
    fake = write_original(tmp_path / "src")
    gray, cmyk, png, big, big_cmyk = fake.order["train"][:5]
    fake.files[gray].write_bytes(small_jpeg(1, mode="L"))
    fake.files[cmyk].write_bytes(small_jpeg(2, mode="CMYK"))
    buf = io.BytesIO()
    Image.new("RGBA", (30, 20), (10, 200, 30, 128)).save(buf, "PNG")
    fake.files[png].write_bytes(buf.getvalue())  # a PNG named .jpg
    fake.files[big].write_bytes(small_jpeg(3, size=(200, 100)))
    fake.files[big_cmyk].write_bytes(small_jpeg(4, size=(90, 120), mode="CMYK"))
    pack_flickr8k(tmp_path / "src", tmp_path / "out", max_side=64, **FAST)
    samples, _ = read_pack(tmp_path / "out")
    for image_id in (gray, cmyk):
        assert samples[image_id][2] == fake.files[image_id].read_bytes()
    for image_id, mode, size in [(png, "RGB", (30, 20)), (big, "RGB", (64, 32)), (big_cmyk, "RGB", (48, 64))]:
        im = Image.open(io.BytesIO(samples[image_id][2]))
        assert (im.format, im.mode, im.size) == ("JPEG", mode, size)
    small = fake.order["train"][5]
    assert samples[small][2] == fake.files[small].read_bytes()  # 40x30 < 64: original bytes


def test_prepare_image_keeps_orientation():
    im = Image.new("RGB", (100, 50), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    data, what = prepare_image(buf.getvalue(), max_side=40)
    out = Image.open(io.BytesIO(data))
    assert what == "resized" and out.size == (40, 20) and out.getexif()[0x0112] == 6


def test_stale_shards_are_removed(tmp_path):
    write_original(tmp_path / "src")
    pack_flickr8k(tmp_path / "src", tmp_path / "out", samples_per_shard=2, **FAST)
    assert len(list((tmp_path / "out").glob("train-*.tar"))) == 4
    pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "test-000000.tar",
        "train-000000.tar",
        "val-000000.tar",
    ]


def test_cli_subprocess(tmp_path):
    fake = write_original(tmp_path / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "blip2_dist.data.pack_cli",
        "flickr8k",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "out"),
    ]
    ok = subprocess.run(cmd + ["--workers", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "images/s" in ok.stdout and "train" in ok.stdout
    fake.files[fake.order["val"][1]].write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    bad = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and str(fake.files[fake.order["val"][1]]) in bad.stderr
    assert read_manifest(tmp_path / "out")  # the failed run left the previous pack in place


def test_summarize_manifest(tmp_path):
    write_original(tmp_path / "src")
    text = summarize_manifest(pack_flickr8k(tmp_path / "src", tmp_path / "out", **FAST), seconds=2.0)
    rows = [line.split() for line in text.splitlines()]
    assert ["train", "8", "40", "1"] in rows and ["total", "12", "60", "3"] in rows
    assert "skipped: 0" in text and "12 images in 2.0 s (6.0 images/s)" in text


# ---- Hugging Face datasets on disk --------------------------------------------------------------


def _png(colour, size=(24, 16), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_hf_imagefolder(tmp_path):
    pytest.importorskip("datasets")
    root = tmp_path / "mine"
    root.mkdir()
    rows = []
    for i in range(8):
        name = f"photo_{i}.png" if i % 2 else f"photo_{i}.jpg"
        (root / name).write_bytes(_png((i * 30, 0, 0)) if i % 2 else small_jpeg(i))
        rows.append({"file_name": name, "captions": [f" caption {i} a ", f"caption {i} b"], "note": "x"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = pack_hf(
        root,
        tmp_path / "out",
        caption_column="captions",
        split_ratio="0.5,0.25,0.25",
        cache_dir=str(tmp_path / "cache"),
        **FAST,
    )
    samples, _ = read_pack(tmp_path / "out")
    assert sorted(samples) == [f"photo_{i}" for i in range(8)]
    for i in range(8):
        split, captions, jpeg = samples[f"photo_{i}"]
        assert split == ratio_split(f"photo_{i}", (0.5, 0.25, 0.25))
        assert captions == [f"caption {i} a", f"caption {i} b"]
        assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
        if i % 2 == 0:
            assert jpeg == (root / f"photo_{i}.jpg").read_bytes()
    assert manifest["source"]["loader"] == "imagefolder"


def test_hf_imagefolder_split_folders(tmp_path):
    pytest.importorskip("datasets")
    for split, n in [("train", 3), ("validation", 2)]:
        folder = tmp_path / "mine" / split
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{split}_{i}.jpg").write_bytes(small_jpeg(i))
        (folder / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": f"{split}_{i}.jpg", "text": f"{split} {i}"}) + "\n" for i in range(n))
        )
    pack_hf(tmp_path / "mine", tmp_path / "out", cache_dir=str(tmp_path / "cache"), **FAST)  # text: found by default
    samples, order = read_pack(tmp_path / "out")
    assert order == {"train": ["train_0", "train_1", "train_2"], "val": ["validation_0", "validation_1"]}
    assert samples["validation_1"][1] == ["validation 1"]


def test_hf_save_to_disk_splits_and_columns(tmp_path):
    datasets = pytest.importorskip("datasets")

    def part(n, offset):
        return datasets.Dataset.from_dict(
            {
                "image": [Image.new("RGB", (20, 12), (offset * 20 + i, 5, 5)) for i in range(n)],
                "short": [f"short {offset + i}" for i in range(n)],
                "long": [[f"long {offset + i} one", f"long {offset + i} two"] for i in range(n)],
            }
        ).cast_column("image", datasets.Image())

    datasets.DatasetDict({"train": part(3, 0), "validation": part(2, 3), "test": part(1, 5)}).save_to_disk(
        tmp_path / "dd"
    )
    pack_hf(tmp_path / "dd", tmp_path / "out", caption_column=["short", "long"], **FAST)
    samples, order = read_pack(tmp_path / "out")
    assert order == {
        "train": ["train-00000000", "train-00000001", "train-00000002"],
        "val": ["val-00000003", "val-00000004"],
        "test": ["test-00000005"],
    }
    assert samples["val-00000004"][1] == ["short 4", "long 4 one", "long 4 two"]

    ds = part(4, 0).add_column("where", ["train", "dev", "test", "somewhere"])
    ds.save_to_disk(tmp_path / "one")
    with pytest.raises(PackError, match="'somewhere' is not train/val/test"):
        pack_hf(tmp_path / "one", tmp_path / "out2", caption_column="short", split_column="where", **FAST)
    manifest = pack_hf(
        tmp_path / "one", tmp_path / "out2", caption_column="short", split_column="where", skip_bad=True, **FAST
    )
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 1, "val": 1, "test": 1}
    assert manifest["skipped"] == [
        {
            "image_id": "row-00000003",
            "file": f"{tmp_path / 'one'} [train][3]",
            "reason": "image skipped: split value 'somewhere' is not train/val/test",
        }
    ]


def test_hf_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": [_png((1, 2, 3))], "text": [" "]}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(tmp_path / "ds")
    with pytest.raises(PackError, match="no column 'caption'"):
        hf_records(tmp_path / "ds", caption_column="caption")
    with pytest.raises(PackError, match="empty caption in column 'text'"):
        pack_hf(tmp_path / "ds", tmp_path / "out", **FAST)


@pytest.mark.parametrize(
    "mode,expected", [("1", "L"), ("L", "L"), ("LA", "L"), ("P", "RGB"), ("RGBA", "RGB"), ("I;16", "L")]
)
def test_prepare_image_converts_modes_jpeg_cannot_hold(mode, expected):
    im = Image.new(
        mode,
        (20, 10),
        1 if mode == "1" else 40000 if mode == "I;16" else (7,) * len(mode) if mode in ("LA", "RGBA") else 7,
    )
    buf = io.BytesIO()
    im.save(buf, "PNG")
    data, what = prepare_image(buf.getvalue())
    out = Image.open(io.BytesIO(data))
    assert (what, out.format, out.mode, out.size) == ("converted", "JPEG", expected, (20, 10))
    if mode == "I;16":
        assert abs(out.getpixel((3, 3)) - 40000 // 256) <= 2  # 16-bit scaled, not clipped to white
