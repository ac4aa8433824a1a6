"""The model and its DeepSpeed engine, and one training micro-step: what the trainer builds and runs.

    model, processor = build_model(cfg, DTYPES["bf16"], device)
    engine = build_engine(model, cfg, filled_deepspeed_config, total_steps)
    loss = train_step(engine, to_device(batch, engine.device), state, cfg)   # None: a skipped non-finite loss

The optimizer is torch's AdamW over the trainable (LoRA) parameters with a warm-up + cosine
LambdaLR, unless the DeepSpeed config offloads the optimizer (then DeepSpeed's CPU Adam). A
non-finite loss is agreed across ranks, so every rank skips the same micro-batch.
"""

from __future__ import annotations

import math

import torch

from blip2_dist import dist
from blip2_dist.captioning import caption_loss
from blip2_dist.checkpoint import TrainState
from blip2_dist.config import Config
from blip2_dist.errors import AgreedError, UserError
from blip2_dist.lora import apply_lora, unwrap_blip2
from blip2_dist.models import load_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLoss(AgreedError):
    """The ranks agreed the loss is not finite (too often): every rank raises it at once."""


class CaptionLossModule(torch.nn.Module):
    """What DeepSpeed wraps: batch in, loss out. The BLIP-2 model itself stays untouched."""

    def __init__(self, model: torch.nn.Module, group_images: bool = True):
        super().__init__()
        self.model = model
        self.group_images = group_images

    def forward(self, batch: dict) -> torch.Tensor:
        return caption_loss(self.model, batch, group_images=self.group_images)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to `min_ratio` at `total` (DeepSpeed WarmupCosineLR's shape)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; no decay on biases, norms and 1-d tensors (query tokens too)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith("query_tokens") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def device_precisions() -> tuple[bool, bool]:
    """(bf16, fp16) this process's device computes natively. CUDA: bf16 from compute capability 8
    (A100, H100, L4, RTX 30xx on); V100 and T4 only emulate it, slowly, so they get fp16. CPU: bf16,
    and fp16 only where oneDNN has it (DeepSpeed's CPU accelerator refuses fp16 otherwise)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False), True
    try:
        from deepspeed.accelerator import get_accelerator

        return True, bool(get_accelerator().is_fp16_supported())
    except Exception:  # noqa: BLE001 - no DeepSpeed accelerator: no fp16 claimed
        return True, False


def check_fp16_family(precision: str, family: str | None, cfg: Config) -> None:
    """FLAN-T5 overflows in fp16: refuse it unless --allow-fp16-t5 (family None: not known yet)."""
    if precision == "fp16" and family == "t5" and not cfg.train.allow_fp16_t5:
        raise UserError(
            f"{cfg.model.model} is a FLAN-T5 model and this run would train it in fp16 (the device has no bf16): "
            "T5's activations exceed fp16's range and the loss turns inf/NaN (transformers issue 23918). Train it "
            'on a GPU with bf16 (A100, H100, L4, RTX 30xx+), or in fp32 ("fp16": {"enabled": false} in the '
            "DeepSpeed JSON), or pass --allow-fp16-t5 to try fp16 anyway"
        )


def build_model(cfg: Config, dtype: torch.dtype, device: torch.device | str | None = None):
    """Base model (random-init ones built on `device` directly: no CPU init of billions of weights) + LoRA."""
    m = cfg.model
    model, processor = load_model(
        m.model, dtype=dtype, random_init=m.random_init, seed=cfg.train.seed, device=device if m.random_init else None
    )
    torch.manual_seed(cfg.train.seed)  # LoRA init identical on every rank
    model = apply_lora(model, m)
    if m.grad_checkpointing:
        unwrap_blip2(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def build_engine(model, cfg: Config, ds: dict, total_steps: int):
    """Our torch AdamW + LambdaLR unless the optimizer is offloaded (then DeepSpeed's CPU Adam).

    ds: a filled config (fill_deepspeed_config checked its optimizer and scheduler sections). The LR
    schedule: the scheduler section's WarmupCosineLR parameters, else the flags over `total_steps`."""
    import deepspeed

    o = cfg.optim
    sched = ds.pop("scheduler", None)
    params = sched.get("params", {}) if sched else {}
    total = params.get("total_num_steps", total_steps)
    warmup = params.get("warmup_num_steps", min(o.warmup_steps, total_steps))
    min_ratio = params.get("cos_min_ratio", o.min_lr_ratio)
    offloaded = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    wrapped = CaptionLossModule(model, group_images=cfg.model.group_images)
    groups = param_groups(wrapped, o.weight_decay)
    optimizer = None
    if not offloaded:
        ds.pop("optimizer", None)
        fused = torch.cuda.is_available() if o.fused_adamw == "auto" else o.fused_adamw == "on"
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps, fused=fused)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, min_ratio))

    engine, _, _, _ = deepspeed.initialize(
        model=wrapped,
        optimizer=optimizer,
        model_parameters=groups if offloaded else None,
        lr_scheduler=scheduler,
        config=ds,
    )
    return engine


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def seed_step(seed: int, rank: int, micro_step: int) -> None:
    # DeepSpeed does not restore RNG state; seeding per micro-step makes dropout replay on resume.
    torch.manual_seed((seed * 1_000_003 + micro_step * 1009 + rank) % (2**63))


def train_step(engine, batch: dict, state: TrainState, cfg: Config) -> float | None:
    """One micro-batch: forward, non-finite check (agreed across ranks), backward, step."""
    loss = engine(batch)
    value = loss.detach().float()
    bad = dist.all_reduce_max(0.0 if torch.isfinite(value) else 1.0) > 0
    if bad:
        state.nonfinite_skipped += 1
        if state.nonfinite_skipped > cfg.train.max_nonfinite:
            raise NonFiniteLoss(
                f"non-finite loss at step {state.step + 1} (epoch {state.epoch}, micro-batch "
                f"{state.batch_in_epoch}); {state.nonfinite_skipped} so far, --max-nonfinite "
                f"{cfg.train.max_nonfinite}. Lower --lr or check the data."
            )
        dist.print0(f"warning: non-finite loss at step {state.step + 1}, micro-batch skipped")
        # A zero loss over the trainable parameters keeps every rank's backward/step (and
        # DeepSpeed's accumulation counter) in lock-step while contributing no gradient.
        loss = sum((p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad), torch.zeros(()))
        engine.backward(loss)
        engine.step()
        return None
    engine.backward(loss)
    engine.step()
    return float(value)
