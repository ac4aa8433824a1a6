"""blip2_dist.models, .lora and .captioning on CPU: tiny models of both families, LoRA placement, adapters,
real-size counts.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_model.py
"""

import json
import math
import os

import pytest
import torch
from engine_wrapper import FakeEngine
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Blip2Config, Blip2ForConditionalGeneration

from blip2_dist import adapters as A
from blip2_dist.captioning import caption_loss, generate_captions
from blip2_dist.config import ModelArgs
from blip2_dist.lora import DEFAULT_TARGETS, apply_lora, describe_trainable, target_names
from blip2_dist.models import TINY_IMAGE_SIZE, ModelNotAvailableError, count_parameters, family_of, load_model

FAMILIES = ["t5", "opt"]
CAPTIONS = ["a red circle on the left", "two blue squares", "a small green star in the middle", "a dog"]
PROMPT = "a photo of"


def encode_batch(processor, family, captions, n_images=2, size=TINY_IMAGE_SIZE, seed=0):
    """A training micro-batch as the loader makes it (image tokens, prompt, masked labels)."""
    tok = processor.tokenizer
    image_ids = [tok.convert_tokens_to_ids("<image>")] * processor.num_query_tokens
    prompt = tok(PROMPT).input_ids  # T5: prompt + </s>; OPT: <s> + prompt
    rows, labels = [], []
    for caption in captions:
        if family == "t5":
            rows.append(image_ids + prompt)
            labels.append(tok(caption).input_ids)
        else:
            target = tok(" " + caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
            rows.append(image_ids + prompt + target)
            labels.append([-100] * (len(image_ids) + len(prompt)) + target)

    def pad(seqs, value):
        width = max(map(len, seqs))
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(n_images, 3, size, size, generator=generator),
        "image_index": torch.arange(len(captions)) % n_images,
        "input_ids": pad(rows, tok.pad_token_id),
        "attention_mask": pad([[1] * len(r) for r in rows], 0),
        "labels": pad(labels, -100),
    }


def prompt_inputs(processor, n=2, seed=1):
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids("<image>")] * processor.num_query_tokens + tok(PROMPT).input_ids
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    input_ids = torch.tensor([ids] * n)
    return pixel_values, input_ids, torch.ones_like(input_ids)


def logits_of(model, batch):
    with torch.no_grad():
        out = model(
            pixel_values=batch["pixel_values"][batch["image_index"]],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
    return out.logits


def lora_module_names(peft_model):
    return [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]


def simulate_training(peft_model, seed=0):
    """Give LoRA B (zero at init) and the trainable extras new values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator).to(param.dtype))


# ----------------------------------------------------------------------------- building and loss


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_loss_is_finite_and_grads_reach_only_lora(family):
    model, processor = load_model(f"tiny-{family}", dtype=torch.float32)
    assert family_of(model) == family and model.config.image_token_index is not None
    peft_model = apply_lora(model)
    batch = encode_batch(processor, family, CAPTIONS)
    loss = caption_loss(peft_model, batch)
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    # image_index picks rows: the same as passing each example's image itself.
    expanded = dict(batch, pixel_values=batch["pixel_values"][batch["image_index"]])
    del expanded["image_index"]
    torch.testing.assert_close(caption_loss(peft_model, expanded), loss)


def test_tiny_is_deterministic_given_seed():
    a, _ = load_model("tiny-t5", dtype=torch.float32, seed=3)
    b, _ = load_model("tiny-t5", dtype=torch.float32, seed=3)
    c, _ = load_model("tiny-t5", dtype=torch.float32, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.query_tokens, c.query_tokens)


def test_bf16_smoke():
    model, processor = load_model("tiny-opt")  # bf16 is the default dtype
    assert model.query_tokens.dtype == torch.bfloat16
    peft_model = apply_lora(model, ModelArgs(train_query_tokens=True))
    loss = caption_loss(peft_model, encode_batch(processor, "opt", CAPTIONS))  # float32 pixels cast
    assert torch.isfinite(loss)
    loss.backward()
    assert model.query_tokens.grad is not None and torch.isfinite(model.query_tokens.grad).all()
    peft_model.eval()
    captions = generate_captions(peft_model, processor, *prompt_inputs(processor), max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


# ----------------------------------------------------------------------------- LoRA placement


@pytest.mark.parametrize("family, expected", [("t5", 12), ("opt", 4)])
def test_default_targets_only_in_language_model(family, expected):
    # tiny T5: 2 encoder layers x (q, v) + 2 decoder layers x (self q, v + cross q, v) = 12; OPT: 2 x 2.
    model, _ = load_model(f"tiny-{family}", dtype=torch.float32)
    peft_model = apply_lora(model)
    names = lora_module_names(peft_model)
    assert len(names) == expected
    assert all(n.startswith("base_model.model.language_model.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(DEFAULT_TARGETS[family])
    assert peft_model.peft_config["default"].task_type is None  # peft issue 2528


@pytest.mark.parametrize(
    "family, settings, match",
    [
        ("t5", ModelArgs(lora_targets=["q_proj", "v_proj"]), r"T5.*valid names there: \['k', 'o', 'q', 'v'"),
        ("opt", ModelArgs(lora_targets=["q", "v"]), r"OPT.*'q_proj'"),
        ("opt", ModelArgs(lora_targets=["query"]), r"language_model"),  # a Q-Former name, not the LM's
        ("t5", ModelArgs(vision_lora_targets=["q"]), r"vision_model.*'qkv'"),
        ("t5", ModelArgs(lora_targets=[]), r"target nothing"),
    ],
)
def test_wrong_targets_raise_clear_errors(family, settings, match):
    model, _ = load_model(f"tiny-{family}", dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        apply_lora(model, settings)


def test_settings_validation():
    assert target_names("q, v") == ["q", "v"]
    assert target_names("") is None  # an empty config-file value means the family default
    model, _ = load_model("tiny-opt", dtype=torch.float32)
    for bad, match in [
        (ModelArgs(train_qformer=True, qformer_lora_targets=["query"]), "--qformer-lora-targets"),
        (ModelArgs(lora_r=0), "r and alpha"),
        (ModelArgs(lora_dropout=1.0), "dropout"),
    ]:
        with pytest.raises(ValueError, match=match):
            apply_lora(model, bad)
        assert all(p.requires_grad for p in model.parameters())  # refused before anything changed
    peft_model = apply_lora(model, ModelArgs(lora_targets="q_proj, k_proj"))  # a config file's string
    assert {n.rsplit(".", 1)[-1] for n in lora_module_names(peft_model)} == {"q_proj", "k_proj"}
    assert model.blip2_dist_lora["targets"] == ["q_proj", "k_proj"]  # what the adapter records


def test_qformer_and_vision_targets():
    model, _ = load_model("tiny-opt", dtype=torch.float32)
    settings = ModelArgs(qformer_lora_targets=["query", "value"], vision_lora_targets=["qkv"])
    peft_model = apply_lora(model, settings)
    names = lora_module_names(peft_model)
    by_part = {part: [n for n in names if f".{part}." in n] for part in ("language_model", "qformer", "vision_model")}
    # tiny Q-Former: 2 layers, cross-attention in every layer -> (self + cross) x (query, value) x 2 = 8.
    assert len(by_part["qformer"]) == 8 and len(by_part["vision_model"]) == 2
    assert len(by_part["language_model"]) == 4 and len(names) == 14


@pytest.mark.parametrize(
    "settings, extra_prefixes",
    [
        (ModelArgs(), set()),
        (ModelArgs(train_query_tokens=True), {"query_tokens"}),
        (ModelArgs(train_language_projection=True), {"language_projection"}),
        (ModelArgs(train_qformer=True), {"query_tokens", "qformer", "language_projection"}),
    ],
)
def test_train_flags_change_the_trainable_set(settings, extra_prefixes):
    model, _ = load_model("tiny-t5", dtype=torch.float32)
    peft_model = apply_lora(model, settings)
    trainable = {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad}
    non_lora = {n.split(".")[0] for n in trainable if "lora_" not in n}
    assert non_lora == extra_prefixes
    if "qformer" in extra_prefixes:  # the WHOLE Q-Former
        assert all(p.requires_grad for p in model.qformer.parameters())
    assert not any(p.requires_grad for p in model.vision_model.parameters())


def test_describe_trainable_counts():
    model, _ = load_model("tiny-t5", dtype=torch.float32)
    total_base = sum(p.numel() for p in model.parameters())
    r = 4
    peft_model = apply_lora(model, ModelArgs(lora_r=r, train_query_tokens=True))
    # Independent count: every targeted T5 q/v is a d_model x (heads * d_kv) Linear: r * (in + out) each.
    text = model.config.text_config
    per_module = r * (text.d_model + text.num_heads * text.d_kv)
    lora = 12 * per_module
    query = model.config.num_query_tokens * model.config.qformer_config.hidden_size
    expected_trainable = lora + query
    expected_total = total_base + lora
    line = describe_trainable(peft_model)
    assert line == (
        f"trainable params: {expected_trainable:,d} || all params: {expected_total:,d} || "
        f"trainable%: {100 * expected_trainable / expected_total:.4f}"
    )


# ----------------------------------------------------------------------------- real loading path


@pytest.mark.parametrize("family", FAMILIES)
def test_local_dir_loads_through_from_pretrained(family, tmp_path):
    model, processor = load_model(f"tiny-{family}", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path), dtype=torch.float32)
    assert type(loaded) is Blip2ForConditionalGeneration
    assert loaded_processor.num_query_tokens == model.config.num_query_tokens
    batch = encode_batch(loaded_processor, family, CAPTIONS)
    assert torch.equal(logits_of(model.eval(), batch), logits_of(loaded.eval(), batch))


def test_legacy_checkpoint_without_image_token_fields(tmp_path):
    # Older hub repos: no image_token_index in config.json, no num_query_tokens in the processor.
    model, processor = load_model("tiny-t5", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    for name, key in (("config.json", "image_token_index"), ("processor_config.json", "num_query_tokens")):
        data = json.loads((tmp_path / name).read_text())
        data.pop(key)
        (tmp_path / name).write_text(json.dumps(data))
    loaded, loaded_processor = load_model(str(tmp_path), dtype=torch.float32)
    assert loaded.config.image_token_index == model.config.image_token_index
    assert loaded_processor.num_query_tokens == model.config.num_query_tokens
    batch = encode_batch(loaded_processor, "t5", CAPTIONS)
    assert torch.equal(logits_of(model.eval(), batch), logits_of(loaded.eval(), batch))


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match=r"'Salesforce/blip2-opt-2\.7b'.*offline"):
        load_model("Salesforce/blip2-opt-2.7b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_model(str(tmp_path))


# ----------------------------------------------------------------------------- adapters


def _trained(family, settings, seed=0):
    model, processor = load_model(f"tiny-{family}", dtype=torch.float32)
    peft_model = apply_lora(model, settings)
    simulate_training(peft_model, seed)
    return peft_model.eval(), processor


GEN = {
    "greedy": dict(num_beams=1, max_new_tokens=8),
    "beam": dict(num_beams=3, max_new_tokens=8, min_length=2, repetition_penalty=1.2),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_roundtrip_with_trained_query_tokens(family, tmp_path):
    peft_model, processor = _trained(family, ModelArgs(train_query_tokens=True, train_language_projection=True))
    batch = encode_batch(processor, family, CAPTIONS)
    inputs = prompt_inputs(processor)
    expected = {k: generate_captions(peft_model, processor, *inputs, **kw) for k, kw in GEN.items()}
    expected_logits = logits_of(peft_model, batch)

    out = tmp_path / "adapter"
    A.save_adapter(peft_model, processor, out, base_name=f"tiny-{family}")
    meta = json.loads((out / A.ADAPTER_META).read_text())
    assert meta["family"] == family and meta["base_dir"] == "base"
    assert meta["lora"] == {  # the adapter format's keys, the defaults of the model section
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "targets": None,
        "qformer_targets": None,
        "vision_targets": None,
        "train_qformer": False,
        "train_query_tokens": True,
        "train_language_projection": True,
    }
    assert set(meta["extras"]) == {"query_tokens", "language_projection.weight", "language_projection.bias"}
    assert (out / "adapter_config.json").exists() and (out / A.EXTRAS_FILE).exists()

    loaded, loaded_processor = A.load_for_inference(f"tiny-{family}", out, dtype=torch.float32)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits_of(loaded, batch), expected_logits)
    for kind, kwargs in GEN.items():
        assert generate_captions(loaded, loaded_processor, *inputs, **kwargs) == expected[kind], kind

    # Without the extras the adapter alone is not the trained model.
    base, _ = load_model(str(out / "base"), dtype=torch.float32)
    adapter_only = PeftModel.from_pretrained(base, str(out)).eval()
    assert not torch.allclose(logits_of(adapter_only, batch), expected_logits)
    # ... and the README's plain transformers + peft recipe, extras included, is.
    result = adapter_only.get_base_model().load_state_dict(load_file(out / A.EXTRAS_FILE), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(logits_of(adapter_only, batch), expected_logits)

    merged, _ = A.load_for_inference(None, out, dtype=torch.float32, merge=True)  # base from the json
    assert type(merged) is Blip2ForConditionalGeneration
    torch.testing.assert_close(logits_of(merged, batch), expected_logits, rtol=1e-3, atol=2e-3)  # merge rounds


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_peft_loading_without_extras(family, tmp_path):
    peft_model, processor = _trained(family, ModelArgs(qformer_lora_targets=["query", "value"]))
    batch = encode_batch(processor, family, CAPTIONS)
    A.save_adapter(peft_model, processor, tmp_path, base_name=f"tiny-{family}")
    assert not (tmp_path / A.EXTRAS_FILE).exists()
    # What a user does with plain transformers + peft:
    base = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(logits_of(plain, batch), logits_of(peft_model, batch))


def test_real_base_adapter_records_name_and_has_no_base_copy(tmp_path):
    # A local-dir base (the hub-id path): the adapter points at it, nothing copied.
    model, processor = load_model("tiny-opt", dtype=torch.float32)
    base_dir = tmp_path / "base_model"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    loaded, processor = load_model(str(base_dir), dtype=torch.float32)
    peft_model = apply_lora(loaded, ModelArgs(train_query_tokens=True))
    simulate_training(peft_model)
    peft_model.eval()
    out = tmp_path / "adapter"
    A.save_adapter(peft_model, processor, out, base_name=str(base_dir))
    assert not (out / "base").exists()
    again, again_processor = A.load_for_inference(None, out, dtype=torch.float32)
    batch = encode_batch(processor, "opt", CAPTIONS)
    assert torch.equal(logits_of(again, batch), logits_of(peft_model, batch))
    # Re-exporting without extras into the same directory removes the stale extras file.
    plain = apply_lora(load_model(str(base_dir), dtype=torch.float32)[0])
    A.save_adapter(plain, processor, out, base_name=str(base_dir))
    assert not (out / A.EXTRAS_FILE).exists()


def test_tiny_base_seed_mismatch_is_caught(tmp_path):
    model, processor = load_model("tiny-t5", dtype=torch.float32, seed=1)
    peft_model = apply_lora(model)
    with pytest.raises(RuntimeError, match="seed=0"):
        A.save_adapter(peft_model, processor, tmp_path, base_name="tiny-t5", seed=0)
    A.save_adapter(peft_model, processor, tmp_path, base_name="tiny-t5")  # seed recorded by load_model


def test_engine_wrapped_model_works_everywhere(tmp_path):
    peft_model, processor = _trained("t5", ModelArgs())
    engine = FakeEngine(peft_model)
    batch = encode_batch(processor, "t5", CAPTIONS)
    torch.testing.assert_close(caption_loss(engine, batch), caption_loss(peft_model, batch))
    inputs = prompt_inputs(processor)
    assert generate_captions(engine, processor, *inputs) == generate_captions(peft_model, processor, *inputs)
    A.save_adapter(engine, processor, tmp_path, base_name="tiny-t5")
    assert (tmp_path / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- generation


def test_generation_length_options_and_opt_padding():
    model, processor = load_model("tiny-opt", dtype=torch.float32)
    model.eval()
    pixel_values, input_ids, attention_mask = prompt_inputs(processor)
    tok = processor.tokenizer
    # min_length counts caption tokens (not the 8 image tokens + prompt): forced non-empty captions.
    captions = generate_captions(
        model,
        processor,
        pixel_values,
        input_ids,
        attention_mask,
        min_length=4,
        max_length=4,
        bad_words_ids=[[tok.eos_token_id]],
    )
    assert all(len(tok(c, add_special_tokens=False).input_ids) >= 3 for c in captions)
    right_padded = torch.cat([attention_mask, torch.zeros_like(attention_mask[:, :1])], 1)
    padded_ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], tok.pad_token_id)], 1)
    with pytest.raises(ValueError, match="left"):
        generate_captions(model, processor, pixel_values, padded_ids, right_padded)


# ----------------------------------------------------------------------------- real architectures


@pytest.mark.parametrize(
    "name, low, high",
    [("Salesforce/blip2-opt-2.7b", 3.74e9, 3.9e9), ("Salesforce/blip2-flan-t5-xl", 3.85e9, 4.0e9)],
)
def test_random_init_real_sizes_on_meta(name, low, high):
    assert low <= count_parameters(name) <= high


def test_random_init_real_architecture_and_notebook_lora_count():
    model, processor = load_model("Salesforce/blip2-opt-2.7b", random_init=True, device="meta")
    vision, qformer, text = model.config.vision_config, model.config.qformer_config, model.config.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.patch_size, vision.image_size) == (39, 1408, 14, 224)
    assert (qformer.num_hidden_layers, qformer.hidden_size, qformer.cross_attention_frequency) == (12, 768, 2)
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (2560, 32, 50272)
    assert processor.num_query_tokens == 32 == model.config.num_query_tokens
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    # The HF notebook's LoRA (r=16, alpha=32, q_proj + k_proj) on blip2-opt-2.7b: 5,242,880, what
    # peft's print_trainable_parameters reports for it (32 layers x 2 x 16 x (2560 + 2560)).
    peft_model = apply_lora(model, ModelArgs(lora_targets=["q_proj", "k_proj"]))
    assert describe_trainable(peft_model).startswith("trainable params: 5,242,880 ||")


def test_random_init_from_local_config_untied_t5_head(tmp_path):
    # A FLAN-T5-like text model (own lm_head, no output scaling), given as a local config.json.
    tiny = load_model("tiny-t5", dtype=torch.float32)[0].config
    vocab = 1024
    config = Blip2Config(
        vision_config=tiny.vision_config.to_dict(),
        qformer_config=tiny.qformer_config.to_dict(),
        text_config=dict(tiny.text_config.to_dict(), vocab_size=vocab, scale_decoder_outputs=False),
        num_query_tokens=tiny.num_query_tokens,
    )
    config.save_pretrained(tmp_path)
    model, processor = load_model(str(tmp_path), random_init=True, dtype=torch.float32)
    lm = model.language_model
    assert lm.lm_head.weight is not lm.shared.weight and lm.lm_head.weight.shape == (vocab, 64)
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    loss = caption_loss(model, encode_batch(processor, "t5", CAPTIONS))
    assert math.log(vocab) - 1 < loss.item() < math.log(vocab) + 2  # not ~30+: the head is scaled


def test_random_init_unknown_name():
    with pytest.raises(ValueError, match="known"):
        load_model("someone/blip2-unknown", random_init=True, device="meta")


def test_random_init_offline_env_untouched():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: nothing here may reach the hub
