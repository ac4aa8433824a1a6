"""BLIP-2 models: load by hub id or local dir, the tiny built-ins, random-init real architectures, LoRA.

Model code never sees a rank: everything here works on a plain nn.Module in one process.

    model, processor = load_model("tiny-t5")                       # built locally, no download
    model, processor = load_model("Salesforce/blip2-flan-t5-xl")   # hub id or a local directory
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

TINY_MODELS = ("tiny-t5", "tiny-opt")
TINY_IMAGE_SIZE = 64
TINY_NUM_QUERY_TOKENS = 8

# Words the tiny tokenizer learns as whole tokens. Any other text still encodes (byte-level BPE),
# only in more pieces. Covers the synthetic set's captions and common caption words.
TINY_CORPUS_WORDS = """
a an the of in on at with and is are there this that one two three four five six some many
picture photo image drawing shows showing small large big tiny huge little
red green blue yellow purple orange white black gray grey pink brown cyan magenta
circle circles square squares triangle triangles star stars cross crosses shape shapes dot dots
ring rings bar bars line lines disk disks box boxes
left right top bottom center middle corner upper lower side near next to above below
background foreground dark light bright on of beside
dog dogs man woman men women boy girl child children people person playing running water
grass ball street sitting standing walking jumping riding bike beach snow field shirt
""".split()


def build_tiny_tokenizer(family: str, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here in milliseconds (no download).

    Special tokens follow the real family: OPT's tokenizer puts a BOS in front, T5's appends EOS.
    """
    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [" ".join(TINY_CORPUS_WORDS[i : i + 7]) for i in range(0, len(TINY_CORPUS_WORDS), 3)]
    tok.train_from_iterator(sentences * 20 + [" " + w for w in TINY_CORPUS_WORDS] * 20, trainer)
    template = "<s> $A" if family == "opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        padding_side="right",
    )


def _tiny_text_config(family: str, tokenizer: PreTrainedTokenizerFast):
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vocab = len(tokenizer)
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
            **ids,
        )
    return T5Config(
        vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=True,
        decoder_start_token_id=tokenizer.pad_token_id, **ids,
    )


def build_tiny(family: str, seed: int = 0) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A random BLIP-2 of the OPT or T5 family, small enough to train on CPU in minutes."""
    tokenizer = build_tiny_tokenizer(family)
    image_processor = BlipImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_convert_rgb=True,
    )
    # The processor adds the "<image>" token to the tokenizer; its id goes into the config.
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=TINY_NUM_QUERY_TOKENS)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE, patch_size=8, attention_dropout=0.0,
        ),
        qformer_config=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            encoder_hidden_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            cross_attention_frequency=1, vocab_size=128, max_position_embeddings=64,
        ),
        text_config=_tiny_text_config(family, tokenizer).to_dict(),
        num_query_tokens=TINY_NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    init_query_tokens(model)
    return model, processor


def init_query_tokens(model: Blip2ForConditionalGeneration) -> None:
    # Zero query tokens (the random-init default) make their gradient explode (~1e19), see PITFALLS.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)


def family_of(model_or_config) -> str:
    """'t5' for encoder-decoder language models, 'opt' for decoder-only ones."""
    config = getattr(model_or_config, "config", model_or_config)
    return "opt" if config.use_decoder_only_language_model else "t5"
