"""Rank-aware evaluation: every rank captions its own images, results are gathered, checked
exactly-once by image id, scored once on rank 0 with the COCO toolkit, and the metrics reach every
rank (so all ranks can pick the best checkpoint together without a hang).

    metrics = evaluate_model(model, processor, data_dir, "val", EvalArgs(), out_dir, step=100, writer=w)

One pass over the split does two things per batch: beam-search captions (scored with the COCO
toolkit), and the teacher-forced loss of every reference caption of the batch's images (the
validation loss, "loss" in the metrics: the summed token losses of all ranks over their token count,
the same token-level cross-entropy as the training loss). Each image is read once, on one rank.

Outputs in `out_dir`: predictions.json (image id -> caption), results.json (what was evaluated, per
image prediction and references, metrics, validation loss, prompt and generation settings, which
scorers ran), gallery.html with gallery/*.jpg. TensorBoard: `<Split>/<metric>` and `<Split>/loss`
scalars (e.g. Val/CIDEr: capitalised so these groups sort before the lowercase ones and open first),
caption cards `gallery/<Split>/<image id>` and a table `gallery/<Split>` (see blip2_dist.gallery).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blip2_dist import dist
from blip2_dist.caption_tokens import normalize_caption
from blip2_dist.captioning import caption_forward, generate_captions
from blip2_dist.config import Config, EvalArgs
from blip2_dist.data.eval_stream import EvalStream
from blip2_dist.data.reader import SampleLog, parse_sample, read_shard, resolve_shards
from blip2_dist.data.transforms import IGNORE_INDEX, CaptionFormat, ImageTransform
from blip2_dist.data.urls import DEFAULT_RETRY, RetryPolicy
from blip2_dist.errors import UserError
from blip2_dist.gallery import (
    caption_card,
    gallery_markdown,
    save_gallery_images,
    write_eval_page,
    write_run_page,
)
from blip2_dist.io import write_json_atomic
from blip2_dist.lora import unwrap_blip2
from blip2_dist.meteor import warm_up_meteor
from blip2_dist.metrics import score_captions_detailed
from blip2_dist.tensorboard import NullWriter, split_group


class ExactlyOnceError(UserError):
    """Gathered predictions do not cover the split's images exactly once."""


class EvaluationInterrupted(Exception):
    """A stop signal (preemption) reached some rank during generation; raised on every rank."""


class EvaluationError(UserError):
    """Rank 0's scoring (or writing its results) failed; raised on the other ranks with rank 0's
    message, one line each (rank 0 raises the original error): each rank's log says why it stopped."""


def generation_kwargs(args: EvalArgs) -> dict:
    return args.generation()


def generation_record(args: EvalArgs, fmt: CaptionFormat) -> dict:
    """The generation settings as results.json records them, the end-of-caption token included."""
    return {
        **asdict(args),
        "eos_token_id": fmt.end_id,
        "end_of_caption": fmt.tokenizer.convert_ids_to_tokens(fmt.end_id),
    }


def _dummy_batch(fmt: CaptionFormat, size: int) -> dict:
    """A one-image batch for a rank that ran out while others still generate (ZeRO-3 lock-step)."""
    return {"pixel_values": torch.zeros(1, 3, size, size), "references": [["a"]], **fmt.encode_prompts(1)}


def reference_loss(model, fmt: CaptionFormat, batch: dict) -> tuple[float, int]:
    """(summed token loss, tokens) of all reference captions of the batch's images, teacher-forced with
    the training loss's labels (prompt and image tokens masked; the caption and its end token count).
    The cross-entropy runs in float32 (T5's own loss would stay in bf16: steps of 1/32 near 5 nats)."""
    captions, image_index = [], []
    for row, references in enumerate(batch["references"]):
        captions += references
        image_index += [row] * len(references)
    text = fmt.encode_train(captions)
    inputs = {"pixel_values": batch["pixel_values"], "image_index": torch.tensor(image_index), **text}
    logits = caption_forward(model, inputs).logits.float()
    labels = text["labels"].to(logits.device)
    if fmt.decoder_only:  # position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((labels != IGNORE_INDEX).sum())


def generate_rank(
    model,
    processor,
    stream: EvalStream,
    fmt: CaptionFormat,
    args: EvalArgs,
    device: torch.device,
    lockstep: bool,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, str], dict[str, list[str]], list, list]:
    """This rank's captions, gallery images and [summed reference loss, tokens]. With `lockstep`
    (ZeRO-3: parameters are gathered collectively), a rank without batches keeps running dummy
    generations and losses until every rank is done.

    With `should_stop` (the trainer's stop flag), the ranks agree before every batch whether any
    of them was asked to stop, and all raise EvaluationInterrupted together: a preemption signal
    waits for one generation batch, not for the whole evaluation. Ranks out of images then wait in
    that agreement (one small all-reduce per batch) instead of at the gather."""
    preds: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    gallery: list[tuple[str, np.ndarray]] = []
    loss = [0.0, 0]
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
        with _gathered_query_tokens(model, enabled=lockstep):
            captions = generate_captions(
                model,
                processor,
                b["pixel_values"].to(device, dtype),
                b["input_ids"].to(device),
                b["attention_mask"].to(device),
                **gen,
            )
            batch_loss, tokens = reference_loss(model, fmt, b)
        if not real:
            continue
        loss[0] += batch_loss
        loss[1] += tokens
        for image_id, caption, references in zip(b["image_ids"], captions, b["references"]):
            if image_id in preds:
                raise ExactlyOnceError(f"image {image_id!r} came twice from the stream on rank {dist.get_rank()}")
            preds[image_id] = caption
            refs[image_id] = references
        # The gallery shows the split's first images: rank r holds images start.. (contiguous ranges).
        if stream.start + len(gallery) < args.gallery_images:
            for image_id, pixels in zip(b["image_ids"], b["pixel_values"]):
                gallery.append((image_id, _to_uint8(pixels, stream.transform)))
    return preds, refs, gallery[: max(0, args.gallery_images - stream.start)], loss


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
        hint = " (an image the loader could not read is missing: a warning above names its shard and key)"
        raise ExactlyOnceError(
            "evaluation did not see every image exactly once: " + "; ".join(problems) + (hint if missing else "")
        )
    return preds, refs


def evaluate_model(
    model,
    processor,
    data_dir: str,
    split: str,
    args: EvalArgs,
    out_dir: str | Path,
    step: int = 0,
    writer=None,
    lockstep: bool = False,
    num_workers: int = 1,
    prompt: str = "",
    should_stop: Callable[[], bool] | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_caption_tokens: int = 64,
    source: dict | None = None,
    run_page: str | None = None,
) -> dict[str, float]:
    """Generate and take the reference loss on every rank, gather, check, score on rank 0; the metrics
    ("loss" included) are returned on all ranks. `should_stop`: see generate_rank (EvaluationInterrupted
    on every rank). `retry`: remote reads. source: what is evaluated, for results.json and the gallery
    ({"label", "model", "adapter", ...}); run_page: relative link to the run's comparison page."""
    writer = writer or NullWriter()
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    fmt = CaptionFormat.from_processor(processor, model.config, prompt=prompt, max_caption_tokens=max_caption_tokens)
    stream = EvalStream(
        data_dir,
        split,
        fmt,
        ImageTransform.from_processor(processor),
        batch_size=args.eval_batch,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        num_workers=num_workers,
        max_images=args.max_eval_images or None,
        retry=retry,
    )
    if dist.get_rank() == 0:
        print(
            f"eval step {step} [{split}]: captioning {stream.total_images} images on {dist.get_world_size()} rank(s)",
            flush=True,
        )
        warm_up_meteor()  # the JVM (~6-11 s) starts while the captions are generated
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            preds, refs, gallery, loss = generate_rank(
                model, processor, stream, fmt, args, device, lockstep, should_stop
            )
    finally:
        model.train(was_training)
    gathered = dist.all_gather_object((preds, refs, loss, gallery))
    result = None
    if dist.get_rank() == 0:
        context = {"source": source or {}, "prompt": prompt, "run_page": run_page, "t0": t0, "retry": retry}
        try:
            result = _score_and_write(gathered, data_dir, split, args, fmt, Path(out_dir), step, writer, context)
        except Exception as err:  # noqa: BLE001 - the other ranks wait in the broadcast below: tell them
            dist.broadcast_object({"error": f"evaluation at step {step} failed on rank 0: {type(err).__name__}: {err}"})
            raise  # here with its traceback; the other ranks raise EvaluationError with its message
    result = dist.broadcast_object(result)
    if "error" in result:
        raise EvaluationError(result["error"])
    return result


def _gathered_query_tokens(model, enabled: bool):
    """ZeRO-3 gathers a module's parameters when its forward runs, but BLIP-2's generate() and the grouped
    image path of the reference loss read query_tokens (a bare parameter of the top module) outside any
    forward, and a forward of the top module leaves it partitioned again: gather it for each batch's
    generation and loss. Collective: under ZeRO-3 every rank runs every batch in lock-step."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([unwrap_blip2(model).query_tokens], modifier_rank=None)


def _score_and_write(gathered, data_dir, split, args, fmt, out_dir: Path, step, writer, context) -> dict:
    expected = expected_image_ids(data_dir, split, context["retry"])
    if args.max_eval_images:
        expected = expected[: args.max_eval_images]
    preds, refs = merge_exactly_once([(p, r) for p, r, _, _ in gathered], expected)
    scores, info = score_captions_detailed(preds, refs)
    loss_sum, tokens = sum(g[2][0] for g in gathered), sum(g[2][1] for g in gathered)
    gallery = [item for g in gathered for item in g[3]][: args.gallery_images]  # rank order = split order
    metrics = {**scores, "loss": loss_sum / max(tokens, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = save_gallery_images(out_dir, gallery)
    source = context["source"]
    label = source.get("label") or f"step {step}"
    write_json_atomic(out_dir / "predictions.json", {k: normalize_caption(v) for k, v in sorted(preds.items())})
    write_json_atomic(
        out_dir / "results.json",
        {
            "label": label,
            "source": source,
            "step": step,
            "split": split,
            "images": len(preds),
            "metrics": metrics,
            "loss": {"value": metrics["loss"], "tokens": tokens, "captions": sum(map(len, refs.values()))},
            "prompt": context["prompt"],
            "generation": generation_record(args, fmt),
            "scoring": _jsonable(info),
            "gallery": saved,
            "per_image": {k: {"prediction": preds[k], "references": refs[k]} for k in sorted(preds)},
        },
    )
    per_image = info.get("per_image", {})
    items = [
        {
            **s,
            "generated": preds[s["image_id"]],
            "references": refs[s["image_id"]],
            "CIDEr": _fmt(per_image.get(s["image_id"], {}).get("CIDEr")),
        }
        for s in saved
    ]
    header = _gallery_header(label, split, step, len(preds), context["prompt"], args, metrics, source)
    write_eval_page(out_dir, items, header, context["run_page"])
    _log_tensorboard(writer, split, step, metrics, gallery, items, header)
    line = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(
        f"eval step {step} [{split}, {len(preds)} images, {time.perf_counter() - context['t0']:.1f}s]: {line}",
        flush=True,
    )
    return metrics


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _gallery_header(label, split, step, images, prompt, args: EvalArgs, metrics, source) -> dict:
    return {
        "evaluated": label,
        "model": source.get("model"),
        "adapter": source.get("adapter"),
        "split": split,
        "step": step,
        "images": images,
        "prompt": repr(prompt) if prompt else "(none)",
        "generation": ", ".join(f"{k}={v}" for k, v in args.generation().items()),
        "metrics": " · ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
    }


def _log_tensorboard(writer, split, step, metrics, gallery, items, header) -> None:
    group = split_group(split)
    writer.scalars(metrics, step, prefix=f"{group}/")
    label = header["evaluated"]
    title = f"{split} · step {step}" + ("" if label == f"step {step}" else f" · {label}")
    for (image_id, chw), item in zip(gallery, items):
        card = caption_card(
            chw,
            item["generated"],
            item["references"],
            title=title,
            score=f"CIDEr {item['CIDEr']}" if item["CIDEr"] else "",
        )
        writer.image(f"gallery/{group}/{image_id}", card, step)
    writer.text(f"gallery/{group}", gallery_markdown(items, header), step)
    writer.flush()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def evaluate_in_training(
    model,
    processor,
    cfg: Config,
    run_dir: Path,
    step: int,
    writer: NullWriter,
    *,
    lockstep: bool,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Called by the trainer on every rank at --eval-steps and at the end: the run's --eval-split into
    `run_dir/eval/<step>`; rank 0 then refreshes the run's comparison page (run_dir/gallery.html).
    `lockstep`: every rank runs every batch together (ZeRO-3, whose forwards are collective)."""
    metrics = evaluate_model(
        model,
        processor,
        cfg.data.data,
        cfg.data.eval_split,
        cfg.eval,
        run_dir / "eval" / f"{step:08d}",
        step=step,
        writer=writer,
        lockstep=lockstep,
        num_workers=min(cfg.data.num_workers, 1),
        prompt=cfg.data.prompt,
        should_stop=should_stop,
        retry=RetryPolicy(retries=cfg.data.data_retries),
        max_caption_tokens=cfg.data.max_caption_tokens,
        source={"label": f"step {step}", "model": cfg.model.model, "adapter": "(training)"},
        run_page="../../gallery.html",
    )
    if dist.get_rank() == 0:
        write_run_page(run_dir)
    return metrics
