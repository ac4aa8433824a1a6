"""Rank-aware evaluation: every rank captions its own images, results are gathered, checked
exactly-once by image id, scored once on rank 0 with the COCO toolkit, and the metrics reach every
rank (so all ranks can pick the best checkpoint together without a hang).

    metrics = evaluate_model(model, processor, data_dir, "val", EvalArgs(), out_dir, step=100, writer=w)

Outputs in `out_dir`: predictions.json (image id -> caption), results.json (per image prediction
and references, metrics, generation settings, which scorers ran), gallery.html.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from blip2_dist import dist
from blip2_dist.config import EvalArgs
from blip2_dist.data.reader import SampleLog, parse_sample, read_shard, resolve_shards
from blip2_dist.data.shards import write_json_atomic
from blip2_dist.data.stream import CaptionFormat, EvalStream, ImageTransform
from blip2_dist.data.urls import DEFAULT_RETRY, RetryPolicy
from blip2_dist.logging import NullWriter
from blip2_dist.metrics import normalize_caption, score_captions_detailed, warm_up_meteor
from blip2_dist.model import generate_captions, unwrap_blip2


class ExactlyOnceError(RuntimeError):
    """Gathered predictions do not cover the split's images exactly once."""


class EvaluationInterrupted(Exception):
    """A stop signal (preemption) reached some rank during generation; raised on every rank."""
class EvaluationError(RuntimeError):
    """Rank 0's scoring (or writing its results) failed; raised on every rank with rank 0's message."""


def generation_kwargs(args: EvalArgs) -> dict:
    return dict(
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_length, repetition_penalty=args.repetition_penalty,
    )


def generation_record(args: EvalArgs, fmt: CaptionFormat) -> dict:
    """The generation settings as results.json records them, the end-of-caption token included."""
    return {**asdict(args), "eos_token_id": fmt.end_id,
            "end_of_caption": fmt.tokenizer.convert_ids_to_tokens(fmt.end_id)}


def _dummy_batch(fmt: CaptionFormat, size: int) -> dict:
    """A one-image batch for a rank that ran out while others still generate (ZeRO-3 lock-step)."""
    return {"pixel_values": torch.zeros(1, 3, size, size), **fmt.encode_prompts(1)}


def generate_rank(model, processor, stream: EvalStream, fmt: CaptionFormat, args: EvalArgs, device: torch.device,
                  lockstep: bool, should_stop: Callable[[], bool] | None = None,
                  ) -> tuple[dict[str, str], dict[str, list[str]], list]:
    """This rank's captions. With `lockstep` (ZeRO-3: parameters are gathered collectively), a
    rank without batches keeps running dummy generations until every rank is done.

    With `should_stop` (the trainer's stop flag), the ranks agree before every batch whether any
    of them was asked to stop, and all raise EvaluationInterrupted together: a preemption signal
    waits for one generation batch, not for the whole evaluation. Ranks out of images then wait in
    that agreement (one small all-reduce per batch) instead of at the gather."""
    preds: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    gallery: list[tuple[str, np.ndarray]] = []
    dtype = next(p for p in model.parameters()).dtype
    gen = generation_kwargs(args)
    if lockstep:
        gen["synced_gpus"] = True
    it = iter(stream)
    dummy = _dummy_batch(fmt, stream.image_size) if lockstep else None
    agree = lockstep or should_stop is not None
    while True:
        batch = next(it, None)
        if agree:
            asked = should_stop is not None and should_stop()
            more, stop = dist.all_reduce_max_many([batch is not None, asked])
            if stop:
                raise EvaluationInterrupted(f"stop requested during evaluation (rank {dist.get_rank()})")
            if not more:
                break
        if batch is None and not lockstep:
            if agree:
                continue  # wait in the agreement for the ranks that still have images
            break
        real = batch is not None
        b = batch if real else dummy
        captions = generate_captions(
            model, processor, b["pixel_values"].to(device, dtype), b["input_ids"].to(device),
            b["attention_mask"].to(device), **gen,
        )
        if not real:
            continue
        for image_id, caption, references in zip(b["image_ids"], captions, b["references"]):
            if image_id in preds:
                raise ExactlyOnceError(f"image {image_id!r} came twice from the stream on rank {dist.get_rank()}")
            preds[image_id] = caption
            refs[image_id] = references
        if len(gallery) < args.gallery_images:
            for image_id, pixels in zip(b["image_ids"], b["pixel_values"]):
                gallery.append((image_id, _to_uint8(pixels, stream.transform)))
    return preds, refs, gallery[: args.gallery_images]


def _to_uint8(pixels: torch.Tensor, transform: ImageTransform) -> np.ndarray:
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    img = (pixels.float().cpu() * std + mean).clamp(0, 1) * 255
    return img.round().byte().numpy()  # CHW


def expected_image_ids(data_dir: str, split: str, retry: RetryPolicy = DEFAULT_RETRY) -> list[str]:
    """The split's image ids, from the samples' json/txt parts (images are read past, not kept)."""
    slog = SampleLog("expected ids")
    ids = []
    for shard in resolve_shards(data_dir, split, retry):
        for raw in read_shard(shard.url, shard.name, 0, shard.samples, slog, parts=("json", "txt"), retry=retry):
            try:
                ids.append(parse_sample(raw["parts"], raw["key"])[0])
            except (ValueError, UnicodeDecodeError):  # the eval stream skips (and counts) it too
                continue
    return ids


def merge_exactly_once(gathered: list[tuple[dict, dict]], expected: list[str]) -> tuple[dict, dict]:
    """Union of every rank's results; a duplicate or missing image is an error naming the ids."""
    preds: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    dups: list[str] = []
    for rank_preds, rank_refs in gathered:
        for image_id, caption in rank_preds.items():
            if image_id in preds:
                dups.append(image_id)
            preds[image_id] = caption
            refs[image_id] = rank_refs[image_id]
    missing = sorted(set(expected) - set(preds))
    extra = sorted(set(preds) - set(expected))
    problems = []
    for what, ids in (("duplicated", dups), ("missing", missing), ("unexpected", extra)):
        if ids:
            problems.append(f"{len(ids)} {what}: {', '.join(map(repr, ids[:10]))}{' ...' if len(ids) > 10 else ''}")
    if problems:
        raise ExactlyOnceError("evaluation did not see every image exactly once: " + "; ".join(problems))
    return preds, refs


def evaluate_model(model, processor, data_dir: str, split: str, args: EvalArgs, out_dir: str | Path,
                   step: int = 0, writer=None, lockstep: bool = False, num_workers: int = 1,
                   prompt: str = "", should_stop: Callable[[], bool] | None = None,
                   retry: RetryPolicy = DEFAULT_RETRY) -> dict[str, float]:
    """Generate on every rank, gather, check, score on rank 0; the metrics are returned on all ranks.
    `should_stop`: see generate_rank (EvaluationInterrupted on every rank). `retry`: remote reads."""
    writer = writer or NullWriter()
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    fmt = CaptionFormat.from_processor(processor, model.config, prompt=prompt)
    stream = EvalStream(
        data_dir, split, fmt, ImageTransform.from_processor(processor), batch_size=args.eval_batch,
        rank=dist.get_rank(), world_size=dist.get_world_size(), num_workers=num_workers,
        max_images=args.max_eval_images or None, retry=retry,
    )
    if dist.get_rank() == 0:
        print(f"eval step {step} [{split}]: captioning {stream.total_images} images on {dist.get_world_size()} "
              "rank(s)", flush=True)
        warm_up_meteor()  # the JVM (~6-11 s) starts while the captions are generated
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _gathered_query_tokens(model, enabled=lockstep):
            preds, refs, gallery = generate_rank(model, processor, stream, fmt, args, device, lockstep,
                                                 should_stop)
    finally:
        model.train(was_training)
    gathered = dist.all_gather_object((preds, refs))
    result = None
    if dist.get_rank() == 0:
        try:
            result = _score_and_write(gathered, data_dir, split, args, fmt, Path(out_dir), step, gallery, writer, t0,
                                      retry)
        except Exception as err:  # noqa: BLE001 - the other ranks wait in the broadcast below: tell them
            dist.broadcast_object({"error": f"evaluation at step {step} failed on rank 0: {type(err).__name__}: {err}"})
            raise  # here with its traceback; the other ranks raise EvaluationError with its message
    result = dist.broadcast_object(result)
    if "error" in result:
        raise EvaluationError(result["error"])
    return result


def _gathered_query_tokens(model, enabled: bool):
    """ZeRO-3 gathers a module's parameters when its forward runs, but BLIP-2's generate() reads
    query_tokens (a bare parameter of the top module) outside any forward: gather it for the whole
    generation. It is usually still there from training, but not after an adapter export, which
    gathers and then re-partitions every parameter."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([unwrap_blip2(model).query_tokens], modifier_rank=None)


def _score_and_write(gathered, data_dir, split, args, fmt, out_dir: Path, step, gallery, writer, t0,
                     retry) -> dict:
    expected = expected_image_ids(data_dir, split, retry)
    if args.max_eval_images:
        expected = expected[: args.max_eval_images]
    preds, refs = merge_exactly_once(gathered, expected)
    scores, info = score_captions_detailed(preds, refs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "predictions.json", {k: normalize_caption(v) for k, v in sorted(preds.items())})
    write_json_atomic(out_dir / "results.json", {
        "step": step, "split": split, "images": len(preds), "metrics": scores,
        "generation": generation_record(args, fmt), "scoring": _jsonable(info),
        "per_image": {k: {"prediction": preds[k], "references": refs[k]} for k in sorted(preds)},
    })
    (out_dir / "gallery.html").write_text(_gallery_html(gallery, preds, refs, scores, step), encoding="utf-8")
    writer.scalars(scores, step, prefix="eval/")
    for image_id, chw in gallery[:4]:
        writer.image(f"eval_images/{image_id}", chw, step)
        writer.text(f"eval_captions/{image_id}", f"**generated:** {preds[image_id]}  \n**references:** "
                    + " | ".join(refs[image_id]), step)
    writer.flush()
    line = " ".join(f"{k} {v:.4f}" for k, v in scores.items())
    print(f"eval step {step} [{split}, {len(preds)} images, {time.perf_counter() - t0:.1f}s]: {line}", flush=True)
    return scores


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _gallery_html(gallery, preds, refs, scores, step) -> str:
    rows = []
    for image_id, chw in gallery:
        buf = io.BytesIO()
        Image.fromarray(np.transpose(chw, (1, 2, 0))).save(buf, format="JPEG", quality=90)
        src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        ref_items = "".join(f"<li>{html.escape(r)}</li>" for r in refs[image_id])
        rows.append(
            f'<div class="c"><img src="{src}"><p><b>{html.escape(preds[image_id])}</b></p>'
            f"<small>{html.escape(image_id)}</small><ul>{ref_items}</ul></div>"
        )
    metrics = " · ".join(f"{k} {v:.3f}" for k, v in scores.items())
    return (
        "<!doctype html><meta charset='utf-8'><title>blip2-dist eval</title><style>"
        "body{font-family:sans-serif} .c{display:inline-block;width:260px;vertical-align:top;margin:8px}"
        "img{width:256px;image-rendering:pixelated}</style>"
        f"<h2>step {step}</h2><p>{html.escape(metrics)}</p>" + "".join(rows)
    )


def evaluate_in_training(trainer, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Called by the trainer on every rank at --eval-steps and at the end."""
    cfg = trainer.cfg
    lockstep = trainer.engine.zero_optimization_stage() == 3
    return evaluate_model(
        trainer.model, trainer.processor, cfg.data.data, cfg.data.eval_split, cfg.eval,
        trainer.out / "eval" / f"{trainer.state.step:08d}", step=trainer.state.step,
        writer=trainer.writer, lockstep=lockstep, num_workers=min(cfg.data.num_workers, 1),
        prompt=cfg.data.prompt, should_stop=should_stop, retry=RetryPolicy(retries=cfg.data.data_retries),
    )
