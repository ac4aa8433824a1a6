"""Captioning with BLIP-2: the training forward and loss, the image path run once per image, generation.

Model code never sees a rank: everything here works on one process's model (a plain BLIP-2, its
PeftModel, or a DeepSpeed engine around either).

    loss = caption_loss(peft_model, batch)                          # the trainer's forward
    captions = generate_captions(peft_model, processor, pixel_values, input_ids, attention_mask, num_beams=5)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2Processor
from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

from blip2_dist.data.transforms import end_of_caption_id
from blip2_dist.lora import strip_engine, unwrap_blip2
from blip2_dist.models import family_of


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the vision encoder's device. Under an accelerate device map that offloaded the
    vision weights (they sit on "meta"), the device its hook runs them on."""
    weight = unwrap_blip2(model).vision_model.embeddings.patch_embedding.weight
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(unwrap_blip2(model).vision_model, "_hf_hook", None)
    return torch.device(getattr(hook, "execution_device", None) or "cpu")


def caption_loss(model: nn.Module, batch: dict[str, torch.Tensor], group_images: bool = True) -> torch.Tensor:
    """Mean token cross-entropy of a captioning micro-batch (see `caption_forward`)."""
    return caption_forward(model, batch, group_images).loss


def caption_forward(model: nn.Module, batch: dict[str, torch.Tensor], group_images: bool = True):
    """The model's forward output (loss: mean token cross-entropy, logits) for a captioning micro-batch.

    model: Blip2ForConditionalGeneration, its PeftModel, or a DeepSpeed engine around either (called
    as is, so the engine's forward hooks run). batch: pixel_values [n_images,3,H,W], image_index
    [n_examples] (row of pixel_values per example; absent = one image per example), input_ids,
    attention_mask, labels [n_examples, L] with -100 where no loss is taken.

    group_images (default): the image path runs once per image, not once per caption, wherever that
    gives the same numbers (see `image_sharing`); its outputs are repeated by image_index and handed to
    forward as `mm_encoder_outputs`. Loss and gradients equal the ungrouped computation (the tests check
    both families, every trainable part, and dropout replaying the same masks). False: pixel_values
    repeated per caption, the plain `model(pixel_values=...)` call (the notebook's computation).
    """
    blip2 = unwrap_blip2(model)
    weight = blip2.vision_model.embeddings.patch_embedding.weight
    pixel_values = batch["pixel_values"].to(weight.device, weight.dtype)
    image_index = batch.get("image_index")
    text = dict(
        input_ids=batch["input_ids"].to(weight.device),
        attention_mask=batch["attention_mask"].to(weight.device),
        labels=batch["labels"].to(weight.device),
    )
    if image_index is not None:
        image_index = image_index.to(weight.device)
    share_vision, _ = image_sharing(blip2) if group_images and image_index is not None else (False, False)
    if not share_vision:
        if image_index is not None:
            pixel_values = pixel_values[image_index]
        return model(pixel_values=pixel_values, **text)
    features = grouped_image_features(blip2, pixel_values, image_index)
    image = BaseModelOutputWithVisionQformerOutputs(pooler_output=features)  # all forward reads of it
    return model(pixel_values=None, mm_encoder_outputs={"image": image}, **text)


def has_active_dropout(module: nn.Module) -> bool:
    """Whether `module` draws random numbers in its forward as it is now (train mode and p > 0):
    dropout layers (LoRA's included) or attention modules with a dropout probability (BLIP-2's ViT and
    Q-Former attention pass `attention_dropout` to the attention function)."""
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        p = getattr(m, "attention_dropout", None)
        if isinstance(p, float) and p > 0:
            return True
    return False


def image_sharing(model: nn.Module) -> tuple[bool, bool]:
    """(vision encoder once per image, Q-Former once per image) for the grouped path.

    Shared up to the first stage that would draw random numbers per example, so grouping is exact:
      * vision shared unless it has active dropout (the BLIP-2 ViT has none; LoRA dropout on vision
        targets in train mode is); then nothing is shared.
      * Q-Former shared when it has no active dropout either (eval mode, the tiny models, or
        hidden/attention dropout 0). The real Q-Former has dropout 0.1, so in train mode it runs once
        per caption on the repeated image features: its dropout then draws the same masks, in the same
        order, as the ungrouped forward. It costs ~3% of the ViT-g (32 queries vs 257 patch tokens).
    """
    blip2 = unwrap_blip2(model)
    if has_active_dropout(blip2.vision_model):
        return False, False
    return True, not has_active_dropout(blip2.qformer)


def grouped_image_features(model: nn.Module, pixel_values: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Language-model inputs (projected query outputs) [n_examples, Q, D] with the vision encoder run on
    the n_images rows of pixel_values only; the Q-Former once per image or per example (`image_sharing`).

    The steps of `Blip2ForConditionalGeneration.get_image_features` (transformers 5), with the repeat by
    image_index placed after the last shared stage. The frozen vision encoder runs under no_grad (unless
    it carries LoRA): nothing upstream of it can take a gradient.
    """
    blip2 = unwrap_blip2(model)
    share_vision, share_qformer = image_sharing(blip2)
    if not share_vision:
        pixel_values, image_index, share_qformer = pixel_values[image_index], None, False
    vision_grad = any(p.requires_grad for p in blip2.vision_model.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and vision_grad):
        image_embeds = blip2.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
    if image_index is not None and not share_qformer:
        image_embeds = image_embeds[image_index]
    image_attention_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    query_tokens = blip2.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_output = blip2.qformer(
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_attention_mask,
        return_dict=True,
    ).last_hidden_state
    if query_output.dtype != image_embeds.dtype:  # the Q-Former may be kept in fp32
        query_output = query_output.to(image_embeds.dtype)
    features = blip2.language_projection(query_output)
    if image_index is not None and share_qformer:
        features = features[image_index]
    return features


def generate_captions(
    model: nn.Module,
    processor: Blip2Processor,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **gen_kwargs,
) -> list[str]:
    """Captions for a batch (one image per input_ids row), prompt removed, stripped. Call model.eval() first.

    gen_kwargs go to generate (num_beams, repetition_penalty, num_return_sequences, ...), except that
    min_length / max_length count caption tokens as LAVIS's min_len / max_len do: they become
    min_new_tokens / max_new_tokens (HF's min_length counts the OPT prompt). Default max_new_tokens=30.
    Generation stops on the end-of-caption token the labels end with (`end_of_caption_id`: "\\n" for
    the hub's OPT models, `</s>` for T5) unless eos_token_id is given; each caption is cut there.
    OPT prompts must be left-padded (or all the same length).
    """
    inner = strip_engine(model)
    blip2 = unwrap_blip2(inner)
    weight = blip2.vision_model.embeddings.patch_embedding.weight
    device = input_device(blip2)
    for old, new in (("min_length", "min_new_tokens"), ("max_length", "max_new_tokens")):
        if old in gen_kwargs:
            gen_kwargs[new] = gen_kwargs.pop(old)
    gen_kwargs.setdefault("max_new_tokens", 30)
    tokenizer = processor.tokenizer
    gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    gen_kwargs.setdefault("eos_token_id", end_of_caption_id(blip2.config, tokenizer))
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    decoder_only = family_of(blip2) == "opt"
    if decoder_only and attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("OPT prompts are right-padded: pad them on the left (tokenizer.padding_side='left')")
    # T5 needs input_ids (image tokens + prompt): generate(pixel_values) alone builds a start token from
    # text_config.bos_token_id, which T5 configs lack.
    with torch.no_grad():
        output = inner.generate(
            pixel_values=pixel_values.to(device, weight.dtype),
            input_ids=input_ids,
            attention_mask=attention_mask,
            **gen_kwargs,
        )
    if decoder_only:  # OPT returns prompt + continuation
        output = output[:, input_ids.shape[1] :]
    ends = gen_kwargs["eos_token_id"]
    ends = set(ends) if isinstance(ends, (list, tuple)) else {ends}
    rows = [_cut_at(row.tolist(), ends) for row in output]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def _cut_at(ids: list[int], ends: set[int]) -> list[int]:
    # Up to the first end token: an end that is no special token ("\n") would survive decoding.
    for i, token in enumerate(ids):
        if token in ends:
            return ids[:i]
    return ids
