"""The hub-shaped test checkpoints (tests/hub_checkpoints.py) load the way users load the real ones and
carry the fields the code reads: special tokens, end-of-caption token, query tokens, dropout, processor."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2Processor

from blip2_dist.data.transforms import CaptionFormat
from blip2_dist.models import CLIP_MEAN, CLIP_STD, load_model

HUB_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


@pytest.fixture(params=["opt", "t5"])
def hub_dir(request):
    return request.getfixturevalue(f"hub_{request.param}_dir")


def test_files_and_processor_settings_are_the_hubs(hub_dir):
    assert {p.name for p in hub_dir.iterdir()} == HUB_FILES
    image = json.loads((hub_dir / "preprocessor_config.json").read_text())
    assert image["image_processor_type"] == "BlipImageProcessor"
    assert image["resample"] == 3 and image["do_convert_rgb"] and image["do_resize"]
    assert image["image_mean"] == CLIP_MEAN and image["image_std"] == CLIP_STD
    assert math.isclose(image["rescale_factor"], 1 / 255)
    assert set(image["size"]) == {"height", "width"}
    proc = json.loads((hub_dir / "processor_config.json").read_text())
    assert proc["num_query_tokens"] == 32 and proc["image_token"] == "<image>"
    processor = Blip2Processor.from_pretrained(hub_dir)
    assert processor.num_query_tokens == 32 and processor.image_processor.resample == 3
    model = Blip2ForConditionalGeneration.from_pretrained(hub_dir)
    assert not model.training  # from_pretrained hands models over in eval mode
    c = model.config
    assert c.num_query_tokens == 32
    assert c.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>") == len(processor.tokenizer) - 1
    assert model.get_input_embeddings().num_embeddings % 64 == 0
    assert model.get_input_embeddings().num_embeddings > c.image_token_index
    assert c.qformer_config.hidden_dropout_prob == c.qformer_config.attention_probs_dropout_prob == 0.1
    lm_dropout = c.text_config.dropout if c.text_config.model_type == "opt" else c.text_config.dropout_rate
    assert lm_dropout == 0.1


def test_opt_ends_captions_on_newline(hub_opt_dir):
    tok = AutoTokenizer.from_pretrained(hub_opt_dir)
    assert type(tok).__name__ == "GPT2Tokenizer"
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1  # add_prefix_space=False: "\n" is its own token
    ids = tok("a dog\n")["input_ids"]
    assert ids[0] == 2 and ids[-1] == newline[0]
    model = Blip2ForConditionalGeneration.from_pretrained(hub_opt_dir)
    assert model.config.text_config.eos_token_id == newline[0] != tok.eos_token_id
    assert model.generation_config.eos_token_id == newline[0]
    assert model.language_model.generation_config.eos_token_id == newline[0]  # what generate stops on
    assert (model.config.text_config.bos_token_id, model.config.text_config.pad_token_id) == (2, 1)


def test_t5_ids_and_untied_head(hub_t5_dir):
    tok = AutoTokenizer.from_pretrained(hub_t5_dir)
    assert type(tok).__name__ == "T5Tokenizer"
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, None)
    assert tok("a dog")["input_ids"][-1] == 1
    model = Blip2ForConditionalGeneration.from_pretrained(hub_t5_dir)
    t = model.config.text_config
    assert (t.decoder_start_token_id, t.pad_token_id, t.eos_token_id) == (0, 0, 1)
    assert not t.scale_decoder_outputs  # read from tie_word_embeddings=false, as in the hub config
    assert json.loads((hub_t5_dir / "config.json").read_text())["text_config"]["tie_word_embeddings"] is False
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()
    assert not torch.equal(lm.lm_head.weight, lm.shared.weight)
    assert model.generation_config.decoder_start_token_id == 0 and model.generation_config.eos_token_id == 1


def test_the_library_loads_and_trains_it(hub_dir):
    model, processor = load_model(str(hub_dir), dtype=torch.float32)
    fmt = CaptionFormat.from_processor(processor, model.config)
    batch = fmt.encode_train(["a small dog on the grass", "two red circles"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loss = model(pixel_values=pixels, **batch).loss
    assert math.isfinite(float(loss)) and float(loss) < 2 * math.log(model.config.text_config.vocab_size)
    model.train()  # dropout 0.1 draws: two forwards differ in train mode, not in eval mode
    with torch.no_grad():
        a, b = (model(pixel_values=pixels, **batch).loss for _ in range(2))
        model.eval()
        c, d = (model(pixel_values=pixels, **batch).loss for _ in range(2))
    assert a != b and c == d
