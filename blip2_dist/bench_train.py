"""Training benchmark: our trainer step against the Hugging Face PEFT notebook's recipe, in one run.

    python launch/bench.py train --model tiny-t5 --steps 20                     # CPU, about a minute
    python launch/bench.py train --model Salesforce/blip2-opt-2.7b --random-init \\
        --device cuda --dtype bf16 --micro-batch 16 --steps 30                  # one GPU, real sizes
    python launch/bench.py train ... --grad-checkpointing --compile --fused-adamw on --json out.json

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
dense peak in `PEAK_BF16_TFLOPS`; CPU: no peak, MFU n/a). Then ours/baseline ratios.

FLOP count (`FlopModel`; the tests check it against torch's FlopCounterMode on the tiny models):
    F = sum over linear layers  2*t*i*o * (1 + g_in + g_w)
      + sum over attentions     4*t_q*t_k*d * (1 + a)
  t: tokens the layer sees in this step, i*o its weight; g_in = 1 when its input carries a gradient
  (something trainable upstream), g_w = 1 when its weight is trained (LoRA A/B; the Q-Former and
  projection with train_qformer). Attention: per sequence and layer, t_q x t_k scores of width d;
  a = ([q or k] + v + q + k) / 2 for the backward products dP, dV, dQ, dK, where q, k, v = 1 when
  that side carries a gradient (a = 2 when all do; 1 for cross-attention on frozen image features).
  Tokens per micro-batch with n_vis images through the ViT (ours: one per image; baseline: one per
  caption), n_qf through the Q-Former, n captions of padded length L:
    ViT: (S/p)^2+1 per image (patch embedding: a linear of 3p^2 -> d on (S/p)^2);
    Q-Former: 32 queries (cross-attention keys/values: the ViT tokens); its text-only FFN: none;
    OPT: n*L through every layer and lm_head; T5: n*L_enc (encoder), n*L_dec (decoder, lm_head),
    cross-attention keys/values n*L_enc.
  So with LoRA on the LM only: ViT forward 2*P_vit*257 per image encoded, Q-Former forward (+ backward
  through activations when anything in it trains), LM 2*P_lm*tokens forward + 2*P_lm*tokens backward
  through activations (no frozen weight gradients) + LoRA terms. Left out: norms, softmax,
  activations, embedding lookups, the loss, the optimizer (<1% here), and the recomputation under
  activation checkpointing (so MFU, not hardware FLOPs utilisation). Causal attention is counted in
  full (L x L); at caption lengths attention is ~0.3% of the LM's FLOPs.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import resource
import statistics
import time
from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; matched in order
# against torch.cuda.get_device_name(). `--peak-tflops` overrides.
PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    ("H100 PCIe", r"H100.*PCIe", 756.0),
    ("H100 NVL", r"H100.*NVL", 835.0),
    ("H100 SXM", r"H100", 989.0),
    ("H200", r"H200", 989.0),
    ("A100", r"A100", 312.0),
]
FLICKR_CAPTIONS_PER_IMAGE = 5
NOTEBOOK_TARGETS = {"opt": ["q_proj", "k_proj"], "t5": ["q", "v"]}


@dataclass
class TrainBenchConfig:
    model: str = "tiny-t5"
    random_init: bool = False
    device: str = "cpu"
    dtype: str = "bf16"
    micro_batch: int = 16
    captions_per_image: int = FLICKR_CAPTIONS_PER_IMAGE
    steps: int = 20
    warmup: int = 3
    seed: int = 0
    group_images: bool = True
    grad_checkpointing: bool = False
    compile: bool = False
    fused_adamw: str = "auto"          # auto (the trainer's choice: fused on CUDA), on, off
    baseline: bool = True
    isolate: bool = True               # each side in its own spawned process
    repeat: int = 1                    # runs per side, alternating; the median run (samples/s) is shown
    time_vision: bool = False          # also time the vision encoder's forward (device synced around it)
    peak_tflops: float | None = None
    deepspeed_config: str = "ds_configs/zero2.json"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


def peak_bf16_tflops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a CUDA device name, or None when it is not in the table."""
    for _, pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


def device_peak_tflops(device: str, override: float | None = None) -> tuple[float | None, str]:
    """(bf16 dense peak TFLOP/s or None, the device's name). CPUs: no peak (MFU n/a) unless overridden."""
    if not device.startswith("cuda"):
        import platform

        return override, f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} cores"
    name = torch.cuda.get_device_name(torch.device(device))
    return (override if override is not None else peak_bf16_tflops(name)), name


# ---------------------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------------------

def synthetic_batches(processor, model_config, *, n_batches: int, micro_batch: int, captions_per_image: int,
                      seed: int = 0) -> list[dict]:
    """Micro-batches as the shard stream makes them: whole caption groups in order, a group straddling
    two batches when it does not fit; pixel_values one row per image (normalised noise at the model's
    image size). Captions: 12 +- 4 words (Flickr8k averages ~11) from the tiny tokenizer's vocabulary."""
    from blip2_dist.data.transforms import CaptionFormat
    from blip2_dist.models import TINY_CORPUS_WORDS

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    fmt = CaptionFormat.from_processor(processor, model_config)
    size = model_config.vision_config.image_size
    batches, pending, pixels = [], [], {}
    while len(batches) < n_batches:
        image = len(pixels)
        pixels[image] = torch.randn(3, size, size, generator=gen)
        captions = [" ".join(rng.choice(TINY_CORPUS_WORDS) for _ in range(max(4, round(rng.gauss(12, 4)))))
                    for _ in range(captions_per_image)]
        pending += [(image, c) for c in captions]
        while len(pending) >= micro_batch and len(batches) < n_batches:
            take, pending = pending[:micro_batch], pending[micro_batch:]
            ids = sorted({i for i, _ in take})
            batches.append({
                "pixel_values": torch.stack([pixels[i] for i in ids]),  # a straddling image in both batches
                "image_index": torch.tensor([ids.index(i) for i, _ in take]),
                **fmt.encode_train([c for _, c in take]),
            })
    return batches


def batch_counts(batch: dict) -> dict[str, int]:
    tokens = int(batch["attention_mask"].sum())
    if batch["labels"].shape[1] != batch["input_ids"].shape[1]:  # T5: the decoder's tokens too
        tokens += int((batch["labels"] != -100).sum())
    return {"samples": len(batch["input_ids"]), "images": len(batch["pixel_values"]), "tokens": tokens}


def ungrouped(batch: dict) -> dict:
    """One image per caption, as the notebook's dataset yields them."""
    out = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_index")}
    out["pixel_values"] = batch["pixel_values"][batch["image_index"]]
    return out


# ---------------------------------------------------------------------------------------------------
# FLOP count (the formula in the module docstring)
# ---------------------------------------------------------------------------------------------------

# Attention modules: (regex on the module name, kind, names of its query/key/value linears)
_ATTENTIONS = [
    (r"^vision_model\..*\.self_attn$", "vit", ("qkv", "qkv", "qkv")),
    (r"^qformer\..*\.crossattention\.attention$", "qf_cross", ("query", "key", "value")),
    (r"^qformer\..*\.attention\.attention$", "qf_self", ("query", "key", "value")),
    (r"^language_model\..*\.self_attn$", "lm", ("q_proj", "k_proj", "v_proj")),
    (r"^language_model\.encoder\..*\.SelfAttention$", "enc", ("q", "k", "v")),
    (r"^language_model\.decoder\..*\.SelfAttention$", "dec_self", ("q", "k", "v")),
    (r"^language_model\.decoder\..*\.EncDecAttention$", "dec_cross", ("q", "k", "v")),
]
_PARTS = {"vit": "vision", "qf_cross": "qformer", "qf_self": "qformer"}
_PARALLEL = {"qkv", "query", "key", "value", "q_proj", "k_proj", "v_proj", "q", "k", "v", "wi_0", "wi_1"}


@dataclass
class _Linear:
    tokens: str          # which token count it sees (keys of the dict in FlopModel.count)
    size: int            # in * out
    g_in: bool           # its input carries a gradient
    g_w: bool            # its weight is trained
    part: str


@dataclass
class _Attention:
    kind: str            # vit, qf_self, qf_cross, lm, enc, dec_self, dec_cross
    width: int           # d (all heads)
    grads: tuple         # (queries, keys, values) carry a gradient


class FlopModel:
    """The model's matmul inventory, read once from its modules; `count(batch, ...)` per micro-batch.

    Modules are visited in execution order (ViT, Q-Former, projection, LM); a linear's input carries a
    gradient when something trainable lies upstream of it on its data path: earlier in its own part or
    in an earlier part, except that the Q-Former's cross-attention keys/values read the ViT output only,
    and the T5 decoder reads the encoder (and so the image path) only through its cross-attention.
    """

    def __init__(self, model: torch.nn.Module):
        from blip2_dist.lora import unwrap_blip2
        from blip2_dist.models import family_of

        blip2 = unwrap_blip2(model)
        c = blip2.config
        self.family = family_of(blip2)
        v = c.vision_config
        self.patches = (v.image_size // v.patch_size) ** 2
        self.queries = c.num_query_tokens
        self.linears: list[_Linear] = []
        self.attentions: list[_Attention] = []
        carries = self._walk(blip2)
        widths = {"vit": v.hidden_size, "qf": c.qformer_config.hidden_size}
        t = c.text_config
        lm_width = t.num_heads * t.d_kv if self.family == "t5" else t.hidden_size
        for name, _ in blip2.named_modules():
            for pattern, kind, qkv in _ATTENTIONS:
                if re.match(pattern, name):
                    width = widths["vit"] if kind == "vit" else widths["qf"] if kind.startswith("qf") else lm_width
                    grads = tuple(carries.get(f"{name}.{n}", False) for n in qkv)
                    self.attentions.append(_Attention(kind, width, grads))
                    break

    def _walk(self, blip2) -> dict[str, bool]:
        def trained(module) -> bool:
            return any(p.requires_grad for p in module.parameters())

        lm = blip2.language_model
        vis_t = trained(blip2.vision_model)
        qf_in = vis_t or blip2.query_tokens.requires_grad       # the Q-Former's inputs carry a gradient
        image_t = qf_in or trained(blip2.qformer) or trained(blip2.language_projection)
        enc_t = self.family == "t5" and trained(lm.get_encoder())
        running = {"vision": False, "qformer": blip2.query_tokens.requires_grad, "lm": image_t, "dec": False}
        pending: set[str] = set()   # scopes whose next group sees a gradient from a trained weight
        group = None
        crossed = {"qformer": False, "dec": False}  # past the first cross-attention output (image / encoder)
        carries: dict[str, bool] = {}   # linear (LoRA-wrapped name) -> its output carries a gradient
        for prefix in ("vision_model", "qformer", "language_projection", "language_model"):
            for name, m in blip2.get_submodule(prefix).named_modules(prefix=prefix):
                if isinstance(m, torch.nn.Conv2d):  # the ViT patch embedding; its input is the pixels
                    self.linears.append(_Linear("patches", m.weight[0].numel() * m.out_channels, False,
                                                m.weight.requires_grad, "vision"))
                if not isinstance(m, torch.nn.Linear):
                    continue
                parent = re.sub(r"\.(base_layer|lora_[AB]\.[^.]+)$", "", name)
                # q/k/v (and T5's gated wi_0/wi_1) read the same input: a trained q does not reach k.
                head, _, last = parent.rpartition(".")
                this_group = head + "#in" if last in _PARALLEL else parent
                if this_group != group:
                    for key in pending:
                        running[key] = True
                    pending, group = set(), this_group
                scope = self._scope(parent)
                if re.search(r"\.(EncDecAttention\.o|crossattention\.output\.dense)$", parent):
                    crossed[scope] = True
                if re.search(r"\.lora_B\.[^.]+$", name):
                    g_in = True
                elif scope == "cross_kv":
                    g_in = vis_t
                elif scope == "proj":
                    g_in = qf_in or trained(blip2.qformer)
                elif scope == "dec_cross_kv":
                    g_in = image_t or enc_t
                elif scope == "dec":
                    g_in = running["dec"] or (crossed["dec"] and (image_t or enc_t))
                elif scope == "qformer":
                    g_in = running["qformer"] or (crossed["qformer"] and vis_t)
                else:
                    g_in = running[scope]
                trains = m.weight.requires_grad
                part = {"vision_model": "vision", "qformer": "qformer",
                        "language_projection": "projection"}.get(prefix, "language")
                self.linears.append(_Linear(self._tokens(parent), m.weight.numel(), g_in, trains, part))
                carries[parent] = carries.get(parent, False) or g_in or trains
                if trains:  # what follows on this data path now carries a gradient
                    pending.add({"cross_kv": "qformer", "dec_cross_kv": "dec", "proj": "lm"}.get(scope, scope))
        return carries

    def _scope(self, name: str) -> str:
        if name.startswith("vision_model"):
            return "vision"
        if name.startswith("qformer"):
            return "cross_kv" if re.search(r"\.crossattention\.attention\.(key|value)$", name) else "qformer"
        if name.startswith("language_projection"):
            return "proj"
        if self.family == "t5" and (".decoder." in name or name.endswith("lm_head")):
            return "dec_cross_kv" if re.search(r"\.EncDecAttention\.(k|v)$", name) else "dec"
        return "lm"

    def _tokens(self, name: str) -> str:
        scope = self._scope(name)
        if scope == "vision":
            return "vit"
        if scope == "cross_kv":
            return "qf_image"
        if scope == "qformer" and re.search(r"\.layer\.\d+\.(intermediate|output)\.dense$", name):
            return "none"  # the Q-Former's text-only feed-forward: there is no text here
        if scope in ("qformer", "proj"):
            return "qf_query"
        if scope == "dec":
            return "dec"
        return "enc" if self.family == "t5" else "lm"  # T5 encoder and cross-attention keys/values

    def count(self, batch: dict, *, n_vision: int, n_qformer: int) -> dict[str, float]:
        """FLOPs of one micro-batch by part (vision, qformer, projection, language) and in total."""
        n = len(batch["input_ids"])
        length, dec = batch["input_ids"].shape[1], batch["labels"].shape[1]
        vit = self.patches + 1
        tokens = {"vit": n_vision * vit, "patches": n_vision * self.patches, "qf_query": n_qformer * self.queries,
                  "qf_image": n_qformer * vit, "none": 0, "lm": n * length, "enc": n * length, "dec": n * dec}
        scores = {"vit": n_vision * vit * vit, "qf_self": n_qformer * self.queries ** 2,
                  "qf_cross": n_qformer * self.queries * vit, "lm": n * length ** 2, "enc": n * length ** 2,
                  "dec_self": n * dec ** 2, "dec_cross": n * dec * length}
        out = {"vision": 0.0, "qformer": 0.0, "projection": 0.0, "language": 0.0}
        for lin in self.linears:
            out[lin.part] += 2.0 * tokens[lin.tokens] * lin.size * (
                1 + lin.g_in + lin.g_w)
        for att in self.attentions:
            q, k, v = att.grads  # backward products: dP (for dQ or dK), dV, dQ, dK; forward has two
            backward = ((q or k) + v + q + k) / 2
            out[_PARTS.get(att.kind, "language")] += 4.0 * scores[att.kind] * att.width * (1 + backward)
        out["total"] = sum(out.values())
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
    from blip2_dist.checkpoint import TrainState
    from blip2_dist.captioning import image_sharing
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
    config.train.deepspeed, config.train.seed = cfg.deepspeed_config, cfg.seed
    model, processor = build_model(config, cfg.torch_dtype, device=cfg.device)
    blip2 = unwrap_blip2(model)
    if cfg.compile:
        _compile_parts(blip2)
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(cfg.device))  # DeepSpeed places the engine on the current device
        model.to(cfg.device)
    total = cfg.warmup + cfg.steps
    ds = fill_deepspeed_config(load_deepspeed_config(cfg.deepspeed_config), config, 1, total,
                               bf16_ok=cfg.torch_dtype == torch.bfloat16)
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
    return _summary("ours", cfg, batches, times, losses, flops, shares, engine.device, timer, extra={
        "trainable": _trainable(model), "grouped_vision": share_vision,
        "grouped_qformer": share_vision and share_qformer, "fused_adamw": fused,
        "deepspeed": {"zero_stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled()},
    })


def run_baseline(cfg: TrainBenchConfig) -> dict:
    """The HF PEFT notebook: get_peft_model, plain AdamW, model(**batch) with an image per caption."""
    from peft import LoraConfig, get_peft_model

    from blip2_dist.models import family_of, load_model

    torch.manual_seed(cfg.seed)
    model, processor = load_model(cfg.model, dtype=cfg.torch_dtype, random_init=cfg.random_init, seed=cfg.seed,
                                  device=cfg.device if cfg.random_init else None)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                      target_modules=NOTEBOOK_TARGETS[family_of(model)])
    model = get_peft_model(model, lora).to(cfg.device)
    device = torch.device(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=False)
    batches = _batches(cfg, processor, model.config, device, grouped=False)
    flops = FlopModel(model)
    timer = VisionTimer(model, device, cfg.time_vision)
    model.train()

    def step(i: int, batch: dict) -> float:
        torch.manual_seed(cfg.seed * 1_000_003 + i)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], labels=batch["labels"])
        loss = outputs.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    times, losses = _timed(step, batches, cfg.warmup, device)
    return _summary("baseline", cfg, batches, times, losses, flops, {"vision": False, "qformer": False}, device,
                    timer, extra={"trainable": _trainable(model), "lora_targets": sorted(lora.target_modules)})


def _batches(cfg: TrainBenchConfig, processor, model_config, device, grouped: bool) -> list[dict]:
    batches = synthetic_batches(processor, model_config, n_batches=cfg.warmup + cfg.steps,
                                micro_batch=cfg.micro_batch, captions_per_image=cfg.captions_per_image,
                                seed=cfg.seed)
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


def _summary(name: str, cfg: TrainBenchConfig, batches: list[dict], times: list[float], losses: list[float],
             flops: FlopModel, shares: dict, device, timer: VisionTimer, extra: dict) -> dict:
    timed = batches[cfg.warmup:]
    seconds = sum(times)
    totals = {k: sum(b["_counts"][k] for b in timed) for k in ("samples", "images", "tokens")}
    executed: dict[str, float] = {}
    model_flops = 0.0
    for b in timed:
        n_img, n_ex = b["_counts"]["images"], b["_counts"]["samples"]
        counted = flops.count(b, n_vision=n_img if shares["vision"] else n_ex,
                              n_qformer=n_img if shares["qformer"] else n_ex)
        for key, value in counted.items():
            executed[key] = executed.get(key, 0.0) + value
        model_flops += flops.count(b, n_vision=n_img, n_qformer=n_img)["total"]  # image path once per image
    peak, device_name = device_peak_tflops(str(device), cfg.peak_tflops)
    steps = len(times)
    return {
        "side": name, "device": device_name, "steps": steps, "warmup": cfg.warmup,
        "samples_per_s": totals["samples"] / seconds, "images_per_s": totals["images"] / seconds,
        "tokens_per_s": totals["tokens"] / seconds, "sec_per_step": seconds / steps,
        "sec_per_step_median": statistics.median(times), "peak_memory_gib": _peak_memory_gib(device),
        "samples_per_step": totals["samples"] / steps, "images_per_step": totals["images"] / steps,
        "flops_per_step": executed["total"] / steps, "model_flops_per_step": model_flops / steps,
        "flops_share": {k: v / executed["total"] for k, v in executed.items() if k != "total"},
        "tflops": executed["total"] / seconds / 1e12, "model_tflops": model_flops / seconds / 1e12,
        "peak_tflops": peak, "mfu": model_flops / seconds / 1e12 / peak if peak else None,
        "first_loss": losses[0], "last_loss": losses[-1],
        "vision_time_share": sum(timer.seconds[cfg.warmup:]) / seconds if timer.seconds else None, **extra,
    }


# ---------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------

def estimate_flops(cfg: TrainBenchConfig, echo=print) -> dict:
    """FLOPs per step of both sides from the formula alone, no timing (`--flops-only`): real
    architectures are built on the meta device (instant, no memory). Ours as the trainer runs it in
    train mode: the real Q-Former's dropout 0.1 keeps it per caption."""
    from blip2_dist.captioning import image_sharing
    from blip2_dist.lora import apply_lora
    from blip2_dist.models import load_model

    model, processor = load_model(cfg.model, dtype=cfg.torch_dtype, random_init=cfg.random_init,
                                  device="meta" if cfg.random_init else None)
    model = apply_lora(model).train()
    share_vision, share_qformer = image_sharing(model) if cfg.group_images else (False, False)
    flops = FlopModel(model)
    batches = synthetic_batches(processor, model.config, n_batches=cfg.steps, micro_batch=cfg.micro_batch,
                                captions_per_image=cfg.captions_per_image, seed=cfg.seed)
    sides = {"ours": (share_vision, share_vision and share_qformer), "baseline": (False, False)}
    out = {}
    for side, (vision, qformer) in sides.items():
        total: dict[str, float] = {}
        for b in batches:
            c = batch_counts(b)
            counted = flops.count(b, n_vision=c["images"] if vision else c["samples"],
                                  n_qformer=c["images"] if qformer else c["samples"])
            for key, value in counted.items():
                total[key] = total.get(key, 0.0) + value / len(batches)
        out[side] = total
        share = ", ".join(f"{k} {100 * v / total['total']:.0f}%" for k, v in total.items() if k != "total")
        echo(f"{side}: {total['total'] / 1e12:.4g} TFLOP per step of {cfg.micro_batch} captions ({share})")
    out["ratio"] = out["baseline"]["total"] / out["ours"]["total"]
    out["grouped_vision"], out["grouped_qformer"] = share_vision, share_vision and share_qformer
    echo(f"baseline/ours FLOPs per step: x{out['ratio']:.2f} (the speed-up when both are compute-bound "
         f"at the same utilisation); vision encoder share of ours: "
         f"{100 * out['ours']['vision'] / out['ours']['total']:.0f}%")
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
    if cfg.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    echo(f"train benchmark: {cfg.model}{' (random init)' if cfg.random_init else ''} on {cfg.device}, "
         f"{cfg.dtype}, micro-batch {cfg.micro_batch} captions ({cfg.captions_per_image} per image), "
         f"{cfg.warmup} warm-up + {cfg.steps} timed steps; ours: group_images={cfg.group_images}, "
         f"grad_checkpointing={cfg.grad_checkpointing}, compile={cfg.compile}, fused_adamw={cfg.fused_adamw}")
    runs: dict[str, list[dict]] = {name: [] for name in (("ours", "baseline") if cfg.baseline else ("ours",))}
    for i in range(cfg.repeat):  # alternate, so a burst of load on a shared machine hits both sides
        for name, done in runs.items():
            done.append(_run_isolated(name, cfg) if cfg.isolate else _side(name, cfg))
            echo(f"  run {i + 1}/{cfg.repeat} {name}: {done[-1]['sec_per_step']:.4f} s/step")
    rows = []
    for done in runs.values():
        ordered = sorted(done, key=lambda r: r["samples_per_s"])
        rows.append({**ordered[len(ordered) // 2], "samples_per_s_all_runs": [r["samples_per_s"] for r in done]})
    report = {"config": dataclasses.asdict(cfg), "rows": rows, "torch": torch.__version__,
              "cpu_count": os.cpu_count()}
    echo(format_table(rows))
    for row in rows:
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["flops_share"].items())
        echo(f"  {row['side']}: FLOPs/step {row['flops_per_step']:.4g} ({share}), model FLOPs/step "
             f"{row['model_flops_per_step']:.4g}; trainable params {row['trainable']:,}; "
             f"loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
             + (f"; vision encoder {100 * row['vision_time_share']:.0f}% of step time"
                if row["vision_time_share"] is not None else ""))
    if len(rows) == 2:
        ours, base = rows
        keys = ("samples_per_s", "images_per_s", "tokens_per_s", "sec_per_step", "peak_memory_gib", "tflops",
                "model_tflops")
        ratio = report["ratio"] = {k: ours[k] / base[k] for k in keys}
        echo(f"ours/baseline: samples/s x{ratio['samples_per_s']:.2f}, images/s x{ratio['images_per_s']:.2f}, "
             f"tokens/s x{ratio['tokens_per_s']:.2f}, s/step x{ratio['sec_per_step']:.2f}, peak memory "
             f"x{ratio['peak_memory_gib']:.2f}, achieved TFLOP/s x{ratio['tflops']:.2f}, "
             f"model TFLOP/s (and MFU) x{ratio['model_tflops']:.2f}")
    return report


_COLUMNS = [  # (header, key, format)
    ("side", "side", "<9"), ("samples/s", "samples_per_s", ">10.2f"), ("images/s", "images_per_s", ">9.2f"),
    ("tokens/s", "tokens_per_s", ">10.1f"), ("s/step", "sec_per_step", ">8.4f"),
    ("median", "sec_per_step_median", ">8.4f"), ("peak GiB", "peak_memory_gib", ">8.2f"),
    ("TFLOP/s", "tflops", ">9.4f"), ("model TFLOP/s", "model_tflops", ">13.4f"), ("MFU", "mfu", ">6"),
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
        lines.append(f"device: {rows[0]['device']}; bf16 dense peak: "
                     f"{f'{peak:g} TFLOP/s' if peak else 'n/a, so MFU n/a'}")
    return "\n".join(lines)
