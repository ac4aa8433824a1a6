"""The grouped image path of caption_loss equals the ungrouped one: losses and every trainable gradient.

Both families (tiny models, float32), every trainable part (LM LoRA, query tokens, Q-Former LoRA, the
whole Q-Former, vision LoRA), unequal caption counts per image, an image whose captions straddle two
micro-batches, active dropout (the same masks are drawn), and the engine wrappers.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_grouped.py
"""

import pytest
import torch
from engine_wrapper import FakeEngine

from blip2_dist.captioning import caption_loss, image_sharing
from blip2_dist.config import ModelArgs
from blip2_dist.data.synthetic import synthetic_batches
from blip2_dist.engine import CaptionLossModule
from blip2_dist.lora import apply_lora, unwrap_blip2
from blip2_dist.models import load_model

FAMILIES = ["t5", "opt"]
SETTINGS = {
    "lm_lora": ModelArgs(),
    "query_tokens": ModelArgs(train_query_tokens=True),
    "qformer_lora": ModelArgs(qformer_lora_targets=["query", "value"], lora_dropout=0.0),
    "train_qformer": ModelArgs(train_qformer=True),
    "vision_lora": ModelArgs(vision_lora_targets=["qkv", "fc1"], lora_dropout=0.0, train_query_tokens=True),
}


def build(family, settings, seed=0):
    model, processor = load_model(f"tiny-{family}", dtype=torch.float32, seed=seed)
    peft_model = apply_lora(model, settings)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at zero: give every trainable tensor a trained-like value
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return peft_model.train(), processor


def batches(processor, model, n=2, micro_batch=7, captions_per_image=3):
    """Micro-batches as the stream cuts them: groups of 3 captions into batches of 7, so images have
    1, 2 or 3 captions in a batch and one image straddles the two batches."""
    return synthetic_batches(
        processor, model.config, n_batches=n, micro_batch=micro_batch, captions_per_image=captions_per_image, seed=3
    )


def loss_and_grads(model, batch_list, group_images, seed=11):
    model.zero_grad(set_to_none=True)
    losses = []
    for i, batch in enumerate(batch_list):
        torch.manual_seed(seed + i)  # dropout, where active, draws from here
        loss = caption_loss(model, batch, group_images=group_images)
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    # Key biases get exactly-zero gradients in theory (softmax ignores them): float noise of ~1e-10
    # there, so the absolute tolerance is scaled by the largest gradient of the model.
    scale = max(g.abs().max().item() for g in grads_a.values())
    assert scale > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


class CountRows:
    """Batch sizes seen by a module's forward."""

    def __init__(self, module):
        self.rows = []
        self.handle = module.register_forward_hook(
            lambda m, args, kwargs, out: self.rows.append((args[0] if args else next(iter(kwargs.values()))).shape[0]),
            with_kwargs=True,
        )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_grouped_equals_ungrouped(family, setting):
    model, processor = build(family, SETTINGS[setting])
    data = batches(processor, model)
    blip2 = unwrap_blip2(model)
    index = [b["image_index"].tolist() for b in data]
    assert any(len(set(ix)) < len(ix) for ix in index)  # images share a batch ...
    counts = [sorted(torch.bincount(b["image_index"]).tolist()) for b in data]
    assert any(len(set(c)) > 1 for c in counts)  # ... with unequal caption counts
    vision = CountRows(blip2.vision_model)
    grouped = loss_and_grads(model, data, group_images=True)
    assert vision.rows == [len(b["pixel_values"]) for b in data]  # once per image
    vision.rows.clear()
    ungrouped = loss_and_grads(model, data, group_images=False)
    assert vision.rows == [len(b["input_ids"]) for b in data]  # once per caption
    assert_same(grouped, ungrouped)
    if setting in ("train_qformer", "query_tokens"):
        assert all(t.abs().sum() > 0 for n, t in grouped[1].items() if "query_tokens" in n)


def test_straddling_image_is_in_both_batches():
    """The stream puts a straddling image in both batches' pixel_values; gradients accumulate over
    both exactly as when every caption carries its own copy of the image."""
    model, processor = build("opt", SETTINGS["train_qformer"])
    first, second = batches(processor, model, n=2, micro_batch=7, captions_per_image=3)
    # images 0,1 whole + image 2's first caption; then image 2's last two captions + images 3, 4
    assert first["image_index"].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert second["image_index"].tolist()[:2] == [0, 0]
    assert torch.equal(first["pixel_values"][2], second["pixel_values"][0])
    assert_same(loss_and_grads(model, [first, second], True), loss_and_grads(model, [first, second], False))


@pytest.mark.parametrize("family", FAMILIES)
def test_active_dropout_draws_the_same_masks(family):
    """Real BLIP-2 has Q-Former dropout 0.1: in train mode the Q-Former runs once per caption on the
    repeated image features, drawing the same masks in the same order as the ungrouped forward."""
    model, processor = build(family, ModelArgs(train_query_tokens=True, lora_dropout=0.1))
    blip2 = unwrap_blip2(model)
    for module in list(blip2.qformer.modules()) + list(blip2.language_model.modules()):
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.1
    assert image_sharing(model) == (True, False)
    data = batches(processor, model)
    vision, qformer = CountRows(blip2.vision_model), CountRows(blip2.qformer)
    grouped = loss_and_grads(model, data, group_images=True)
    assert vision.rows == [len(b["pixel_values"]) for b in data]
    assert qformer.rows == [len(b["input_ids"]) for b in data]
    assert_same(grouped, loss_and_grads(model, data, group_images=False))
    other_seed = loss_and_grads(model, data, group_images=True, seed=99)[0]
    assert not torch.allclose(other_seed, grouped[0])  # dropout really is active
    model.eval()  # no dropout: the Q-Former too runs once per image
    assert image_sharing(model) == (True, True)


def test_vision_dropout_falls_back_to_per_caption():
    """LoRA dropout on vision targets makes the ViT random per caption: nothing is shared (exact)."""
    model, processor = build("t5", ModelArgs(vision_lora_targets=["qkv"], lora_dropout=0.1))
    assert image_sharing(model) == (False, False)
    data = batches(processor, model)
    vision = CountRows(unwrap_blip2(model).vision_model)
    grouped = loss_and_grads(model, data, group_images=True)
    assert vision.rows == [len(b["input_ids"]) for b in data]
    assert_same(grouped, loss_and_grads(model, data, group_images=False))
    model.eval()
    assert image_sharing(model) == (True, True)


def test_frozen_vision_runs_without_autograd():
    model, processor = build("opt", ModelArgs(train_query_tokens=True))
    seen = []
    unwrap_blip2(model).vision_model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(out.last_hidden_state.requires_grad), with_kwargs=True
    )
    caption_loss(model, batches(processor, model, n=1)[0]).backward()
    assert seen == [False]


@pytest.mark.parametrize("family", FAMILIES)
def test_through_the_trainer_module_and_engine(family):
    model, processor = build(family, SETTINGS["query_tokens"])
    batch = batches(processor, model, n=1)[0]
    reference = loss_and_grads(model, [batch], group_images=False)
    for group_images in (True, False):
        engine = FakeEngine(CaptionLossModule(model, group_images=group_images))
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        loss = engine(batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert_same((loss.detach()[None], grads), reference)
    # caption_loss given the engine itself (the docstring's case)
    torch.manual_seed(11)
    torch.testing.assert_close(caption_loss(FakeEngine(model), batch), reference[0][0], rtol=1e-6, atol=1e-6)


def test_one_image_per_example_without_image_index():
    model, processor = build("t5", SETTINGS["lm_lora"])
    batch = batches(processor, model, n=1)[0]
    expanded = dict(batch, pixel_values=batch["pixel_values"][batch["image_index"]])
    del expanded["image_index"]
    torch.manual_seed(0)
    a = caption_loss(model, expanded)
    torch.manual_seed(0)
    torch.testing.assert_close(a, caption_loss(model, batch), rtol=1e-6, atol=1e-6)


def test_bf16_grouped_close_to_ungrouped():
    model, processor = load_model("tiny-opt", dtype=torch.bfloat16)
    peft_model = apply_lora(model, ModelArgs(train_query_tokens=True)).eval()
    batch = batches(processor, model, n=1)[0]
    with torch.no_grad():
        a = caption_loss(peft_model, batch, group_images=True)
        b = caption_loss(peft_model, batch, group_images=False)
    assert torch.isfinite(a) and abs(a.item() - b.item()) < 0.05
