"""BLIP-2 models: load by hub id or local dir, the tiny built-ins, random-init real architectures.

Model code never sees a rank: everything here works on a plain nn.Module in one process.

    model, processor = load_model("tiny-t5", dtype=torch.float32)  # built locally, no download (CPU tests)
    model, processor = load_model("Salesforce/blip2-flan-t5-xl")   # hub id or a local directory, bf16
    model, processor = load_model("Salesforce/blip2-opt-2.7b", random_init=True)  # benchmarks only
    family_of(model)                                                # "t5" or "opt"
    count_parameters("Salesforce/blip2-opt-2.7b")                   # on the meta device, instant

LoRA lives in `blip2_dist.lora`, the captioning loss and generation in `blip2_dist.captioning`,
exporting and reloading adapters in `blip2_dist.adapters`.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AddedToken,
    AutoConfig,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from blip2_dist.errors import UserError

logger = logging.getLogger(__name__)

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
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
            **ids,
        )
    return T5Config(
        vocab_size=vocab,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=True,
        decoder_start_token_id=tokenizer.pad_token_id,
        **ids,
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
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            attention_dropout=0.0,
            # Blip2VisionConfig's default initializer_range is 1e-10: a frozen random ViT would then give
            # every image the same features (~5e-9 apart) and nothing image-specific could be learnt.
            initializer_range=0.02,
        ),
        qformer_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            encoder_hidden_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            cross_attention_frequency=1,
            vocab_size=128,
            max_position_embeddings=64,
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
    # Zero query tokens (the random-init default) make their gradient explode (~1e19 on the tiny
    # models; DeepSpeed then skips every step as an overflow, even in fp32): start them small and random.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)


def family_of(model_or_config) -> str:
    """'t5' for encoder-decoder language models, 'opt' for decoder-only ones."""
    config = getattr(model_or_config, "config", model_or_config)
    return "opt" if config.use_decoder_only_language_model else "t5"


def family_from_name(name: str) -> str | None:
    """The family of a `--model` value without loading weights or downloading: tiny names, known hub ids
    and local directories with a config.json; None when it cannot be told that way."""
    if name in TINY_MODELS:
        return name.split("-")[1]
    if name in REAL_TEXT:
        return "t5" if REAL_TEXT[name]["model_type"] == "t5" else "opt"
    path = os.path.join(os.path.expanduser(name), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if "use_decoder_only_language_model" in config:
        return "opt" if config["use_decoder_only_language_model"] else "t5"
    return "t5" if "t5" in str(config.get("text_config", {}).get("model_type", "")) else "opt"


# ---------------------------------------------------------------------------------------------------
# Real architectures with random weights (benchmarks: memory, throughput, MFU; no download)
# ---------------------------------------------------------------------------------------------------

# Written out from the hub repos' config.json (ViT-g/14 at 224, BERT-base-sized Q-Former with
# cross-attention every 2nd layer, 32 queries). Parameter counts, checked in the tests:
# blip2-opt-2.7b 3,744,679,936 (hub: 3.74B), blip2-flan-t5-xl 3,942,446,592 (3.94B),
# blip2-opt-6.7b 7,752,738,304 (7.75B), blip2-flan-t5-xxl 12,229,596,672 (12.2B).
# The hub's text vocab may be padded after `<image>` was added (OPT 50272 -> 50304 in newer
# revisions): a 0.1M-parameter difference that no benchmark sees.
REAL_VISION = dict(
    hidden_size=1408,
    intermediate_size=6144,
    num_hidden_layers=39,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    layer_norm_eps=1e-6,
    qkv_bias=True,
    hidden_act="gelu",
    initializer_range=0.02,  # random weights of a realistic scale (the hub config says 1e-10)
)
REAL_QFORMER = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    cross_attention_frequency=2,
    encoder_hidden_size=1408,
    vocab_size=30522,
    max_position_embeddings=512,
)
_OPT = dict(
    model_type="opt",
    vocab_size=50272,
    max_position_embeddings=2048,
    activation_function="relu",
    do_layer_norm_before=True,
    enable_bias=True,
    dropout=0.1,
    attention_dropout=0.0,
)
# tie_word_embeddings=False: FLAN-T5 has its own lm_head and no output scaling (see untie_t5_head).
_FLAN_T5 = dict(
    model_type="t5",
    vocab_size=32128,
    d_kv=64,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.1,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    is_encoder_decoder=True,
    tie_word_embeddings=False,
)
REAL_TEXT = {
    "Salesforce/blip2-opt-2.7b": dict(
        _OPT, hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32
    ),
    "Salesforce/blip2-opt-6.7b": dict(
        _OPT, hidden_size=4096, word_embed_proj_dim=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32
    ),
    "Salesforce/blip2-flan-t5-xl": dict(
        _FLAN_T5, d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32
    ),
    "Salesforce/blip2-flan-t5-xxl": dict(
        _FLAN_T5, d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64
    ),
}
REAL_NUM_QUERY_TOKENS = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def random_init_config(name: str) -> Blip2Config:
    """The real architecture of `name` (a known hub id, or a local dir with a config.json).

    Special token ids (and `<image>`) are those of the tiny tokenizer that random-init models use,
    while the vocabulary keeps its real size, so the embedding tables have their real shapes.
    """
    if name in REAL_TEXT:
        text, family = dict(REAL_TEXT[name]), REAL_TEXT[name]["model_type"]
        config = None
    elif os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
        config = Blip2Config.from_pretrained(os.path.expanduser(name))
        family = family_of(config)
    else:
        raise UserError(
            f"random_init: no built-in architecture for {name!r}; known: {sorted(REAL_TEXT)}"
            " (or pass a local directory holding a BLIP-2 config.json)"
        )
    tokenizer = build_tiny_tokenizer(family)
    image_token_id = len(tokenizer)  # Blip2Processor appends "<image>" to the tokenizer: next id
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    if config is not None:
        config.text_config.update(ids)
        config.vision_config.initializer_range = REAL_VISION["initializer_range"]
        config.image_token_index = image_token_id
        return config
    if family == "t5":
        ids["decoder_start_token_id"] = tokenizer.pad_token_id
    return Blip2Config(
        vision_config=dict(REAL_VISION),
        qformer_config=dict(REAL_QFORMER),
        text_config={**text, **ids},
        num_query_tokens=REAL_NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )


def random_init_processor(config: Blip2Config) -> Blip2Processor:
    """CLIP-normalised bicubic resize as in the hub processors, and the TINY tokenizer.

    The real tokenizers can't be downloaded here: random-init models are for benchmarks only.
    """
    size = config.vision_config.image_size
    image_processor = BlipImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
        do_convert_rgb=True,
    )
    processor = Blip2Processor(
        image_processor, build_tiny_tokenizer(family_of(config)), num_query_tokens=config.num_query_tokens
    )
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    return processor


def build_random_init(
    name: str, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str | torch.device | None = None
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """The real architecture with random weights, built directly in `dtype` on `device`.

    device="meta" allocates nothing (counting, planning). torch.device("meta") is used rather than
    accelerate's init_empty_weights, which leaves the tied embeddings untied (wrong counts).
    """
    config = random_init_config(name)
    processor = random_init_processor(config)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Blip2ForConditionalGeneration._from_config(config, dtype=dtype)
    if family_of(config) == "t5" and not getattr(config.text_config, "scale_decoder_outputs", True):
        untie_t5_head(model)
    init_query_tokens(model)
    return model, processor


def untie_t5_head(model: Blip2ForConditionalGeneration) -> None:
    """Give a random T5 text model its own lm_head, as FLAN-T5 checkpoints have.

    transformers 5 always ties T5's lm_head to `shared`; FLAN-T5 checkpoints carry their own lm_head
    and from_pretrained keeps it untied (both present, different values). Do the same here."""
    # Scaled by d_model**-0.5 (what the tied head does to its input): random logits of unit scale and a
    # starting loss near ln(vocab) instead of ~260 (bf16 runs without a loss scale).
    lm = model.language_model
    lm.lm_head.weight = nn.Parameter(lm.shared.weight.detach() * lm.config.d_model**-0.5)
    for owner, key in ((lm, "lm_head.weight"), (model, "language_model.lm_head.weight")):
        getattr(owner, "all_tied_weights_keys", {}).pop(key, None)


def count_parameters(name: str) -> int:
    """Total parameters of a model, built on the meta device (instant, no memory, no download).

    Tiny names, known hub ids and local dirs with a config.json work.
    """
    if name in TINY_MODELS:
        model, _ = build_tiny(name.split("-")[1])
    else:
        model, _ = build_random_init(name, device="meta")
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


class ModelNotAvailableError(OSError):
    """A model that is neither a local directory nor reachable on the Hugging Face hub."""


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    random_init: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    dispatch: dict | None = None,
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """Load BLIP-2 and its processor.

    name: "tiny-t5" / "tiny-opt" (random, built here, deterministic given `seed`), a local
    `save_pretrained` directory, or a hub id ("Salesforce/blip2-flan-t5-xl", ...).
    random_init: the real architecture of a known hub id with random weights and the tiny
    tokenizer, no download (benchmarks only). device: where weights are built or loaded
    (default CPU; "meta" for random_init only).
    dispatch: from_pretrained's big-model options, e.g. {"device_map": "auto", "max_memory":
    {0: "20GiB", "cpu": "60GiB"}, "offload_folder": "offload"}: accelerate spreads the layers over
    the GPUs, then CPU memory, then disk (a model larger than one GPU). Saved models only.
    """
    if dispatch:
        if name in TINY_MODELS or random_init:
            raise UserError(
                f"a device map needs a saved model directory or hub id, not {name!r}"
                f"{' with random_init' if random_init else ''}"
            )
        if device is not None:
            raise UserError("pass either device or a device map (dispatch), not both")
    if name in TINY_MODELS:
        model, processor = build_tiny(name.split("-")[1], seed=seed)
        model.to(dtype=dtype, device=device)
    elif random_init:
        model, processor = build_random_init(name, dtype=dtype, seed=seed, device=device)
    else:
        model, processor = _from_pretrained(name, dtype, device, dispatch)
    # Where the base came from: save_adapter records it (tiny bases are rebuilt from it).
    model.blip2_dist_source = {"name": name, "seed": seed, "random_init": random_init and name not in TINY_MODELS}
    return model, processor


def _from_pretrained(
    name: str, dtype: torch.dtype, device, dispatch: dict | None = None
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{name!r} is a directory without config.json: not a saved BLIP-2 model")
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ModelNotAvailableError(_unavailable_message(name, err)) from err
    if config.model_type != "blip-2":
        raise UserError(f"{name!r} is a {config.model_type!r} model, not BLIP-2 (model_type 'blip-2')")
    try:
        placement = dispatch or ({"device_map": {"": device}} if device is not None else {})
        model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype, **placement)
        if model.query_tokens.device.type == "meta":
            raise UserError(
                f"the device map offloaded {name}'s query_tokens; BLIP-2's generate() reads them outside any "
                "layer, so they must stay in memory: give the first device more room (max_memory)"
            )
        processor = Blip2Processor.from_pretrained(path)
    except OSError as err:
        raise ModelNotAvailableError(_unavailable_message(name, err)) from err
    reconcile_processor(model, processor)
    return model, processor


def _unavailable_message(name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = (
        "the Hugging Face hub is offline (HF_HUB_OFFLINE is set) and it is not in the local cache"
        if offline
        else "it could not be fetched from the Hugging Face hub (no network, no such repository, "
        "or gated and not logged in)"
    )
    return (
        f"cannot load BLIP-2 model {name!r}: it is not a local directory and {why}. Download it where "
        f"the hub is reachable (`hf download {name}`) and pass the local directory, or use a tiny "
        f"built-in {TINY_MODELS} or random_init=True for benchmarks. Cause: {err}"
    )


def reconcile_processor(model: Blip2ForConditionalGeneration, processor: Blip2Processor) -> None:
    """Make processor and config agree on the query tokens, or fail loudly.

    Older hub processors lack num_query_tokens (then no `<image>` tokens are inserted) and older
    configs lack image_token_index; either way the image would be silently ignored (transformers 5
    puts the query outputs where input_ids hold the image token, and a text without it gets none).
    """
    config = model.config
    if processor.num_query_tokens is None:
        processor.num_query_tokens = config.num_query_tokens
    elif processor.num_query_tokens != config.num_query_tokens:
        raise UserError(
            f"processor num_query_tokens={processor.num_query_tokens} but the model has {config.num_query_tokens}"
        )
    tokenizer = processor.tokenizer
    image_token = str(getattr(processor.image_token, "content", processor.image_token))
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        tokenizer.add_tokens([AddedToken(image_token, normalized=False, special=True)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(image_token)
    if config.image_token_index is None:
        # What transformers' own deprecation notice does for pre-`<image>` checkpoints.
        if token_id >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        config.image_token_index = token_id
        logger.warning("checkpoint has no image_token_index: using %s = %d", image_token, token_id)
    elif token_id != config.image_token_index:
        raise UserError(
            f"tokenizer maps {image_token} to {token_id} but config.image_token_index is "
            f"{config.image_token_index}: images would be ignored"
        )
