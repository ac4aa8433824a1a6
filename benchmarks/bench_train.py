"""Training benchmark: our trainer step against the Hugging Face PEFT notebook's recipe, in one run.

    python benchmarks/bench.py train --model tiny-t5 --steps 20                     # CPU, about a minute
    python benchmarks/bench.py train --model Salesforce/blip2-opt-2.7b --random-init \\
        --device cuda --dtype bf16 --micro-batch 16 --steps 30                      # one GPU, real sizes
    python benchmarks/bench.py train ... --grad-checkpointing --compile --fused-adamw on --json out.json

Both sides train the same model (tiny built-ins, or the real architectures built with random weights,
no download), in the same dtype, on the same micro-batches (`--micro-batch` captions, 5 per image as in
Flickr8k, whole caption groups, a group may straddle two batches as the shard stream makes them):
  * ours: the real trainer step. `engine.build_model` (LoRA from the trainer's defaults), DeepSpeed
    ZeRO-2 from ds_configs/zero2.json via `engine.build_engine` (one rank; gloo on CPU), and
    `engine.train_step` per micro-batch: `caption_loss` with the vision encoder once per image
    (`--no-group-images` turns it off), captions padded to the batch's longest.
  * baseline: the HF PEFT notebook (peft/Fine_tune_BLIP2_on_an_image_captioning_dataset_PEFT.ipynb): a
    plain PyTorch loop, `peft.get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
    bias="none", target_modules=["q_proj", "k_proj"]))` (T5: ["q", "v"], peft's T5 default; the
    notebook is OPT-only), `torch.optim.AdamW(model.parameters(), lr=5e-5)` (not fused; the notebook's
    Adam costs the same), and `model(input_ids, attention_mask, pixel_values, labels).loss` with one
    image per caption (pixel_values repeated per caption, as its per-item dataset yields them). Its
    text is padded to the batch's longest too (the notebook's collate calls the tokenizer with
    padding=True; its padding="max_length" is on the image-only processor call, where it does
    nothing). It gets our input_ids/labels (image tokens, -100 on padding), which transformers 5
    needs; the notebook's labels=input_ids would change what is learnt, not the cost.
  * --grad-checkpointing / --compile / --fused-adamw apply to ours only: the baseline is the recipe.
    (--grad-checkpointing and --fused-adamw are the trainer's own options, passed through its config.)
Batches are placed on the device before timing (the loader has its own benchmark, `bench.py loader`),
which spares the baseline its 5x larger image copies. Each side runs in its own spawned process (so
peak memory is its own); `--warmup` steps are excluded, then `--steps` steps are timed with the device
synchronised before and after each. `--repeat N` alternates N runs per side and shows each side's
median run (by samples/s): on a shared CPU neighbours' load moves single runs by +-15%.

Reported per side: samples/s (captions, and the images among them), LM tokens/s (attention_mask
ones, plus T5 decoder label tokens), s/step (mean, median), peak memory (CUDA: max allocated;
CPU: the process's peak RSS), FLOPs per step and achieved TFLOP/s (what that side computes), model
TFLOP/s and MFU (the FLOPs the samples need, the image path once per image, against the device's bf16
dense peak in `blip2_dist.flops.PEAK_BF16_TFLOPS`; CPU: no peak, MFU n/a). Then ours/baseline ratios.
The FLOP count and its formula: `blip2_dist/flops.py`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import statistics
import time
from dataclasses import dataclass

import torch

from blip2_dist.config import option
from blip2_dist.data.synthetic import synthetic_batches
from blip2_dist.flops import FlopModel, batch_counts, device_peak_tflops

FLICKR_CAPTIONS_PER_IMAGE = 5
NOTEBOOK_TARGETS = {"opt": ["q_proj", "k_proj"], "t5": ["q", "v"]}


@dataclass
class TrainBenchConfig:
    """`bench.py train`: its flags are generated from these fields (blip2_dist.config.add_section_args)."""

    model: str = option(
        "tiny-t5",
        "tiny-t5 / tiny-opt, or a hub id with --random-init (Salesforce/blip2-opt-2.7b, "
        "Salesforce/blip2-flan-t5-xl), or a local BLIP-2 directory",
    )
    random_init: bool = option(False, "build the real architecture of --model with random weights (no download)")
    device: str = option("auto", "cuda, cuda:N or cpu (auto: cuda if available)")
    dtype: str = option("bf16", "weights and compute dtype, both sides", choices=["bf16", "fp32"])
    micro_batch: int = option(16, "captions per step, both sides", min=1)
    captions_per_image: int = option(FLICKR_CAPTIONS_PER_IMAGE, "caption group size (Flickr8k: 5)", min=1)
    steps: int = option(20, "timed steps per side", min=1)
    warmup: int = option(3, "untimed steps first (compilation, allocator)", min=0)
    seed: int = option(0, "weights, LoRA init, data")
    group_images: bool = option(True, "ours: vision encoder once per image (--no-group-images: once per caption)")
    grad_checkpointing: bool = option(
        False, "ours: activation checkpointing (non-reentrant) in the ViT, Q-Former and LM"
    )
    compile: bool = option(False, "ours: torch.compile the ViT, Q-Former and LM (in place)")
    fused_adamw: str = option(
        "auto",
        "ours: torch AdamW fused kernel (auto: the trainer's choice, fused on CUDA)",
        choices=["auto", "on", "off"],
    )
    baseline: bool = option(True, "also run the notebook baseline (--no-baseline: ours only)")
    isolate: bool = option(True, "each side in its own process (own peak memory); --no-isolate: in this process")
    repeat: int = option(
        0,
        "runs per side, alternating, the median run (samples/s) shown (0: 3 on CPU, where "
        "neighbours add noise; 1 on CUDA)",
        min=0,
    )
    flops_only: bool = option(
        False,
        "print both sides' FLOPs per step from the formula (real sizes on the meta device) "
        "and exit: no training, no memory",
    )
    time_vision: bool = option(
        False, "also time the vision encoder's forward (synchronised): the most a feature cache saves"
    )
    peak_tflops: float = option(
        0.0, "the device's bf16 dense peak for MFU, when it is not in the built-in table (0: the table's)", min=0.0
    )
    deepspeed: str = option("ds_configs/zero2.json", "ours: DeepSpeed config")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    def resolved(self) -> TrainBenchConfig:
        """`auto` device and repeat 0 made concrete for this machine."""
        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return dataclasses.replace(self, device=device, repeat=self.repeat or (3 if device == "cpu" else 1))


# ---------------------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------------------


def ungrouped(batch: dict) -> dict:
    """One image per caption, as the notebook's dataset yields them."""
    out = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_index")}
    out["pixel_values"] = batch["pixel_values"][batch["image_index"]]
    return out


# ---------------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _timed(step, batches: list[dict], warmup: int, device: torch.device) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for i, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        loss = step(i, batch)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    return times, losses


class VisionTimer:
    """Seconds in the vision encoder's forward, synchronising the device around it (--time-vision):
    how much a cache of its outputs could save at most."""

    def __init__(self, model: torch.nn.Module, device: torch.device, enabled: bool):
        from blip2_dist.lora import unwrap_blip2

        self.seconds, self.calls, self._start, self.device = [], 0, 0.0, device
        if enabled:
            vision = unwrap_blip2(model).vision_model
            vision.register_forward_pre_hook(self._pre)
            vision.register_forward_hook(self._post)

    def _pre(self, module, args) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        _sync(self.device)
        self.seconds.append(time.perf_counter() - self._start)


def _compile_parts(blip2) -> None:
    for part in (blip2.vision_model, blip2.qformer, blip2.language_model):
        part.compile()  # in place: names and state dict unchanged


def run_ours(cfg: TrainBenchConfig) -> dict:
    """The trainer's step on a 1-rank DeepSpeed ZeRO-2 engine."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    from blip2_dist import dist

    os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
    from blip2_dist.captioning import image_sharing
    from blip2_dist.checkpoint import TrainState
    from blip2_dist.config import Config
    from blip2_dist.deepspeed_config import fill_deepspeed_config, load_deepspeed_config
    from blip2_dist.engine import build_engine, build_model, seed_step, train_step
    from blip2_dist.lora import unwrap_blip2

    dist.init_distributed()
    config = Config()
    config.model.model, config.model.random_init = cfg.model, cfg.random_init
    config.model.group_images = cfg.group_images
    config.model.grad_checkpointing = cfg.grad_checkpointing
    config.optim.fused_adamw = cfg.fused_adamw
    config.data.micro_batch = cfg.micro_batch
    config.train.deepspeed, config.train.seed = cfg.deepspeed, cfg.seed
    model, processor = build_model(config, cfg.torch_dtype, device=cfg.device)
    blip2 = unwrap_blip2(model)
    if cfg.compile:
        _compile_parts(blip2)
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(cfg.device))  # DeepSpeed places the engine on the current device
        model.to(cfg.device)
    total = cfg.warmup + cfg.steps
    ds = fill_deepspeed_config(
        load_deepspeed_config(cfg.deepspeed), config, 1, total, bf16_ok=cfg.torch_dtype == torch.bfloat16
    )
    engine = build_engine(model, config, ds, total)
    fused = engine.optimizer.optimizer.defaults.get("fused") if hasattr(engine.optimizer, "optimizer") else None
    batches = _batches(cfg, processor, blip2.config, engine.device, grouped=True)
    flops = FlopModel(model)
    state = TrainState()
    timer = VisionTimer(model, engine.device, cfg.time_vision)
    engine.train()
    share_vision, share_qformer = image_sharing(model) if cfg.group_images else (False, False)

    def step(i: int, batch: dict) -> float:
        seed_step(cfg.seed, 0, i)
        return train_step(engine, batch, state, config)

    times, losses = _timed(step, batches, cfg.warmup, engine.device)
    shares = {"vision": share_vision, "qformer": share_vision and share_qformer}
    return _summary(
        "ours",
        cfg,
        batches,
        times,
        losses,
        flops,
        shares,
        engine.device,
        timer,
        extra={
            "trainable": _trainable(model),
            "grouped_vision": share_vision,
            "grouped_qformer": share_vision and share_qformer,
            "fused_adamw": fused,
            "deepspeed": {"zero_stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled()},
        },
    )


def run_baseline(cfg: TrainBenchConfig) -> dict:
    """The HF PEFT notebook: get_peft_model, plain AdamW, model(**batch) with an image per caption."""
    from peft import LoraConfig, get_peft_model

    from blip2_dist.models import family_of, load_model

    torch.manual_seed(cfg.seed)
    model, processor = load_model(
        cfg.model,
        dtype=cfg.torch_dtype,
        random_init=cfg.random_init,
        seed=cfg.seed,
        device=cfg.device if cfg.random_init else None,
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, bias="none", target_modules=NOTEBOOK_TARGETS[family_of(model)]
    )
    model = get_peft_model(model, lora).to(cfg.device)
    device = torch.device(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=False)
    batches = _batches(cfg, processor, model.config, device, grouped=False)
    flops = FlopModel(model)
    timer = VisionTimer(model, device, cfg.time_vision)
    model.train()

    def step(i: int, batch: dict) -> float:
        torch.manual_seed(cfg.seed * 1_000_003 + i)
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
        )
        loss = outputs.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    times, losses = _timed(step, batches, cfg.warmup, device)
    return _summary(
        "baseline",
        cfg,
        batches,
        times,
        losses,
        flops,
        {"vision": False, "qformer": False},
        device,
        timer,
        extra={"trainable": _trainable(model), "lora_targets": sorted(lora.target_modules)},
    )


def _batches(cfg: TrainBenchConfig, processor, model_config, device, grouped: bool) -> list[dict]:
    batches = synthetic_batches(
        processor,
        model_config,
        n_batches=cfg.warmup + cfg.steps,
        micro_batch=cfg.micro_batch,
        captions_per_image=cfg.captions_per_image,
        seed=cfg.seed,
    )
    dtype = cfg.torch_dtype
    out = []
    for b in batches:
        counts = batch_counts(b)
        b = b if grouped else ungrouped(b)
        b = {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in b.items()}
        b["_counts"] = counts
        out.append(b)
    return out


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _summary(
    name: str,
    cfg: TrainBenchConfig,
    batches: list[dict],
    times: list[float],
    losses: list[float],
    flops: FlopModel,
    shares: dict,
    device,
    timer: VisionTimer,
    extra: dict,
) -> dict:
    timed = batches[cfg.warmup :]
    seconds = sum(times)
    totals = {k: sum(b["_counts"][k] for b in timed) for k in ("samples", "images", "tokens")}
    executed: dict[str, float] = {}
    model_flops = 0.0
    for b in timed:
        n_img, n_ex = b["_counts"]["images"], b["_counts"]["samples"]
        counted = flops.count(
            b, n_vision=n_img if shares["vision"] else n_ex, n_qformer=n_img if shares["qformer"] else n_ex
        )
        for key, value in counted.items():
            executed[key] = executed.get(key, 0.0) + value
        model_flops += flops.count(b, n_vision=n_img, n_qformer=n_img)["total"]  # image path once per image
    peak, device_name = device_peak_tflops(str(device), cfg.peak_tflops or None)
    steps = len(times)
    return {
        "side": name,
        "device": device_name,
        "steps": steps,
        "warmup": cfg.warmup,
        "samples_per_s": totals["samples"] / seconds,
        "images_per_s": totals["images"] / seconds,
        "tokens_per_s": totals["tokens"] / seconds,
        "sec_per_step": seconds / steps,
        "sec_per_step_median": statistics.median(times),
        "peak_memory_gib": _peak_memory_gib(device),
        "samples_per_step": totals["samples"] / steps,
        "images_per_step": totals["images"] / steps,
        "flops_per_step": executed["total"] / steps,
        "model_flops_per_step": model_flops / steps,
        "flops_share": {k: v / executed["total"] for k, v in executed.items() if k != "total"},
        "tflops": executed["total"] / seconds / 1e12,
        "model_tflops": model_flops / seconds / 1e12,
        "peak_tflops": peak,
        "mfu": model_flops / seconds / 1e12 / peak if peak else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "vision_time_share": sum(timer.seconds[cfg.warmup :]) / seconds if timer.seconds else None,
        **extra,
    }


# ---------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------


def estimate_flops(cfg: TrainBenchConfig, echo=print) -> dict:
    """FLOPs per step of both sides from the formula alone, no timing (`--flops-only`): real
    architectures are built on the meta device (instant, no memory). Ours as the trainer runs it in
    train mode: the real Q-Former's dropout 0.1 keeps it per caption."""
    cfg = cfg.resolved()
    from blip2_dist.captioning import image_sharing
    from blip2_dist.lora import apply_lora
    from blip2_dist.models import load_model

    model, processor = load_model(
        cfg.model, dtype=cfg.torch_dtype, random_init=cfg.random_init, device="meta" if cfg.random_init else None
    )
    model = apply_lora(model).train()
    share_vision, share_qformer = image_sharing(model) if cfg.group_images else (False, False)
    flops = FlopModel(model)
    batches = synthetic_batches(
        processor,
        model.config,
        n_batches=cfg.steps,
        micro_batch=cfg.micro_batch,
        captions_per_image=cfg.captions_per_image,
        seed=cfg.seed,
    )
    sides = {"ours": (share_vision, share_vision and share_qformer), "baseline": (False, False)}
    out = {}
    for side, (vision, qformer) in sides.items():
        total: dict[str, float] = {}
        for b in batches:
            c = batch_counts(b)
            counted = flops.count(
                b, n_vision=c["images"] if vision else c["samples"], n_qformer=c["images"] if qformer else c["samples"]
            )
            for key, value in counted.items():
                total[key] = total.get(key, 0.0) + value / len(batches)
        out[side] = total
        share = ", ".join(f"{k} {100 * v / total['total']:.0f}%" for k, v in total.items() if k != "total")
        echo(f"{side}: {total['total'] / 1e12:.4g} TFLOP per step of {cfg.micro_batch} captions ({share})")
    out["ratio"] = out["baseline"]["total"] / out["ours"]["total"]
    out["grouped_vision"], out["grouped_qformer"] = share_vision, share_vision and share_qformer
    echo(
        f"baseline/ours FLOPs per step: x{out['ratio']:.2f} (the speed-up when both are compute-bound "
        f"at the same utilisation); vision encoder share of ours: "
        f"{100 * out['ours']['vision'] / out['ours']['total']:.0f}%"
    )
    return out


def _side(name: str, cfg: TrainBenchConfig) -> dict:
    torch.manual_seed(cfg.seed)
    return {"ours": run_ours, "baseline": run_baseline}[name](cfg)


def _child(name: str, cfg: TrainBenchConfig, conn) -> None:
    try:
        conn.send(("ok", _side(name, cfg)))
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        import traceback

        conn.send(("error", f"{name}: {err!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def _run_isolated(name: str, cfg: TrainBenchConfig) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, cfg, child))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", f"{name}: the benchmark process died (exit code {proc.join() or proc.exitcode})"
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def run(cfg: TrainBenchConfig, echo=print) -> dict:
    """Both sides, the table, ours/baseline ratios. Returns the report (what --json writes)."""
    cfg = cfg.resolved()
    if cfg.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    echo(
        f"train benchmark: {cfg.model}{' (random init)' if cfg.random_init else ''} on {cfg.device}, "
        f"{cfg.dtype}, micro-batch {cfg.micro_batch} captions ({cfg.captions_per_image} per image), "
        f"{cfg.warmup} warm-up + {cfg.steps} timed steps; ours: group_images={cfg.group_images}, "
        f"grad_checkpointing={cfg.grad_checkpointing}, compile={cfg.compile}, fused_adamw={cfg.fused_adamw}"
    )
    runs: dict[str, list[dict]] = {name: [] for name in (("ours", "baseline") if cfg.baseline else ("ours",))}
    for i in range(cfg.repeat):  # alternate, so a burst of load on a shared machine hits both sides
        for name, done in runs.items():
            done.append(_run_isolated(name, cfg) if cfg.isolate else _side(name, cfg))
            echo(f"  run {i + 1}/{cfg.repeat} {name}: {done[-1]['sec_per_step']:.4f} s/step")
    rows = []
    for done in runs.values():
        ordered = sorted(done, key=lambda r: r["samples_per_s"])
        rows.append({**ordered[len(ordered) // 2], "samples_per_s_all_runs": [r["samples_per_s"] for r in done]})
    report = {"config": dataclasses.asdict(cfg), "rows": rows, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    echo(format_table(rows))
    for row in rows:
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["flops_share"].items())
        echo(
            f"  {row['side']}: FLOPs/step {row['flops_per_step']:.4g} ({share}), model FLOPs/step "
            f"{row['model_flops_per_step']:.4g}; trainable params {row['trainable']:,}; "
            f"loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
            + (
                f"; vision encoder {100 * row['vision_time_share']:.0f}% of step time"
                if row["vision_time_share"] is not None
                else ""
            )
        )
    if len(rows) == 2:
        ours, base = rows
        keys = (
            "samples_per_s",
            "images_per_s",
            "tokens_per_s",
            "sec_per_step",
            "peak_memory_gib",
            "tflops",
            "model_tflops",
        )
        ratio = report["ratio"] = {k: ours[k] / base[k] for k in keys}
        echo(
            f"ours/baseline: samples/s x{ratio['samples_per_s']:.2f}, images/s x{ratio['images_per_s']:.2f}, "
            f"tokens/s x{ratio['tokens_per_s']:.2f}, s/step x{ratio['sec_per_step']:.2f}, peak memory "
            f"x{ratio['peak_memory_gib']:.2f}, achieved TFLOP/s x{ratio['tflops']:.2f}, "
            f"model TFLOP/s (and MFU) x{ratio['model_tflops']:.2f}"
        )
    return report


_COLUMNS = [  # (header, key, format)
    ("side", "side", "<9"),
    ("samples/s", "samples_per_s", ">10.2f"),
    ("images/s", "images_per_s", ">9.2f"),
    ("tokens/s", "tokens_per_s", ">10.1f"),
    ("s/step", "sec_per_step", ">8.4f"),
    ("median", "sec_per_step_median", ">8.4f"),
    ("peak GiB", "peak_memory_gib", ">8.2f"),
    ("TFLOP/s", "tflops", ">9.4f"),
    ("model TFLOP/s", "model_tflops", ">13.4f"),
    ("MFU", "mfu", ">6"),
]


def format_table(rows: list[dict]) -> str:
    widths = [int(re.match(r"[<>](\d+)", f).group(1)) for _, _, f in _COLUMNS]
    lines = [" ".join(format(h, f"{f[0]}{w}") for (h, _, f), w in zip(_COLUMNS, widths))]
    for r in rows:
        cells = []
        for _, key, f in _COLUMNS:
            value = r[key]
            if key == "mfu":
                value = "n/a" if value is None else f"{100 * value:.1f}%"
            cells.append(format(value, f))
        lines.append(" ".join(cells))
    if rows:
        peak = rows[0]["peak_tflops"]
        lines.append(
            f"device: {rows[0]['device']}; bf16 dense peak: {f'{peak:g} TFLOP/s' if peak else 'n/a, so MFU n/a'}"
        )
    return "\n".join(lines)
