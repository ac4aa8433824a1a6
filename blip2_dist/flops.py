"""FLOPs of one BLIP-2 + LoRA training step, from the model's modules: what MFU is measured against.

    flops = FlopModel(model)          # once, after LoRA is applied and before the engine wraps it
    per_part = flops.count(batch, n_vision=images, n_qformer=images)   # per micro-batch
    peak, name = device_peak_tflops("cuda:0")

The training benchmark (benchmarks/bench_train.py) reports achieved TFLOP/s and MFU with it; the tests
check the formula against torch's FlopCounterMode on the tiny models.

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

import os
import re
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


def batch_counts(batch: dict) -> dict[str, int]:
    tokens = int(batch["attention_mask"].sum())
    if batch["labels"].shape[1] != batch["input_ids"].shape[1]:  # T5: the decoder's tokens too
        tokens += int((batch["labels"] != -100).sum())
    return {"samples": len(batch["input_ids"]), "images": len(batch["pixel_values"]), "tokens": tokens}


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
    tokens: str  # which token count it sees (keys of the dict in FlopModel.count)
    size: int  # in * out
    g_in: bool  # its input carries a gradient
    g_w: bool  # its weight is trained
    part: str


@dataclass
class _Attention:
    kind: str  # vit, qf_self, qf_cross, lm, enc, dec_self, dec_cross
    width: int  # d (all heads)
    grads: tuple  # (queries, keys, values) carry a gradient


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
        qf_in = vis_t or blip2.query_tokens.requires_grad  # the Q-Former's inputs carry a gradient
        image_t = qf_in or trained(blip2.qformer) or trained(blip2.language_projection)
        enc_t = self.family == "t5" and trained(lm.get_encoder())
        running = {"vision": False, "qformer": blip2.query_tokens.requires_grad, "lm": image_t, "dec": False}
        pending: set[str] = set()  # scopes whose next group sees a gradient from a trained weight
        group = None
        crossed = {"qformer": False, "dec": False}  # past the first cross-attention output (image / encoder)
        carries: dict[str, bool] = {}  # linear (LoRA-wrapped name) -> its output carries a gradient
        for prefix in ("vision_model", "qformer", "language_projection", "language_model"):
            for name, m in blip2.get_submodule(prefix).named_modules(prefix=prefix):
                if isinstance(m, torch.nn.Conv2d):  # the ViT patch embedding; its input is the pixels
                    self.linears.append(
                        _Linear(
                            "patches", m.weight[0].numel() * m.out_channels, False, m.weight.requires_grad, "vision"
                        )
                    )
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
                part = {"vision_model": "vision", "qformer": "qformer", "language_projection": "projection"}.get(
                    prefix, "language"
                )
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
        tokens = {
            "vit": n_vision * vit,
            "patches": n_vision * self.patches,
            "qf_query": n_qformer * self.queries,
            "qf_image": n_qformer * vit,
            "none": 0,
            "lm": n * length,
            "enc": n * length,
            "dec": n * dec,
        }
        scores = {
            "vit": n_vision * vit * vit,
            "qf_self": n_qformer * self.queries**2,
            "qf_cross": n_qformer * self.queries * vit,
            "lm": n * length**2,
            "enc": n * length**2,
            "dec_self": n * dec**2,
            "dec_cross": n * dec * length,
        }
        out = {"vision": 0.0, "qformer": 0.0, "projection": 0.0, "language": 0.0}
        for lin in self.linears:
            out[lin.part] += 2.0 * tokens[lin.tokens] * lin.size * (1 + lin.g_in + lin.g_w)
        for att in self.attentions:
            q, k, v = att.grads  # backward products: dP (for dQ or dK), dV, dQ, dK; forward has two
            backward = ((q or k) + v + q + k) / 2
            out[_PARTS.get(att.kind, "language")] += 4.0 * scores[att.kind] * att.width * (1 + backward)
        out["total"] = sum(out.values())
        return out
