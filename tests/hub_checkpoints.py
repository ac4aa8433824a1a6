"""Tiny BLIP-2 checkpoints shaped like the hub repos, for tests that load models the way users do.

    path = save_hub_checkpoint("opt", tmp / "opt")   # like Salesforce/blip2-opt-2.7b
    path = save_hub_checkpoint("t5", tmp / "t5")     # like Salesforce/blip2-flan-t5-xl
    model = Blip2ForConditionalGeneration.from_pretrained(path)   # or --model PATH on any command

Nothing can be downloaded here, so the weights are random and the sizes tiny (hidden 64, 2 layers,
32x32 images: a CPU test fine-tunes one in seconds), but the files and the fields the code reads are
those of the hub repos:

  files      config.json, generation_config.json, model.safetensors, preprocessor_config.json
             (BlipImageProcessor), processor_config.json, tokenizer.json, tokenizer_config.json,
             special_tokens_map.json: the hub's layout (transformers 5's own save_pretrained folds the
             image processor into processor_config.json and writes no special_tokens_map.json; the
             layout is rewritten here to the hub's, which transformers 5 loads as well).
  images     bicubic (resample 3), rescale 1/255, CLIP mean/std, do_convert_rgb, size {height, width}.
  queries    num_query_tokens 32; image_token_index = the id of "<image>", added to the tokenizer
             after its own vocabulary, as on the hub.
  dropout    0.1 in the language model (OPT `dropout`, T5 `dropout_rate`) and in the Q-Former (hidden
             and attention probabilities); the vision encoder has none. Saved models load in eval mode.
  OPT        a byte-level BPE (GPT2Tokenizer) trained here with add_prefix_space=False, so "\\n" is a
             token of its own, as in GPT-2's vocabulary (id 50118 on the hub). `<s>` 0, `<pad>` 1,
             `</s>` 2 = BOS and EOS (the tokenizer puts it in front of every text), `<unk>` 3.
             text_config.eos_token_id and generation_config.json's eos_token_id are the "\\n" token:
             the hub model ends captions on a newline, not on `</s>`.
  T5         a Unigram tokenizer (T5Tokenizer, Metaspace "▁") built from the corpus's word counts:
             `<pad>` 0, `</s>` 1 (appended to every text), `<unk>` 2, 100 `<extra_id_N>` sentinels after
             the pieces. decoder_start 0, text_config tie_word_embeddings false (FLAN-T5: its own lm_head,
             no output scaling), and an lm_head saved apart from the shared embedding.
  vocab      the model's embedding rows padded to a multiple of 64 past the tokenizer (the hub pads
             50265 -> 50304 for OPT, 32101 -> 32128 for FLAN-T5).
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    GenerationConfig,
    GPT2Tokenizer,
    OPTConfig,
    T5Config,
    T5Tokenizer,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from blip2_dist.models import CLIP_MEAN, CLIP_STD, TINY_CORPUS_WORDS, init_query_tokens, untie_t5_head

HUB_NAMES = {"opt": "Salesforce/blip2-opt-2.7b", "t5": "Salesforce/blip2-flan-t5-xl"}
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 32  # the hub value
DROPOUT = 0.1  # the hub value, language model and Q-Former
T5_EXTRA_IDS = 100  # FLAN-T5's sentinel count
HIDDEN = 64
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT's GPT-2 vocabulary
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0..2, as in T5's SentencePiece model


# Caption words beyond the tiny tokenizer's, so common captions are a few whole-word tokens, as with the
# hub's 50k / 32k vocabularies.
MORE_WORDS = """runs across fence road car cars house tree trees sky cloud table chair food plate cup cat cats
horse bird birds dogs puppy wall window door sign building city park bench mountain river lake boat
wearing holding looking down up over under front back through into while his her their its
""".split()


def _corpus() -> list[str]:
    words = TINY_CORPUS_WORDS + MORE_WORDS
    sentences = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    sentences += [f"a {w} with a {v} and the {u}" for w, v, u in zip(words, words[1:], words[2:])]
    return sentences * 20 + [s + "\n" for s in sentences] * 5


def build_opt_tokenizer() -> GPT2Tokenizer:
    """GPT-2-style byte-level BPE with OPT's special tokens; "\\n" stays a single token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=OPT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GPT2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        add_prefix_space=False,
        add_bos_token=True,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def build_t5_tokenizer() -> T5Tokenizer:
    """SentencePiece-style Unigram with T5's special tokens and sentinels. Its pieces are the corpus's
    words ("▁word", log-frequency scores) and single characters (scored far lower, so any text still
    encodes): tokenizers' Unigram trainer, on a corpus this small, keeps mostly characters."""
    counts = Counter(w for sentence in _corpus() for w in sentence.split())
    total = sum(counts.values())
    chars = sorted({c for w in counts for c in w} | set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [(t, 0.0) for t in T5_SPECIALS] + [("▁", math.log(1 / total))]
    vocab += [("▁" + w, math.log(n / total)) for w, n in counts.most_common()]
    vocab += [(c, math.log(1 / total) - 10.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS)


def _text_config(family: str, tokenizer, vocab_size: int) -> dict:
    if family == "opt":
        newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE spelling of "\n"
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            word_embed_proj_dim=HIDDEN,
            ffn_dim=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            dropout=DROPOUT,
            attention_dropout=0.0,
            activation_dropout=0.0,
            activation_function="relu",
            do_layer_norm_before=True,
            enable_bias=True,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=newline,
        ).to_dict()
    return T5Config(
        vocab_size=vocab_size,
        d_model=HIDDEN,
        d_kv=16,
        d_ff=2 * HIDDEN,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=DROPOUT,
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ).to_dict()


def _generation_config(family: str, text: dict) -> GenerationConfig:
    if family == "opt":
        return GenerationConfig(
            bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"]
        )
    return GenerationConfig(
        decoder_start_token_id=text["decoder_start_token_id"],
        eos_token_id=text["eos_token_id"],
        pad_token_id=text["pad_token_id"],
    )


def build_hub_like(family: str, seed: int = 0) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """The model and processor in memory (what save_hub_checkpoint writes)."""
    if family not in HUB_NAMES:
        raise ValueError(f"family must be one of {sorted(HUB_NAMES)}, got {family!r}")
    tokenizer = build_opt_tokenizer() if family == "opt" else build_t5_tokenizer()
    image_processor = BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)  # adds <image>
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    text = _text_config(family, tokenizer, vocab_size)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=8,
            layer_norm_eps=1e-6,
            qkv_bias=True,
            attention_dropout=0.0,
            # The hub's 1e-10 would give every image the same features in a random frozen ViT.
            initializer_range=0.02,
        ),
        qformer_config=dict(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * HIDDEN,
            encoder_hidden_size=HIDDEN,
            cross_attention_frequency=2,
            hidden_dropout_prob=DROPOUT,
            attention_probs_dropout_prob=DROPOUT,
            max_position_embeddings=64,
            vocab_size=128,
        ),
        text_config=text,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    init_query_tokens(model)
    if family == "t5":
        untie_t5_head(model)  # FLAN-T5 checkpoints carry their own lm_head
    model.generation_config = _generation_config(family, text)
    return model.eval(), processor


def save_hub_checkpoint(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny checkpoint of `family` ("opt" or "t5") into out_dir in the hub's layout; return it."""
    out = Path(out_dir)
    model, processor = build_hub_like(family, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _hub_layout(out, processor, family)
    return out


def _hub_layout(out: Path, processor: Blip2Processor, family: str) -> None:
    """Rewrite transformers 5's files into the hub repos' layout (see the module docstring)."""
    proc = json.loads((out / "processor_config.json").read_text())
    image = proc.pop("image_processor")
    image["processor_class"] = "Blip2Processor"
    _write(out / "preprocessor_config.json", image)
    proc["image_token"] = "<image>"  # the token's text; transformers 5 takes it from the tokenizer
    _write(out / "processor_config.json", proc)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok = processor.tokenizer
    specials = {"eos_token": tok.eos_token, "pad_token": tok.pad_token, "unk_token": tok.unk_token}
    if family == "opt":
        specials["bos_token"] = tok.bos_token
        tok_config["add_bos_token"] = True  # OPT's tokenizer puts </s> in front of every text
    else:
        specials["additional_special_tokens"] = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    _write(out / "tokenizer_config.json", tok_config)
    _write(out / "special_tokens_map.json", specials)
    if family == "t5":  # the hub's FLAN-T5 text config, written before transformers forced ties
        config = json.loads((out / "config.json").read_text())
        config["text_config"]["tie_word_embeddings"] = False
        config["text_config"].pop("scale_decoder_outputs", None)
        _write(out / "config.json", config)


def _write(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
