"""Rank-aware evaluation: 2 real gloo ranks on an odd, uneven split; exactly-once; toolkit equality;
no Java; ZeRO-3 lock-step generation inside training."""

from __future__ import annotations

import json

import pytest
from launch_helpers import explain, read_json, run
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from blip2_dist.evaluate import ExactlyOnceError, expected_image_ids, merge_exactly_once

GEN = ["--num-beams", "2", "--max-new-tokens", "8", "--min-length", "1", "--eval-batch", "2"]


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """7 val images in shards of 3 (3+3+1): odd and uneven over 2 ranks."""
    from blip2_dist.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("seven")
    write_synthetic(out, n_train=64, n_val=7, n_test=1, seed=3, samples_per_shard=3)
    return out


def toolkit_scores(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """The COCOEvalCap flow, called directly."""
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in sorted(refs)})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in sorted(preds)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        m, _ = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.kill()
    return {
        "BLEU-1": bleu[0],
        "BLEU-2": bleu[1],
        "BLEU-3": bleu[2],
        "BLEU-4": bleu[3],
        "METEOR": m,
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


def test_merge_catches_duplicates_and_gaps():
    refs = {"a": ["x"], "b": ["y"], "c": ["z"]}
    ok = merge_exactly_once([({"a": "1", "b": "2"}, refs), ({"c": "3"}, refs)], ["a", "b", "c"])
    assert ok[0] == {"a": "1", "b": "2", "c": "3"}
    with pytest.raises(ExactlyOnceError, match=r"1 duplicated: 'b'"):
        merge_exactly_once([({"a": "1", "b": "2"}, refs), ({"b": "2", "c": "3"}, refs)], ["a", "b", "c"])
    with pytest.raises(ExactlyOnceError, match=r"1 missing: 'c'"):
        merge_exactly_once([({"a": "1"}, refs), ({"b": "2"}, refs)], ["a", "b", "c"])
    with pytest.raises(ExactlyOnceError, match=r"1 unexpected: 'd'"):
        merge_exactly_once([({"a": "1", "b": "2", "c": "3"}, refs), ({"d": "4"}, {"d": ["w"]})], ["a", "b", "c"])


def single_process_reference_loss(data_dir, split):
    """The validation loss computed here in one process over every image of the split at once."""
    import torch

    from blip2_dist.data.eval_stream import EvalStream
    from blip2_dist.data.transforms import CaptionFormat, ImageTransform
    from blip2_dist.evaluate import reference_loss
    from blip2_dist.models import load_model

    model, processor = load_model("tiny-t5", dtype=torch.float32)
    fmt = CaptionFormat.from_processor(processor, model.config)
    stream = EvalStream(
        str(data_dir),
        split,
        fmt,
        ImageTransform.from_processor(processor),
        batch_size=100,
        rank=0,
        world_size=1,
        num_workers=0,
    )
    total, tokens, captions = 0.0, 0, 0
    with torch.no_grad():
        for batch in stream:
            batch_total, batch_tokens = reference_loss(model.eval(), fmt, batch)
            total, tokens = total + batch_total, tokens + batch_tokens
            captions += sum(map(len, batch["references"]))
    return total / tokens, captions


@pytest.mark.slow
def test_two_ranks_seven_images_exactly_once_and_toolkit_equal(seven, tmp_path):
    proc = run(
        "launch/evaluate.py",
        [
            "--model",
            "tiny-t5",
            "--data",
            str(seven),
            "--split",
            "val",
            "--output-dir",
            str(tmp_path),
            "--dtype",
            "float32",
            *GEN,
        ],
        nproc=2,
    )
    assert proc.returncode == 0, explain(proc)
    saved = read_json(tmp_path / "eval_config.json")  # the resolved options, beside the results
    assert saved["data"]["num_workers"] == 2 and saved["inference"]["dtype"] == "float32"
    assert saved["eval"]["num_beams"] == 2 and saved["model"]["model"] == "tiny-t5"
    ids = expected_image_ids(str(seven), "val")
    preds = read_json(tmp_path / "predictions.json")
    results = read_json(tmp_path / "results.json")
    assert sorted(preds) == sorted(ids) and len(ids) == 7
    per_image = results["per_image"]
    raw = {k: v["prediction"] for k, v in per_image.items()}
    refs = {k: v["references"] for k, v in per_image.items()}
    expected = toolkit_scores(raw, refs)
    scores = {k: v for k, v in results["metrics"].items() if k != "loss"}
    assert scores == pytest.approx(expected, rel=0, abs=0)
    # Validation loss: 2 ranks x batches of 2 images = every reference caption of every image, once.
    loss, captions = single_process_reference_loss(seven, "val")
    assert results["loss"]["captions"] == captions == sum(len(v) for v in refs.values())
    assert results["metrics"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert results["scoring"]["tokenizer"] == "ptb" and results["images"] == 7
    assert "BLEU-4" in (tmp_path / "gallery.html").read_text()


def test_java_missing_still_scores(seven, tmp_path, monkeypatch):
    from blip2_dist.config import EvalArgs
    from blip2_dist.evaluate import evaluate_model
    from blip2_dist.models import load_model

    model, processor = load_model("tiny-t5", dtype=__import__("torch").float32)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java anywhere on PATH
    args = EvalArgs(num_beams=1, max_new_tokens=6, min_length=1, eval_batch=4)
    metrics = evaluate_model(model, processor, str(seven), "val", args, tmp_path / "out", num_workers=0)
    assert "METEOR" not in metrics and {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(metrics)
    scoring = read_json(tmp_path / "out" / "results.json")["scoring"]
    assert scoring["tokenizer"] == "python-fallback" and scoring["paper_comparable"] is False
    assert "java" in scoring["unavailable"]["METEOR"]


@pytest.mark.slow
def test_zero3_training_eval_keeps_ranks_in_lockstep(seven, tmp_path):
    # eval batch 1 over 7 images: rank 0 generates 4 batches, rank 1 only 3, under ZeRO-3 where
    # every forward gathers parameters collectively. Without lock-step this hangs.
    args = [
        "--deepspeed",
        "ds_configs/zero3.json",
        "--model",
        "tiny-t5",
        "--data",
        str(seven),
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "3",
        "--micro-batch",
        "4",
        "--num-workers",
        "0",
        "--save-steps",
        "100",
        "--warmup-steps",
        "1",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "6",
        "--min-length",
        "1",
        "--eval-batch",
        "1",
    ]
    proc = run("launch/train.py", args, nproc=2, timeout=600)
    assert proc.returncode == 0, explain(proc)
    results = read_json(tmp_path / "eval" / "00000003" / "results.json")
    assert results["images"] == 7 and results["loss"]["captions"] == 7 * 5  # the loss took lock-step too
    adapter = tmp_path / "checkpoints" / "step_00000003" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # gathered, not empty partitions
