"""The end-of-caption rule: labels end on the token generation stops on (`end_of_caption_id`)."""

from __future__ import annotations

import torch
from transformers import Blip2ForConditionalGeneration

from blip2_dist.captioning import generate_captions
from blip2_dist.data.transforms import IGNORE_INDEX, CaptionFormat, end_of_caption_id
from blip2_dist.models import load_model


def last_label(batch: dict, row: int = 0) -> int:
    labels = batch["labels"][row]
    return int(labels[labels != IGNORE_INDEX][-1])


def test_opt_hub_checkpoint_captions_end_on_newline(hub_opt_dir):
    model, processor = load_model(str(hub_opt_dir), dtype=torch.float32)
    fmt = CaptionFormat.from_processor(processor, model.config)
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert fmt.end_id == newline[0] == model.config.text_config.eos_token_id != processor.tokenizer.eos_token_id
    batch = fmt.encode_train(["a dog on the grass", "two dogs"])
    assert last_label(batch, 0) == last_label(batch, 1) == fmt.end_id
    # What LAVIS trains on: the caption followed by "\n", one token, nothing after it.
    ids = [int(t) for t in batch["labels"][0] if t != IGNORE_INDEX]
    assert ids == processor.tokenizer("a dog on the grass\n", add_special_tokens=False)["input_ids"]


def test_a_newline_inside_a_caption_does_not_end_it(hub_opt_dir):
    model, processor = load_model(str(hub_opt_dir), dtype=torch.float32)
    fmt = CaptionFormat.from_processor(processor, model.config)
    split, joined = fmt.encode_train(["a dog\non the  grass\n"]), fmt.encode_train(["a dog on the grass"])
    assert torch.equal(split["labels"], joined["labels"])
    assert (split["labels"][0] == fmt.end_id).sum() == 1


def test_t5_and_tiny_models_end_on_their_eos(hub_t5_dir):
    for name in (str(hub_t5_dir), "tiny-t5", "tiny-opt"):
        model, processor = load_model(name, dtype=torch.float32)
        fmt = CaptionFormat.from_processor(processor, model.config)
        assert fmt.end_id == processor.tokenizer.eos_token_id == model.config.text_config.eos_token_id
        assert last_label(fmt.encode_train(["a red circle"])) == fmt.end_id
        if name == str(hub_t5_dir):  # the encoder input still ends with what the tokenizer appends
            assert fmt.head_ids[-1] == processor.tokenizer.eos_token_id == 1


def test_end_of_caption_id_reads_the_language_model_config():
    config = Blip2ForConditionalGeneration.config_class(text_config={"model_type": "opt", "eos_token_id": [7, 2]})
    assert end_of_caption_id(config, tokenizer=None) == 7  # a list: the first is the one taught


def test_generation_stops_on_and_cuts_at_the_end_token(hub_opt_dir):
    """An untrained model rarely emits "\\n": force it with a bias on the output, then check the cut."""
    model, processor = load_model(str(hub_opt_dir), dtype=torch.float32)
    fmt = CaptionFormat.from_processor(processor, model.config)
    head = model.language_model.lm_head
    word = processor.tokenizer(" dog", add_special_tokens=False)["input_ids"][0]
    bias = torch.full((head.out_features,), -50.0)
    bias[word], bias[fmt.end_id] = 10.0, 0.0  # "dog" first, then "\n" once min_new_tokens is met
    head.bias = torch.nn.Parameter(bias)
    prompts = fmt.encode_prompts(2)
    captions = generate_captions(
        model.eval(),
        processor,
        torch.randn(2, 3, 32, 32),
        prompts["input_ids"],
        prompts["attention_mask"],
        num_beams=1,
        max_new_tokens=6,
        min_new_tokens=0,
    )
    assert captions == ["dog dog dog dog dog dog"] * 2  # "\n" never beats "dog": no end, runs to the limit
    bias[fmt.end_id] = 20.0
    captions = generate_captions(
        model,
        processor,
        torch.randn(2, 3, 32, 32),
        prompts["input_ids"],
        prompts["attention_mask"],
        num_beams=2,
        max_new_tokens=6,
        min_new_tokens=2,
    )
    assert captions == ["dog dog"] * 2  # stopped on "\n" as soon as allowed, and nothing after it kept
