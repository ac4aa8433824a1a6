"""The options of every command as typed sections, and which sections each command takes (COMMANDS).

Training's sections (model, data, optim, eval, train) are in config.py; the other commands reuse the
fields they share with training (`--model`, `--data`, `--num-workers`, `--prompt`, the generation
settings: one place and one default each) and add their own sections below. Every command parses
through config.parse_sections and saves what it resolved beside its outputs (config.save_config).

The configuration reference docs/configuration.md is generated from COMMANDS:

    python -m blip2_dist.commands --markdown > docs/configuration.md      # or: make docs
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, dataclass

from blip2_dist.config import (
    GENERATION_FIELDS,
    SECTIONS,
    DataArgs,
    EvalArgs,
    ModelArgs,
    Parsed,
    markdown_reference,
    option,
)
from blip2_dist.data.flickr8k import LAYOUTS
from blip2_dist.data.hf_datasets import CAPTION_COLUMNS
from blip2_dist.data.pack import DEFAULT_QUALITY
from blip2_dist.data.shards import SPLITS

DTYPE_NAMES = ("bfloat16", "float16", "float32")


# ---- evaluate and caption -------------------------------------------------------------------------


@dataclass
class InferenceArgs:
    adapter: str | None = option(
        None, "adapter directory saved by training (omit for zero-shot); without --model its base model is loaded"
    )
    dtype: str = option(
        "bfloat16",
        "inference dtype (bfloat16: the precision training runs and evaluates in, on "
        "GPUs and DeepSpeed's CPU accelerator alike)",
        choices=list(DTYPE_NAMES),
    )


def base_model(parsed: Parsed) -> str | None:
    """evaluate, caption: --model as given; not given, the adapter's base (None here), else the default base."""
    if "model" in parsed.given or not parsed.sections["inference"].adapter:
        return parsed.sections["model"].model
    return None


@dataclass
class EvaluateArgs:
    split: str = option("val", "split to evaluate")
    output_dir: str = option("", "where results go (empty: ADAPTER/eval-SPLIT, or runs/eval-SPLIT without --adapter)")
    tensorboard_dir: str = option(
        "",
        "TensorBoard run folder (empty: OUTPUT_DIR/tensorboard); its name is the run's "
        "name in TensorBoard, e.g. RUN/tensorboard/before-training beside the trainer's "
        "RUN/tensorboard/training",
    )


@dataclass
class CaptionArgs:
    images: list[str] = option(MISSING, "image files, folders or glob patterns", positional=True, nargs="+")
    batch_size: int = option(8, "images per generation batch", min=1)
    json: bool = option(False, "print JSON lines instead of path<TAB>caption")


@dataclass
class SamplingArgs:
    do_sample: bool = option(False, "sample instead of searching (with --top-p: nucleus)")
    top_p: float | None = option(
        None,
        "nucleus sampling: keep the smallest token set of this total probability (needs --do-sample)",
        gt=0.0,
        max=1.0,
    )
    num_return_sequences: int = option(1, "captions per image (at most --num-beams unless sampling)", min=1)
    seed: int = option(0, "random seed for --do-sample")


@dataclass
class PlacementArgs:
    device_map: str | None = option(
        None,
        "spread the layers over the GPUs, then CPU memory, then disk (--offload-folder)",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
    )
    max_memory: str | None = option(
        None,
        "memory per device for --device-map, e.g. 0=20GiB,cpu=60GiB (sizes in bytes or with a unit)",
        metavar="DEVICE=SIZE,...",
    )
    offload_folder: str | None = option(None, "where --device-map puts the layers that fit nowhere else")


# ---- export ---------------------------------------------------------------------------------------


@dataclass
class ExportArgs:
    adapter: str = option(MISSING, "adapter folder saved by training (RUN/best, RUN/checkpoints/step_N/adapter)")
    out: str = option(MISSING, "folder to write; must not exist unless --overwrite")
    dtype: str = option(
        "bfloat16", "dtype of the saved weights (not of a computation: no auto)", choices=sorted(DTYPE_NAMES)
    )
    overwrite: bool = option(False, "replace --out if it is an earlier export")


# ---- pack -----------------------------------------------------------------------------------------


@dataclass
class PackOutputArgs:
    out: str = option(
        MISSING,
        "output folder for the shards and manifest.json: missing, empty, or holding a pack "
        "written here before (replaced when the new one is complete)",
        metavar="DIR",
    )
    overwrite: bool = option(
        False, "write into a --out that holds other files: files named like the pack's are replaced, the rest kept"
    )


@dataclass
class PackArgs:
    samples_per_shard: int = option(1000, "images per shard", metavar="N", aliases=["--images-per-shard"])
    max_side: int | None = option(
        None, "re-encode images whose long side exceeds N to N (none: keep the original bytes)", metavar="N"
    )
    quality: int = option(DEFAULT_QUALITY, "JPEG quality when re-encoding", metavar="Q")
    workers: int | None = option(
        None, "image reading/decoding/re-encoding threads (none: CPU count, at most 8; 1 = no pool)", metavar="N"
    )
    skip_bad: bool = option(False, "pack the rest when input is bad; list what was left out in the manifest")
    progress: bool = option(True, "progress bar (off anyway when stderr is not a terminal)")


@dataclass
class Flickr8kSource:
    source: str = option(MISSING, "the folder where Flickr8k was unzipped", positional=True)
    format: str | None = option(None, "force the layout (none: detected)", choices=list(LAYOUTS))
    images: str | None = option(None, "the image folder, if it can't be found beside the text files", metavar="DIR")
    splits: str | None = option(
        None,
        "kaggle layout: folder with Flickr_8k.{train,dev,test}Images.txt (none: sha1 hash split 6:1:1)",
        metavar="DIR",
    )


@dataclass
class HfSource:
    path: str = option(MISSING, "an imagefolder (images + metadata.jsonl) or a save_to_disk folder", positional=True)
    image_column: str = option("image", "image column")
    caption_column: list[str] | None = option(
        None,
        f"caption column(s), each a string or a list of strings (none: first of {', '.join(CAPTION_COLUMNS)})",
        nargs="+",
    )
    split_column: str | None = option(None, "column naming each row's split (train/validation|val|dev/test)")
    split_ratio: str | None = option(
        None, "re-split by a hash of the image id, e.g. 0.8,0.1,0.1 (none: the dataset's own splits)", metavar="A,B,C"
    )
    cache_dir: str | None = option(
        None, "datasets cache for the imagefolder loader (none: HF_DATASETS_CACHE)", metavar="DIR"
    )


@dataclass
class KarpathySource:
    source: str = option(MISSING, "the json, or the folder holding it and the images", positional=True)
    images: str | None = option(
        None, "the image folder (COCO: the folder holding train2014/ and val2014/)", metavar="DIR"
    )


@dataclass
class CocoSource:
    source: str = option(
        MISSING, "the folder holding annotations/ and train2014/ val2014/ (or train2017/ val2017/)", positional=True
    )
    year: int | None = option(None, "which release (none: the one present)", choices=[2014, 2017])
    images: str | None = option(None, "the folder holding train{YEAR}/ and val{YEAR}/", metavar="DIR")


SHARD_URLS_HELP = "shard URLs with {a..b} patterns (paths, http(s)://, pipe:CMD), several joined by '::'"


@dataclass
class Img2datasetSource:
    shards: str = option(MISSING, SHARD_URLS_HELP, positional=True)
    group_by: str | None = option(
        None, "json field naming the image (none: image_id if present, else url)", metavar="FIELD"
    )
    split: str = option("train", "the split of every image", choices=list(SPLITS))
    split_ratio: str | None = option(None, "or split by a hash of the image id, e.g. 0.98,0.01,0.01", metavar="A,B,C")
    retries: int = option(5, "failed remote reads in a row retried with backoff")


@dataclass
class IndexArgs:
    shards: str = option(MISSING, SHARD_URLS_HELP, positional=True)
    out: str = option(
        MISSING, "the manifest to write (a .json path, or a folder for DIR/manifest.json); other splits in it are kept"
    )
    split: str = option("train", "the split these shards are", choices=list(SPLITS))
    workers: int | None = option(None, "shards read at once (none: CPU count, at most 4)")
    retries: int = option(5, "failed remote reads in a row retried with backoff")


@dataclass
class SyntheticArgs:
    n_train: int = option(2000, "train images")
    n_val: int = option(100, "val images")
    n_test: int = option(100, "test images")
    image_size: int = option(64, "square image side in pixels")
    seed: int = option(0, "seed (same seed, same shards)")
    samples_per_shard: int = option(50, "images per shard (small: the demo's 2 ranks x 2 workers each get shards)")


PACK_SOURCES: dict[str, tuple[type, str]] = {
    "flickr8k": (Flickr8kSource, "pack a Flickr8k folder (original, karpathy or kaggle layout)"),
    "hf": (HfSource, "pack a Hugging Face datasets image-caption set on disk (imagefolder or save_to_disk)"),
    "karpathy": (KarpathySource, "pack Karpathy's dataset_coco.json / dataset_flickr30k.json / dataset_flickr8k.json"),
    "coco": (CocoSource, "pack the official COCO captions (annotations/captions_{train,val}YEAR.json)"),
    "img2dataset": (Img2datasetSource, "convert img2dataset-style shards (jpg/txt/json), captions grouped per image"),
}


# ---- which command takes what ---------------------------------------------------------------------

GENERATION = tuple(GENERATION_FIELDS)

# command -> {section title: (dataclass, the fields the command takes or None for all)}
COMMANDS: dict[str, dict[str, tuple[type, tuple[str, ...] | None]]] = {
    "train (launch/train.py)": {name: (cls, None) for name, cls in SECTIONS.items()},
    "evaluate (launch/evaluate.py)": {
        "model": (ModelArgs, ("model",)),
        "inference": (InferenceArgs, None),
        "data": (DataArgs, ("data", "data_retries", "num_workers", "prompt")),
        "evaluate": (EvaluateArgs, None),
        "eval": (EvalArgs, None),
    },
    "caption (launch/caption.py)": {
        "caption": (CaptionArgs, None),
        "model": (ModelArgs, ("model",)),
        "inference": (InferenceArgs, None),
        "data": (DataArgs, ("prompt",)),
        "eval": (EvalArgs, GENERATION),
        "sampling": (SamplingArgs, None),
        "placement": (PlacementArgs, None),
    },
    "export (launch/export.py)": {"export": (ExportArgs, None)},
    **{
        f"pack {name} (blip2-pack {name})": {
            "source": (cls, None),
            "output": (PackOutputArgs, None),
            "pack": (PackArgs, None),
        }
        for name, (cls, _) in PACK_SOURCES.items()
    },
    "pack index (blip2-pack index)": {"index": (IndexArgs, None)},
    "pack synthetic (blip2-pack synthetic)": {"output": (PackOutputArgs, None), "synthetic": (SyntheticArgs, None)},
}


def sections_of(command: str) -> tuple[dict[str, type], dict[str, tuple[str, ...]]]:
    """(sections, only) for config.parse_sections / build_parser: the command named by its first word(s)."""
    (key,) = [k for k in COMMANDS if k.split(" (")[0] == command]
    table = COMMANDS[key]
    return {t: cls for t, (cls, _) in table.items()}, {t: only for t, (_, only) in table.items() if only}


INTRO = """# Configuration reference

Generated from the dataclasses in `blip2_dist/config.py` and `blip2_dist/commands.py` by
`python -m blip2_dist.commands --markdown > docs/configuration.md` (or `make docs`);
`tests/test_configuration_doc.py` fails when this file is stale. Do not edit it by hand.

Every option is a field of a typed section; its flag is the field name with dashes. Options are
resolved as defaults <- `--config FILE` (JSON or YAML, nested by section, e.g.
`{"optim": {"lr": 0.0001}}`; unknown keys are errors) <- flags. A boolean `--flag` has a `--no-flag`.
Every command also takes `--debug` (tracebacks of errors; also: BLIP2_DEBUG=1); all but the packer take
`--config FILE`.
Each command writes what it resolved beside its outputs: training `OUTPUT_DIR/config.json`,
evaluation `OUTPUT_DIR/eval_config.json`, export `OUT/export_config.json`, the packer
`OUT/pack_config.json` (but `index`, which writes only a manifest).
Where a command takes only some fields of a section, only those are listed under it. Evaluate and
caption: `--prompt` and the generation settings (`--num-beams` ...) default to what the adapter (or
merged export) recorded at training; the defaults listed apply when nothing was recorded."""


def reference() -> str:
    """docs/configuration.md's text."""
    tables = {}
    for command, table in COMMANDS.items():
        tables[command] = {title: (cls, only) for title, (cls, only) in table.items()}
    return markdown_reference(tables, INTRO)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m blip2_dist.commands --markdown > docs/configuration.md")
    sys.stdout.write(reference())
