"""Where shards come from: webdataset's own I/O reading our shards (and theirs), every `--data` form,
remote faults over a real local HTTP server, the counting pass, img2dataset-style shards.

The server (tests/http_server.py) is a thread of this process on 127.0.0.1 that fails on purpose.
Streams are built for rank 0 and 1 in one process; where workers matter they are real processes.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import time
from collections import Counter

import pytest
import webdataset as wds
from http_server import serve
from PIL import Image
from shard_factory import jpeg_bytes, write_shards

from blip2_dist.data.eval_stream import EvalStream
from blip2_dist.data.pack_cli import main as pack_main
from blip2_dist.data.reader import SampleLog, check_data, read_shard, resolve_shards
from blip2_dist.data.shards import read_manifest
from blip2_dist.data.stream import TrainStream
from blip2_dist.data.urls import RetryPolicy, ShardReadError
from blip2_dist.errors import UserError

FAST = RetryPolicy(retries=3, backoff_s=0.01, stall_s=1.0)


def _epoch(source, fmt_tf, world=2, workers=0, retry=FAST, micro_batch=5, epoch=0):
    """Every rank's batches of one epoch (captions and image ids), and the summed loader counters."""
    batches, stats = [], Counter()
    for rank in range(world):
        s = TrainStream(
            source,
            "train",
            *fmt_tf,
            micro_batch=micro_batch,
            rank=rank,
            world_size=world,
            num_workers=workers,
            retry=retry,
        )
        batches.append([(b["captions"], b["image_ids"], b["pixel_values"].sum().item()) for b in s.epoch(epoch)])
        stats.update(s.last_epoch_stats.counts)
    return batches, stats


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    write_shards(root, [9, 6, 5])  # 20 images x 5 captions, three uneven shards
    return root


@pytest.fixture(scope="module")
def reference(packed, fmt_tf):
    return _epoch(str(packed), fmt_tf)[0]


def test_webdataset_reads_our_shards(packed):
    """Plain webdataset (its tar reader, grouping and decoder) reads the packed shards, from disk and
    over HTTP through gopen's curl, with the data contract's parts."""
    manifest = read_manifest(packed)
    with serve(packed) as srv:
        for base in (str(packed), srv.url):
            ds = wds.WebDataset(base + "/train-{000000..000002}.tar", shardshuffle=False).decode("pil")
            samples = list(ds)
            assert len(samples) == manifest["splits"]["train"]["images"] == 20
            for i, sample in enumerate(samples):
                assert sample["__key__"] == f"img{i}" and isinstance(sample["jpg"], Image.Image)
                assert sample["json"] == {
                    "image_id": f"img{i}",
                    "split": "train",
                    "captions": [f"img{i} cap {j}" for j in range(5)],
                }
                assert sample["jpg"].tobytes() == Image.open(io.BytesIO(jpeg_bytes(i))).tobytes()


def test_every_data_form_gives_the_same_batches(packed, reference, fmt_tf, tmp_path):
    # Two sources joined by '::' (a folder and a manifest path) are the three shards in that order.
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(a, [9, 6])  # the first two shards' images; b lists only the third shard
    shutil.copytree(packed, b)
    manifest = read_manifest(b)
    manifest["splits"]["train"]["shards"] = manifest["splits"]["train"]["shards"][2:]
    (b / "manifest.json").write_text(json.dumps(manifest))
    with serve(packed) as srv:
        forms = [
            str(packed / "manifest.json"),
            f"file://{packed}/manifest.json",
            f"pipe:cat {packed}/manifest.json",
            srv.url + "/manifest.json",
            str(packed / "train-{000000..000002}.tar"),
            f"{a}::{b}/manifest.json",
        ]
        for form in forms:
            assert _epoch(form, fmt_tf)[0] == reference, form
        assert [s.url for s in resolve_shards(f"pipe:cat {packed}/manifest.json", "train")][
            0
        ] == f"pipe:cat {packed}/train-000000.tar"
        local = [b["image_ids"] for b in EvalStream(str(packed), "train", *fmt_tf, batch_size=4, rank=1, world_size=2)]
        remote = EvalStream(srv.url + "/manifest.json", "train", *fmt_tf, batch_size=4, rank=1, world_size=2)
        assert [b["image_ids"] for b in remote] == local


def test_remote_faults_are_retried_and_resume_at_the_right_sample(packed, reference, fmt_tf):
    """A dropped connection mid-shard, 503s, a stalled answer, and a 500 on the manifest: the epoch is
    exactly the fault-free one (nothing lost, nothing twice) and every retry is counted."""
    size = (packed / "train-000001.tar").stat().st_size
    faults = {
        "manifest.json": ["500"],
        "train-000000.tar": ["503", "503"],
        "train-000001.tar": [f"drop:{size // 2}"],  # about three of its six samples, then the connection closes
        "train-000002.tar": ["stall:3"],  # half of it, then silence: the watchdog kills curl after 1 s
    }
    for world, workers in ((1, 0), (2, 2)):
        expected = _epoch(str(packed), fmt_tf, world=world, workers=workers)[0]
        with serve(packed, {k: list(v) for k, v in faults.items()}) as srv:
            t0 = time.time()
            batches, stats = _epoch(srv.url + "/manifest.json", fmt_tf, world=world, workers=workers)
            elapsed = time.time() - t0
        assert batches == expected  # the same batches, tensors included: nothing lost or read twice
        assert stats["bad_tar"] == 0 and elapsed < 120
        if world == 1:  # one slot reads every shard from its start: every fault is hit once
            assert stats["retries"] == 4  # 503, 503, drop, stall (the manifest's retry is before the epoch)
            # How many samples came through before a fault is timing (webdataset's Pipe fails every read
            # once curl has exited); test_resume_after_a_drop counts the re-read samples where it is not.
        else:  # four slots: a slot whose range ends before a drop or stall point never sees it
            assert 2 <= stats["retries"] <= 4


def test_gives_up_with_the_url_named(packed, fmt_tf):
    with serve(packed, {"train-000001.tar": ["always-drop:20000"], "train-000002.tar": ["404"]}) as srv:
        url = srv.url + "/manifest.json"
        retry = RetryPolicy(retries=2, backoff_s=0.01)
        stream = TrainStream(url, "train", *fmt_tf, micro_batch=5, rank=0, world_size=1, num_workers=0, retry=retry)
        with pytest.raises(ShardReadError, match=r"train-000002.tar: cannot read at sample 0 of 5 .*error: 404\)$"):
            list(stream.epoch(0))
        assert srv.count("train-000002.tar") == 1  # a 4xx is not retried
        with pytest.raises(
            ShardReadError,
            match=r"train-000001.tar: cannot read at sample \d of 6 \(curl: \(18\).*"
            r"failed 3 times in a row; raise --data-retries",
        ):
            list(
                TrainStream(
                    url, "train", *fmt_tf, micro_batch=5, rank=0, world_size=1, num_workers=0, retry=retry
                ).epoch(0)
            )
    failed = r"pipe:exit 3 # manifest.json: cannot read \(exit status 3\); failed 3 times"
    with pytest.raises(ShardReadError, match=failed):
        resolve_shards("pipe:exit 3 # manifest.json", "train", retry)
    with pytest.raises(ValueError, match=r"manifest.json: no split 'test' \(has \['train'\]\)"):
        check_data(f"{packed}::{packed}/manifest.json", ["train", "test"])
    with pytest.raises(FileNotFoundError, match="nowhere: not found .no manifest"):
        check_data("nowhere", ["train"])


def test_counting_pass_for_shards_without_a_manifest(packed, reference, fmt_tf, tmp_path):
    """Remote shards named by a pattern need counts: an error says how to get them, `pack index`
    counts them once into a manifest (full URLs, sha256 as the packer's), which then trains the same."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in packed.glob("*.tar"):
        shutil.copy(p, bare / p.name)
    with serve(bare) as srv:
        pattern = srv.url + "/train-{000000..000002}.tar"
        with pytest.raises(UserError, match=r"no per-shard sample counts .*blip2_dist.data.pack_cli index"):
            resolve_shards(pattern, "train")
        with pytest.raises(UserError, match=r"no per-shard sample counts"):  # before any process group
            check_data(f"{packed}::{pattern}", ["train"])
        assert pack_main(["index", pattern, "--out", str(tmp_path / "idx")]) == 0
        made = read_manifest(tmp_path / "idx")
        assert _epoch(str(tmp_path / "idx" / "manifest.json"), fmt_tf)[0] == reference
    packer = read_manifest(packed)["splits"]["train"]["shards"]
    for ours, theirs in zip(made["splits"]["train"]["shards"], packer):
        assert ours["url"].startswith("http://127.0.0.1") and ours["url"].endswith(theirs["name"])
        for k in ("samples", "captions", "caption_counts", "sha256"):
            assert ours[k] == theirs[k], k
    # Beside local shards: names only, so the folder can move; a second split joins the first.
    assert pack_main(["index", str(bare / "train-{000000..000001}.tar"), "--out", str(bare)]) == 0
    assert pack_main(["index", str(bare / "train-000002.tar"), "--split", "val", "--out", str(bare)]) == 0
    both = read_manifest(bare)
    assert [s["name"] for s in both["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert "url" not in both["splits"]["val"]["shards"][0] and both["splits"]["val"]["images"] == 5


def _img2dataset_shards(folder, groups, per_shard, stats=True):
    """Shards as img2dataset writes them (webdataset's own TarWriter): one sample per caption, the
    image repeated; KEY.jpg, KEY.txt, KEY.json with url/key/status/caption (+ image_id), NAME_stats.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(img, cap) for img, caps in groups for cap in caps]
    for s in range(0, len(rows), per_shard):
        name = f"{s // per_shard:05d}"
        with wds.TarWriter(str(folder / f"{name}.tar")) as tar:
            for k, (img, cap) in enumerate(rows[s : s + per_shard], start=s):
                key = f"{k:09d}"
                meta = {
                    "url": f"http://img.example/{img}.jpg",
                    "key": key,
                    "status": "success",
                    "caption": cap,
                    "image_id": img,
                    "width": 24,
                    "height": 18,
                }
                tar.write({"__key__": key, "jpg": jpeg_bytes(int(img[3:])), "txt": cap, "json": meta})
        if stats:
            stats = {"count": per_shard, "successes": len(rows[s : s + per_shard])}
            (folder / f"{name}_stats.json").write_text(json.dumps(stats))
    return rows


def test_img2dataset_shards_train_directly_and_convert(fmt_tf, tmp_path, caplog):
    groups = [(f"img{i}", [f"img{i} caption {j}" for j in range(2 + i % 3)]) for i in range(8)]  # 2-4 captions
    rows = _img2dataset_shards(tmp_path / "i2d", groups, per_shard=7)
    pattern = str(tmp_path / "i2d" / "{00000..00003}.tar")
    shards = resolve_shards(pattern, "train")
    assert [s.caption_counts for s in shards] == [(1,) * 7, (1,) * 7, (1,) * 7, (1,) * (len(rows) - 21)]
    assert "scanned" not in caplog.text  # counts came from the _stats.json files
    batches, stats = _epoch(pattern, fmt_tf, world=1, micro_batch=1)
    seen = Counter(c for rank in batches for caps, _, _ in rank for c in caps)
    assert seen == Counter(cap for _, cap in rows) and stats["bad_missing_part"] == 0
    ev = list(EvalStream(pattern, "val", *fmt_tf, batch_size=5, rank=0, world_size=1, num_workers=0))
    assert [r for b in ev for r in b["references"]] == [[cap] for _, cap in rows]  # one caption, id = key

    out = tmp_path / "grouped"
    assert pack_main(["img2dataset", pattern, "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest["source"]["group_by"] == "image_id" and manifest["splits"]["train"]["images"] == 8
    got = {s["json"]["image_id"]: s for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False).decode()}
    for image_id, caps in groups:  # every caption of an image together, in reading order; the image once
        assert got[image_id]["json"]["captions"] == caps
        assert got[image_id]["jpg"] == jpeg_bytes(int(image_id[3:]))
    assert list(got) == [g for g, _ in groups]
    s = TrainStream(str(out), "train", *fmt_tf, micro_batch=3, rank=0, world_size=1, num_workers=0)
    assert sum(b["pixel_values"].shape[0] for b in s.epoch(0)) < sum(b["num_examples"] for b in s.epoch(0))


def test_resume_after_a_drop_rereads_and_counts(tmp_path):
    """A connection dropped 60 % into a 1 MB shard: curl cannot finish before the samples ahead of the
    drop were read (the pipe holds 64 KB), so those are handed out, read again after the retry and
    dropped, and counted; every sample comes out once, in order."""
    with wds.TarWriter(str(tmp_path / "big.tar")) as tar:
        for i in range(20):
            tar.write({"__key__": f"s{i:02d}", "jpg": random.Random(i).randbytes(50_000), "txt": f"caption {i}"})
    size = (tmp_path / "big.tar").stat().st_size
    slog = SampleLog("t")
    with serve(tmp_path, {"big.tar": [f"drop:{size * 6 // 10}"]}) as srv:
        keys = [r["key"] for r in read_shard(srv.url + "/big.tar", "big", 0, 20, slog, retry=FAST)]
        assert srv.count("big.tar") == 2
    assert keys == [f"s{i:02d}" for i in range(20)]
    assert slog.counts["retries"] == 1 and 5 <= slog.counts["retry_reread_samples"] <= 12, slog.counts


def test_a_range_mid_shard(packed):
    """A range that starts mid-shard: the members before it are read past (a stream cannot seek),
    nothing of them is handed out, and the range ends at its last sample, locally and over HTTP."""
    slog = SampleLog("t")
    with serve(packed) as srv:
        for url in (str(packed / "train-000000.tar"), srv.url + "/train-000000.tar"):
            got = list(read_shard(url, "x", 7, 9, slog, retry=FAST))
            assert [(r["index"], r["key"], sorted(r["parts"])) for r in got] == [
                (7, "img7", ["jpg", "json"]),
                (8, "img8", ["jpg", "json"]),
            ]
        assert srv.count("train-000000.tar") == 1 and not slog.counts


@pytest.mark.slow
def test_deepspeed_trains_from_an_http_manifest(tmp_path):
    """`deepspeed launch/train.py ... --data http://127.0.0.1:PORT/manifest.json` on 2 CPU ranks, with
    a 503 on the manifest, a shard whose connection drops mid-way and one answered 503: one full
    epoch, retries counted in the loader's counters, and the final evaluation read over HTTP too."""
    from launch_helpers import explain, read_json, run

    from blip2_dist.data.synthetic import write_synthetic

    shards = tmp_path / "shards"
    write_synthetic(shards, n_train=64, n_val=8, n_test=0, samples_per_shard=16)
    half = (shards / "train-000001.tar").stat().st_size // 2
    faults = {"manifest.json": ["503"], "train-000001.tar": [f"drop:{half}"], "train-000002.tar": ["503"]}
    steps = 20  # 64 images x 5 captions / (2 ranks x 8): one epoch, so the epoch's counters are logged
    with serve(shards, faults) as srv:
        proc = run(
            "launch/train.py",
            [
                "--deepspeed",
                "ds_configs/zero2.json",
                "--model",
                "tiny-t5",
                "--data",
                srv.url + "/manifest.json",
                "--output-dir",
                str(tmp_path / "run"),
                "--micro-batch",
                "8",
                "--num-workers",
                "1",
                "--max-steps",
                str(steps),
                "--save-steps",
                str(steps),
                "--lr",
                "3e-3",
                "--warmup-steps",
                "2",
                "--log-steps",
                "5",
                "--num-beams",
                "1",
                "--max-new-tokens",
                "8",
                "--min-length",
                "1",
                "--eval-batch",
                "8",
                "--data-retries",
                "3",
            ],
            nproc=2,
            timeout=600,
        )
        requests = Counter(name for name, _ in srv.requests)
    assert proc.returncode == 0, explain(proc)
    assert read_json(tmp_path / "run" / "final_state.json")["step"] == steps
    log = proc.stdout + proc.stderr
    assert "returned error: 503" in log and "transfer closed" in log  # each failure named in a warning
    retries = sum(int(n) for n in re.findall(r"loader counters: \{[^}]*'retries': (\d+)", log))
    assert retries == 2  # the drop and the 503, each retried once, counted by the rank that read the shard
    assert requests["train-000001.tar"] >= 2 and requests["val-000000.tar"] >= 2  # val: eval + its id check
    results = read_json(next((tmp_path / "run" / "eval").glob("*/results.json")))
    assert results["images"] == 8  # every val image exactly once, read over HTTP
