"""Per-batch image and text preparation for BLIP-2 captioning: `ImageTransform` and `CaptionFormat`.

Both are plain picklable dataclasses built from a `Blip2Processor` (and the model config), so a
DataLoader worker can hold them and everything is taken from the processor, never hard-coded.

Images (`ImageTransform`) match `BlipImageProcessor`: convert to RGB (grayscale, CMYK, palette...),
resize to a square (H, W) with the processor's resample (BICUBIC), no crop, rescale 1/255, normalise
with the processor's mean/std (CLIP's). The per-image part (decode, resize) returns uint8 arrays
(what DataLoader workers send); rescale+normalise run once per batch in torch, in the main process
or on the GPU (`normalize_device`). Two resize backends:
  * "torch" (default): torch's antialiased bicubic on uint8 channels-last tensors (vectorised; the
    kernel family transformers' torchvision-backed `BlipImageProcessor` uses). On photos it is within
    2 grey levels of PIL's (mean ~0.01 level; 2/255/std = 0.03 in normalised units) and ~3x faster
    than PIL's resize here (0.6 vs 1.8 ms for 500x375 -> 224x224; the JPEG decode is ~1.5 ms).
  * "pil": bit-for-bit `BlipImageProcessorPil` (float rounding only).
JPEG draft decoding (libjpeg decodes at 1/2, 1/4 or 1/8 scale when the JPEG is at least 2x the target
in both sides, then the resize follows) is OFF by default: measured on real photos (`benchmarks/bench.py
preprocess`, docs/models.md) it moves pixels by 0.5-3 grey levels on average and up to 55 at edges
against the hub's processor whenever it triggers, and it triggers for COCO's 640x480 images at 224
(decoded at 320x240), while the full decode matches the hub processor to 1 level (torch resize) or
exactly (PIL). It saves ~0.6 ms of ~2 ms per 640x480 image: `draft=True` for a CPU-bound loader.

Training-time augmentation (random resized crop, scale (0.5, 1), ratio (3/4, 4/3), then horizontal
flip with p=0.5) is OFF by default: a flip turns "a dog to the left of a man" into a false caption,
and BLIP-2's own caption fine-tuning recipe uses no flip. Its randomness is drawn from a generator
seeded by (seed, epoch, image key), so it is reproducible and unaffected by resume.

Text (`CaptionFormat`): the processor's image tokens go into `input_ids` (num_query_tokens x the
image token id first), as transformers 5 BLIP-2 requires: its forward puts the query outputs where
input_ids equal config.image_token_index, and without those tokens the image is silently ignored
(the loss still comes back). Prompt and captions are tokenised separately, without the tokenizer's
special tokens, and the ids concatenated, so the label mask is exact:

    OPT (decoder-only)  input_ids = [img]*Q + BOS + prompt + caption + END   (right-padded)
                        labels    = -100 ...  -100 -100     caption + END     (pad -> -100)
    T5 (enc-dec)        input_ids = [img]*Q + prompt + </s>                   (same for every row)
                        labels    = caption + END                             (pad -> -100)

END, the end of a caption, is the token generation stops on: the language model's configured
`eos_token_id` (`end_of_caption_id`). Labels and generation read it from that one function, so a
model ends its captions where it was taught to. Salesforce/blip2-opt-2.7b ends on "\n" (its
text_config.eos_token_id is 50118, GPT-2's "\n" token; LAVIS trains OPT on `caption + "\n"`), not
on the tokenizer's `</s>`: a model taught to end on `</s>` never stops, and decoding hides the `</s>`
and keeps what follows. FLAN-T5 and the tiny built-ins end on `</s>`. Whitespace inside a caption is
collapsed to single spaces and END (or an image token) inside its ids is dropped, so a caption never
ends early or shifts the image slots.

BOS is what the tokenizer itself puts in front (probed once: OPT's, none for T5); the T5 encoder
input ends with what the tokenizer appends (`</s>`). For OPT with a prompt, the caption is tokenised
with a leading space and the prompt with its trailing space removed: "a photo of" + " a dog" gives the
same ids as the joint text "a photo of a dog" (GPT-2 BPE), which is what generation with that prompt
continues. Captions longer than `max_caption_tokens` (END included) are truncated, keeping the END;
the number truncated is counted. One tokenizer call per batch of captions.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IGNORE_INDEX = -100
# PIL resample -> torch mode; other filters (LANCZOS, BOX, HAMMING) use the PIL backend.
_TORCH_MODES = {
    int(Image.Resampling.BICUBIC): "bicubic",
    int(Image.Resampling.BILINEAR): "bilinear",
    int(Image.Resampling.NEAREST): "nearest",
}


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@dataclass
class ImageTransform:
    """JPEG bytes or PIL image -> uint8 HWC array (per image) -> normalised float32 NCHW (per batch)."""

    size: tuple[int, int]  # (height, width), from the processor (the model's vision image_size)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = int(Image.Resampling.BICUBIC)
    rescale: float = 1.0 / 255.0
    augment: bool = False  # random resized crop + horizontal flip; off by default (see module doc)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    draft: bool = False  # PIL JPEG draft mode (DCT-domain downscale) when the JPEG is >= 2x the target
    backend: str = "torch"  # resize with "torch" (uint8 antialiased, ~3x faster) or "pil" (bit-exact)

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "pil"):
            raise ValueError(f"backend must be 'torch' or 'pil', got {self.backend!r}")

    @classmethod
    def from_processor(cls, processor: Any, augment: bool = False, **overrides: Any) -> ImageTransform:
        ip = getattr(processor, "image_processor", processor)
        size = ip.size
        height = size["height"] if isinstance(size, dict) else size.height
        width = size["width"] if isinstance(size, dict) else size.width
        if not (height and width):
            raise ValueError(f"image processor size {size!r}: expected a square (height, width) resize like BLIP's")
        resample = ip.resample
        try:
            resample = int(resample)
        except (TypeError, ValueError):  # a torchvision InterpolationMode: BLIP uses bicubic
            resample = int(Image.Resampling.BICUBIC)
        kwargs = dict(
            size=(int(height), int(width)),
            mean=tuple(float(m) for m in ip.image_mean),
            std=tuple(float(s) for s in ip.image_std),
            resample=resample,
            rescale=float(ip.rescale_factor) if ip.do_rescale else 1.0,
            augment=augment,
        )
        if not ip.do_normalize:
            kwargs.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- per image ---------------------------------------------------------------------------
    def open(self, data: bytes | Image.Image) -> Image.Image:
        """Decode image bytes (or a PIL image opened but not loaded yet) into an RGB PIL image
        (draft-mode decode for large JPEGs)."""
        img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        if self.draft and img.format == "JPEG":
            h, w = self.size
            grow = 2 if self.augment else 1  # a crop of >= half the area still gets full resolution
            img.draft("RGB", (w * grow, h * grow))
        return img.convert("RGB") if img.mode != "RGB" else img

    def prepare(self, img: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        """RGB PIL image -> (H, W, 3) uint8 array at the target size (augmented if enabled and rng given)."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        h, w = self.size
        box, flip = None, False
        if self.augment and rng is not None:
            box = self._crop_box(img.width, img.height, rng)
            flip = rng.random() < self.flip_p
        mode = _TORCH_MODES.get(self.resample) if self.backend == "torch" else None
        if mode is None:  # PIL: exactly BlipImageProcessorPil's resize
            if box is not None:
                img = img.resize((w, h), self.resample, box=box)
            elif img.size != (w, h):
                img = img.resize((w, h), self.resample)
            arr = np.asarray(img)
            return arr[:, ::-1] if flip else arr
        with warnings.catch_warnings():  # PIL's array is read-only; it is only read here
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.asarray(img)).view(1, img.height, img.width, 3)
        if box is not None:
            t = t[:, box[1] : box[3], box[0] : box[2]]
        if tuple(t.shape[1:3]) != (h, w):
            # (1, 3, H, W) with channels-last strides (a view, no copy): torch's vectorised uint8
            # antialiased resize.
            chw = t.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            t = F.interpolate(chw, size=(h, w), mode=mode, antialias=mode != "nearest").permute(0, 2, 3, 1)
        if flip:
            t = t.flip(2)
        return t[0].contiguous().numpy()

    def load(self, data: bytes | Image.Image, rng: random.Random | None = None) -> np.ndarray:
        """Image bytes (or an opened, not yet loaded PIL image) -> (H, W, 3) uint8. Raises on bad data."""
        return self.prepare(self.open(data), rng)

    def _crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        # torchvision RandomResizedCrop's sampling, in PIL box coordinates.
        area = width * height
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            cw = int(round(math.sqrt(target * ratio)))
            ch = int(round(math.sqrt(target / ratio)))
            if 0 < cw <= width and 0 < ch <= height:
                x = rng.randint(0, width - cw)
                y = rng.randint(0, height - ch)
                return (x, y, x + cw, y + ch)
        return (0, 0, width, height)

    # -- per batch ---------------------------------------------------------------------------
    def stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Per-image (H, W, 3) uint8 arrays -> one (N, H, W, 3) uint8 array (what workers send)."""
        return np.stack(arrays)

    def normalize(self, images: list[np.ndarray] | np.ndarray | torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
        """uint8 images, (N, H, W, 3) or a list of (H, W, 3) -> float32 (N, 3, H, W): x * rescale, then
        (x - mean) / std. One conversion pass per image into a preallocated (optionally pinned) output."""
        n = len(images)
        h, w = images[0].shape[:2]
        out = torch.empty((n, 3, h, w), dtype=torch.float32, pin_memory=pin_memory)
        for i, a in enumerate(images):
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            out[i].copy_(t.permute(2, 0, 1))
        scale, shift = self._affine(out.device)
        return out.mul_(scale).sub_(shift)

    def normalize_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) on any device (a stream built with normalize=False) -> float32 normalised."""
        scale, shift = self._affine(pixels.device)
        return pixels.to(torch.float32).mul_(scale).sub_(shift)

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return self.rescale / std, mean / std

    def batch_from_pil(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel_values (no augmentation): for captioning single images."""
        return self.normalize([self.prepare(im) for im in images])

    __call__ = batch_from_pil


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def end_of_caption_id(model_config: Any, tokenizer: Any) -> int:
    """The token a caption ends with, in the labels and in generation: the language model's configured
    `eos_token_id` (Salesforce/blip2-opt-2.7b: "\\n"; FLAN-T5 and the tiny built-ins: `</s>`), else the
    tokenizer's eos. A list of ids (some configs) gives its first: the one captions are taught to end on.
    model_config: a Blip2Config (its text_config is read) or a language-model config."""
    text = getattr(model_config, "text_config", None) or model_config
    eos = getattr(text, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("neither the language model's config nor the tokenizer names an end-of-sequence token")
    return int(eos)


def _special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a text by itself: ([BOS] for OPT, [] for T5), ([] , [</s>])."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []


@dataclass
class CaptionFormat:
    """Everything needed to turn captions into BLIP-2 inputs and labels. Picklable."""

    tokenizer: Any = field(repr=False)
    decoder_only: bool  # OPT family True, T5 family False
    image_token_id: int
    num_query_tokens: int
    prompt: str = ""
    max_caption_tokens: int = 64  # caption + END; longer captions are truncated (counted)
    end_id: int | None = None  # the token captions end with (end_of_caption_id); None: the tokenizer's eos

    def __post_init__(self) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is None or tok.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad and an eos token")
        if self.max_caption_tokens < 2:
            raise ValueError(f"max_caption_tokens must be >= 2 (one token + EOS), got {self.max_caption_tokens}")
        self.pad_id = int(tok.pad_token_id)
        self.eos_id = int(tok.eos_token_id)
        self.end_id = int(self.eos_id if self.end_id is None else self.end_id)
        prefix, suffix = _special_ids(tok)
        self.prefix_ids = prefix  # e.g. OPT's BOS
        self.suffix_ids = suffix or [self.eos_id]  # what the tokenizer appends (T5's </s>): encoder input
        prompt = self.prompt.rstrip()
        self.prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        # OPT: "a photo of" + " a dog" tokenises like the joint text (see module doc).
        self._caption_space = self.decoder_only and bool(prompt)
        image = [self.image_token_id] * self.num_query_tokens
        if self.decoder_only:
            self.head_ids = image + self.prefix_ids + self.prompt_ids  # masked in the labels
        else:
            self.head_ids = image + self.prefix_ids + self.prompt_ids + self.suffix_ids

    @classmethod
    def from_processor(
        cls, processor: Any, model_config: Any, prompt: str = "", max_caption_tokens: int = 64
    ) -> CaptionFormat:
        image_token_id = model_config.image_token_index
        if image_token_id is None:
            raise ValueError(
                "model config has no image_token_index: transformers 5 BLIP-2 places the image where input_ids "
                "hold that token, so without it every image would be ignored"
            )
        tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", None)
        if image_token is not None:
            tok_id = tokenizer.convert_tokens_to_ids(getattr(image_token, "content", image_token))
            if tok_id != image_token_id:
                raise ValueError(
                    f"processor image token {image_token!r} has id {tok_id}, model config says {image_token_id}"
                )
        num_query = getattr(processor, "num_query_tokens", None) or model_config.num_query_tokens
        if num_query != model_config.num_query_tokens:
            raise ValueError(f"processor num_query_tokens {num_query} != model's {model_config.num_query_tokens}")
        return cls(
            tokenizer=tokenizer,
            decoder_only=bool(model_config.use_decoder_only_language_model),
            image_token_id=int(image_token_id),
            num_query_tokens=int(num_query),
            prompt=prompt,
            max_caption_tokens=max_caption_tokens,
            end_id=end_of_caption_id(model_config, tokenizer),
        )

    def caption_ids(self, captions: list[str]) -> tuple[list[list[int]], int]:
        """Caption ids (no specials, END appended, capped at max_caption_tokens) and how many were cut."""
        texts = [" ".join(c.split()) for c in captions]  # a "\n" inside would be OPT's END
        texts = [" " + t if self._caption_space else t for t in texts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # one call per batch
        limit = self.max_caption_tokens - 1
        # A literal "<image>" would shift the image slots; END (e.g. a literal "</s>") would end it early.
        drop = (self.image_token_id, self.end_id)
        out, truncated = [], 0
        for row in ids:
            if any(t in drop for t in row):
                row = [t for t in row if t not in drop]
            if len(row) > limit:
                row = row[:limit]
                truncated += 1
            out.append(row + [self.end_id])
        return out, truncated

    def encode_train(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels for one example per caption (right padding)."""
        return self.encode_train_counted(captions)[0]

    def encode_train_counted(self, captions: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        caps, truncated = self.caption_ids(captions)
        head, pad, ign = self.head_ids, self.pad_id, IGNORE_INDEX
        width = max(len(c) for c in caps)
        lengths = torch.tensor([len(c) for c in caps])
        if self.decoder_only:  # one tensor build per field from plain lists: no per-row tensor ops
            input_ids = torch.tensor([head + c + [pad] * (width - len(c)) for c in caps])
            labels = torch.tensor([[ign] * len(head) + c + [ign] * (width - len(c)) for c in caps])
            attention = (torch.arange(len(head) + width) < (lengths + len(head))[:, None]).long()
        else:
            input_ids = torch.tensor(head).expand(len(caps), -1).contiguous()
            attention = torch.ones_like(input_ids)
            labels = torch.tensor([c + [ign] * (width - len(c)) for c in caps])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}, truncated

    def encode_prompts(self, n: int) -> dict[str, torch.Tensor]:
        """Generation inputs for n images: image tokens (+ BOS) + prompt (T5: + </s>), no padding needed."""
        ids = torch.tensor(self.head_ids, dtype=torch.long).expand(n, -1).contiguous()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
