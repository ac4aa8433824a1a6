"""The streaming loader: exactly-once epochs, equal steps, resume, eval split, bad samples, formats.

Ranks are simulated by building the stream with rank=0/1 in one process; the DataLoader workers are
real processes. Shards are written with tests/shard_factory.py (exact shard sizes, small JPEGs).
"""

import io
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from shard_factory import jpeg_bytes, write_shards

from blip2_dist.data.eval_stream import EvalStream
from blip2_dist.data.reader import resolve_shards
from blip2_dist.data.stream import TrainStream
from blip2_dist.data.synthetic import natural_image
from blip2_dist.data.transforms import CaptionFormat, ImageTransform


def _all_captions(n, caps=lambda i: 5):
    return Counter(f"img{i} cap {j}" for i in range(n) for j in range(caps(i)))


def _run(src, fmt, tf, world=2, workers=2, epoch=0, **kw):
    streams = [
        TrainStream(str(src), "train", fmt, tf, rank=r, world_size=world, num_workers=workers, **kw)
        for r in range(world)
    ]
    batches = [list(s.epoch(epoch)) for s in streams]
    return streams, batches


def _check_batch(b, micro_batch):
    assert b["num_examples"] == len(b["captions"]) == b["input_ids"].shape[0] == micro_batch
    assert b["pixel_values"].shape == (len(b["image_ids"]), 3, 64, 64) and b["pixel_values"].dtype == torch.float32
    for cap, row in zip(b["captions"], b["image_index"].tolist()):  # every example points at its image
        assert cap.split()[0] == b["image_ids"][row]


def test_exactly_once_when_counts_divide(tmp_path, fmt_tf):
    src = write_shards(tmp_path, [9, 6, 5])  # 20 images x 5 captions, 4 slots of 5 images = 25 captions
    streams, batches = _run(src, *fmt_tf, micro_batch=5)
    assert [s.steps_per_epoch for s in streams] == [10, 10] == [len(b) for b in batches]
    assert streams[0].dropped_examples_per_epoch == 0 and streams[0].examples_per_epoch == 100
    seen = Counter(c for rank in batches for b in rank for c in b["captions"])
    assert seen == _all_captions(20)
    for b in batches[0] + batches[1]:
        _check_batch(b, 5)


@pytest.mark.parametrize("shards,world,workers", [([7, 3, 1, 12], 2, 2), ([17], 2, 2), ([1, 1, 9], 3, 0)])
def test_equal_steps_and_counted_drop(tmp_path, fmt_tf, shards, world, workers):
    caps = lambda i: 3 + i % 4  # noqa: E731 - 3..6 captions per image
    n = sum(shards)
    src = write_shards(tmp_path, shards, caps)
    for mode in ("all", "random"):
        mb = 4 if mode == "all" else 2
        streams, batches = _run(src, *fmt_tf, world=world, workers=workers, micro_batch=mb, caption_mode=mode)
        steps = {s.steps_per_epoch for s in streams}
        assert len(steps) == 1 and [len(b) for b in batches] == [steps.pop()] * world
        seen = Counter(c for rank in batches for b in rank for c in b["captions"])
        assert max(seen.values()) == 1  # no duplicates
        assert set(seen) <= set(_all_captions(n, caps))
        s = streams[0]
        total = sum(caps(i) for i in range(n)) if mode == "all" else n
        assert sum(seen.values()) == s.examples_per_epoch == total - s.dropped_examples_per_epoch
        if mode == "random":  # one caption per image
            assert max(Counter(c.split()[0] for c in seen).values()) == 1


def test_epochs_reorder_same_set(tmp_path, fmt_tf):
    src = write_shards(tmp_path, [9, 6, 5])
    _, e0 = _run(src, *fmt_tf, micro_batch=5, epoch=0)
    _, e1 = _run(src, *fmt_tf, micro_batch=5, epoch=1)
    flat = lambda bs: [c for rank in bs for b in rank for c in b["captions"]]  # noqa: E731
    assert flat(e0) != flat(e1) and Counter(flat(e0)) == Counter(flat(e1))


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("workers,augment", [(2, False), (0, True)])
def test_resume_equals_uninterrupted(tmp_path, tiny, fmt_tf, workers, augment):
    src = write_shards(tmp_path, [8, 6, 3])
    fmt, _ = fmt_tf
    tf = ImageTransform.from_processor(tiny["opt"][1], augment=augment)  # augmentation is seeded per image

    def make():
        return TrainStream(
            str(src),
            "train",
            fmt,
            tf,
            micro_batch=3,
            rank=1,
            world_size=2,
            num_workers=workers,
            seed=7,
            shuffle_buffer=4,
        )

    stream = make()
    full = list(stream.epoch(2))
    assert len(full) == stream.steps_per_epoch >= 5
    for k in (1, 2, 3, stream.steps_per_epoch - 1, stream.steps_per_epoch):
        rest = list(make().epoch(2, start_batch=k))
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            _equal(a, b)
    # Through the checkpoint state: stop after 3 batches, save, resume in a fresh stream.
    it = stream.epoch(2)
    for _ in range(3):
        next(it)
    state = stream.state_dict()
    it.close()
    fresh = make()
    fresh.load_state_dict(state)
    for a, b in zip(fresh.resume(), full[3:]):
        _equal(a, b)
    assert fresh.state.epoch == 3 and fresh.state.batch == 0


def test_uint8_pixels_for_the_device(tmp_path, fmt_tf):
    src = write_shards(tmp_path, [6])
    fmt, tf = fmt_tf
    kw = dict(micro_batch=5, rank=0, world_size=1, num_workers=0)
    ref = list(TrainStream(str(src), "train", fmt, tf, **kw).epoch(0))
    raw = list(TrainStream(str(src), "train", fmt, tf, normalize=False, **kw).epoch(0))
    for a, b in zip(ref, raw):
        assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape == a["pixel_values"].shape
        assert torch.allclose(tf.normalize_device(b["pixel_values"]), a["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("shards,world", [([3, 1, 3], 3), ([2], 3), ([5, 4], 2)])
def test_eval_every_image_once(tmp_path, fmt_tf, shards, world):
    n = sum(shards)
    src = write_shards(tmp_path, shards, split="val")
    got, per_rank = [], []
    for r in range(world):
        ev = EvalStream(str(src), "val", *fmt_tf, batch_size=2, rank=r, world_size=world, num_workers=2)
        assert ev.total_images == n
        batches = list(ev)
        ids = [i for b in batches for i in b["image_ids"]]
        assert len(ids) == ev.num_images
        per_rank.append(len(ids))
        got += ids
        for b in batches:
            assert b["references"] == [[f"{i} cap {j}" for j in range(5)] for i in b["image_ids"]]
            assert b["input_ids"].shape[0] == b["pixel_values"].shape[0] == len(b["image_ids"])
    assert sorted(got) == sorted(f"img{i}" for i in range(n))
    assert max(per_rank) - min(per_rank) <= 1
    if n < world:
        assert min(per_rank) == 0  # a rank with nothing yields nothing
    # max_images: the split's first images in manifest order, still exactly once.
    first = []
    for r in range(world):
        ev = EvalStream(str(src), "val", *fmt_tf, batch_size=2, rank=r, world_size=world, num_workers=0, max_images=3)
        first += [i for b in ev for i in b["image_ids"]]
    assert sorted(first) == [f"img{i}" for i in range(min(n, 3))]


def _corrupt(path, edits):
    """Rewrite a tar with some members' bytes replaced (None removes the member)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            data = edits.get(m.name, data)
            if data is None:
                continue
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_bad_samples_skipped_counted_no_hang(tmp_path, fmt_tf, caplog):
    src = write_shards(tmp_path, [10, 10])
    good = jpeg_bytes(3, (200, 150))  # big enough that half of it still has a full header
    _corrupt(
        tmp_path / "train-000000.tar",
        {
            "img1.jpg": b"this is not a jpeg",  # fails at the header check
            "img3.jpg": good[: len(good) // 2],  # good header, truncated data: fails at decode
            "img5.json": b'{"captions": ["unterminated',  # broken JSON
            "img7.json": None,  # missing part
        },
    )
    bad = {"img1", "img3", "img5", "img7"}
    streams, batches = _run(src, *fmt_tf, micro_batch=5)
    assert [len(b) for b in batches] == [s.steps_per_epoch for s in streams] == [10, 10]
    seen = Counter(c for rank in batches for b in rank for c in b["captions"])
    assert not {c.split()[0] for c in seen} & bad
    stats = [s.last_epoch_stats for s in streams]
    total = Counter()
    for st in stats:
        total.update(st.counts)
    assert total["bad_image"] == total["bad_json"] == total["bad_missing_part"] == 1
    assert total["bad_decode"] >= 1  # img3: every good record of a short slot ends up in a batch
    assert total["repeated_examples"] > 0  # slots shortened by bad samples refill from their start
    assert "loader counters" in caplog.text  # each rank logs its summed counters
    caplog.clear()
    ev = EvalStream(str(src), "train", *fmt_tf, batch_size=4, rank=0, world_size=1, num_workers=0)
    ids = [i for b in ev for i in b["image_ids"]]
    assert sorted(ids) == sorted(f"img{i}" for i in range(20) if f"img{i}" not in bad)
    assert ev.last_stats.bad_samples == 4
    assert "skipping sample in train-000000.tar key 'img5' (json)" in caplog.text


def test_truncated_shard_is_reported(tmp_path, fmt_tf):
    src = write_shards(tmp_path, [10, 10])
    path = tmp_path / "train-000001.tar"
    with open(path, "r+b") as f:  # a partial copy: the second half of the shard is gone
        f.truncate(path.stat().st_size // 2)
    streams, batches = _run(src, *fmt_tf, micro_batch=5)
    assert [len(b) for b in batches] == [s.steps_per_epoch for s in streams] == [10, 10]
    lost = sum(s.last_epoch_stats["bad_tar"] for s in streams)
    ev = EvalStream(str(src), "train", *fmt_tf, batch_size=4, rank=0, world_size=1, num_workers=2)
    seen = sum(len(b["image_ids"]) for b in ev)
    assert ev.last_stats["bad_tar"] == lost == 20 - seen > 0  # every lost sample is counted


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_labels_masked(tiny, family):
    model, processor = tiny[family]
    tok = processor.tokenizer
    fmt = CaptionFormat.from_processor(processor, model.config, prompt="a photo of", max_caption_tokens=8)
    caps = ["a dog on grass", "two red circles", "a very long caption about a man and a woman walking on the beach"]
    enc, truncated = fmt.encode_train_counted(caps)
    assert truncated == 1
    q, img = model.config.num_query_tokens, model.config.image_token_index
    ids, labels, mask = enc["input_ids"], enc["labels"], enc["attention_mask"]
    assert (ids[:, :q] == img).all() and (ids[:, q:] != img).all()
    assert (labels != img).all()
    prompt_ids = tok("a photo of", add_special_tokens=False)["input_ids"]
    for i, cap in enumerate(caps):
        lab = labels[i][labels[i] != -100].tolist()
        assert lab[-1] == tok.eos_token_id and len(lab) <= 8
        text = tok.decode(lab, skip_special_tokens=True).strip()
        assert text == cap if i < 2 else cap.startswith(text)
        if family == "opt":  # image + BOS + prompt + caption + EOS, right padded
            n = int(mask[i].sum())
            assert ids[i, q] == tok.bos_token_id and ids[i, q + 1 : q + 1 + len(prompt_ids)].tolist() == prompt_ids
            assert (labels[i, : q + 1 + len(prompt_ids)] == -100).all()
            assert (ids[i, n:] == tok.pad_token_id).all() and (labels[i, n:] == -100).all()
            assert labels[i, q + 1 + len(prompt_ids) : n].tolist() == lab
        else:  # image + prompt + </s>; labels caption + </s>
            assert ids[i, q:].tolist() == prompt_ids + [tok.eos_token_id] and mask[i].all()
    gen = fmt.encode_prompts(3)
    assert gen["input_ids"].shape[0] == 3 and (gen["input_ids"][:, :q] == img).all()
    # The stream's batch trains the real model (image tokens are where BLIP-2 expects them).
    pv = torch.randn(2, 3, 64, 64)
    out = model(pixel_values=pv[torch.tensor([0, 0, 1])], **enc)
    assert torch.isfinite(out.loss)


def _photo(seed, size, mode="RGB"):
    buf = io.BytesIO()
    natural_image(np.random.default_rng(seed), *size).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_preprocessing_matches_processor(tiny):
    _, processor = tiny["opt"]
    ip = processor.image_processor
    exact = ImageTransform.from_processor(processor, draft=False, backend="pil")
    fast = ImageTransform.from_processor(processor, draft=False)  # torch's uint8 antialiased bicubic
    two_levels = 2 / 255 / min(ip.image_std)
    cases = [jpeg_bytes(1, (120, 90)), jpeg_bytes(2, (40, 70), "L"), jpeg_bytes(3, (50, 50), "CMYK")]  # noise
    cases += [_photo(4, (160, 120)), _photo(5, (90, 130), "L"), _photo(6, (200, 150), "CMYK")]
    for i, data in enumerate(cases):
        ref = ip(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
        ours = exact.normalize([exact.load(data)])
        assert ours.shape == (1, 3, 64, 64) and fast.load(data).shape == (64, 64, 3)
        assert (ours - ref).abs().max() < 1e-5  # PIL backend: the processor's own arithmetic
        if i >= 3:  # photos: within 2 grey levels (pure noise can differ more at single pixels)
            assert (fast.normalize([fast.load(data)]) - ref).abs().max() <= two_levels
    # Draft mode: a 4x larger photo-like JPEG is decoded at 1/2 or 1/4 scale by libjpeg; the result
    # differs only by the downscale filter: mean |diff| 0.037 here (~2.5 grey levels; this synthetic
    # photo has sensor-like noise, where filters differ most), asserted < 0.05.
    data = _photo(7, (400, 300))
    draft = ImageTransform.from_processor(processor, backend="pil", draft=True)  # opt-in (default off)
    assert draft.open(data).size[0] < 400  # draft really triggered
    assert ImageTransform.from_processor(processor, backend="pil").open(data).size[0] == 400
    diff = (draft.normalize([draft.load(data)]) - exact.normalize([exact.load(data)])).abs()
    assert diff.mean() < 0.05


def test_augment_is_seeded_and_shaped(tiny):
    import random

    _, processor = tiny["opt"]
    tf = ImageTransform.from_processor(processor, augment=True)
    data = jpeg_bytes(5, (100, 80))
    a = tf.load(data, random.Random("k"))
    assert a.shape == (64, 64, 3) and np.array_equal(a, tf.load(data, random.Random("k")))
    assert not ImageTransform.from_processor(processor).augment  # off by default


def test_brace_pattern_without_manifest(tmp_path, fmt_tf):
    src = write_shards(tmp_path / "packed", [4, 5, 3])
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        shutil.copy(src / name, bare / name)
    with_manifest = resolve_shards(str(src / "train-{000000..000002}.tar"), "train")
    scanned = resolve_shards(str(bare / "train-{000000..000002}.tar"), "train")
    assert [s.caption_counts for s in scanned] == [s.caption_counts for s in with_manifest]
    assert [s.caption_counts for s in resolve_shards(str(src), "train")] == [s.caption_counts for s in scanned]
    s = TrainStream(
        str(bare / "train-{000000..000002}.tar"), "train", *fmt_tf, micro_batch=5, rank=0, world_size=1, num_workers=0
    )
    assert len(list(s.epoch(0))) == s.steps_per_epoch == 12


def test_too_little_data_is_a_clear_error(tmp_path, fmt_tf):
    src = write_shards(tmp_path, [8])
    with pytest.raises(ValueError, match="split 'train' has 40 captions.*2 ranks x 2 workers x micro-batch 16"):
        TrainStream(str(src), "train", *fmt_tf, micro_batch=16, rank=0, world_size=2, num_workers=2)
