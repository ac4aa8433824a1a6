"""Merged exports (launch/export.py) that plain transformers loads, on both hub-shaped families.

Each family: the hub-shaped base (tests/hub_checkpoints.py) loaded by its folder, LoRA applied, its
trainable weights moved as training would, saved as an adapter recording a prompt and generation
settings; exported with the CLI; then a fresh Python process that imports nothing of ours loads it with
Blip2ForConditionalGeneration / Blip2Processor.from_pretrained and must caption like our caption command
does with the adapter (and with the export as --model).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from launch_helpers import cpu_env, load_launch
from PIL import Image
from safetensors.torch import load_file
from transformers import Blip2Processor

from blip2_dist import adapters as A
from blip2_dist.config import ModelArgs
from blip2_dist.data.transforms import CaptionFormat
from blip2_dist.errors import exit_for
from blip2_dist.lora import apply_lora
from blip2_dist.models import load_model

FAMILIES = ("opt", "t5")
PROMPT = "a photo of"
GENERATION = {
    "num_beams": 3,
    "max_new_tokens": 8,
    "min_new_tokens": 2,
    "repetition_penalty": 1.3,
    "length_penalty": 0.8,
}

# Runs in a fresh interpreter: transformers, torch and PIL only, as a user's script would.
PLAIN = r"""
import json, sys
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

out = {}
for name, spec in json.loads(sys.argv[1]).items():
    model = Blip2ForConditionalGeneration.from_pretrained(spec["dir"]).eval()
    processor = Blip2Processor.from_pretrained(spec["dir"])
    images = [Image.open(p).convert("RGB") for p in spec["images"]]
    inputs = processor(images=images, text=[spec["prompt"]] * len(images), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, generation_config=model.generation_config)
    if model.config.use_decoder_only_language_model:
        ids = ids[:, inputs["input_ids"].shape[1]:]
    out[name] = {"captions": [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)],
                 "dtype": str(model.dtype), "generation": model.generation_config.to_diff_dict()}
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("blip2_dist", "launch", "launch_helpers"))
print(json.dumps({"results": out, "ours": ours}))
"""


def run_launch(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """A launch/ script's main() in this process; (exit code, stdout, stderr)."""
    script = load_launch(module)
    capsys.readouterr()
    try:
        code = script.main(argv)
    except (SystemExit, Exception) as e:  # what run_main makes of it: an exit code and one line
        code, message = exit_for(e)
        if message:
            print(f"error: {message}", file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def fine_tuned_adapter(base_dir, out_dir, seed: int):
    """The base loaded by its folder (the hub path), LoRA + trained query tokens moved off their start."""
    model, processor = load_model(str(base_dir), dtype=torch.float32)
    peft_model = apply_lora(model, ModelArgs(lora_r=4, train_query_tokens=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    fmt = CaptionFormat.from_processor(processor, model.config, prompt=PROMPT)
    record = {
        "step": 100,
        "caption_format": A.caption_format_record(fmt),
        "generation": GENERATION,
        "metrics": {"split": "val", "step": 100, "values": {"CIDEr": 0.5, "loss": 2.0}},
    }
    return A.save_adapter(peft_model.eval(), processor, out_dir, base_name=str(base_dir), record=record)


def write_images(folder, size: int, n: int = 3):
    """PNG (lossless) images at the model's size: both preprocessors then only rescale and normalise."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def exported(hub_opt_dir, hub_t5_dir, tmp_path_factory):
    """Per family: adapter folder, float32 export folder, images."""
    from hub_checkpoints import IMAGE_SIZE

    root = tmp_path_factory.mktemp("export")
    images = write_images(root / "images", IMAGE_SIZE)
    made = {}
    for seed, (family, base) in enumerate((("opt", hub_opt_dir), ("t5", hub_t5_dir))):
        adapter = fine_tuned_adapter(base, root / f"{family}-adapter", seed)
        out = root / f"{family}-merged"
        assert load_launch("export").main(["--adapter", str(adapter), "--out", str(out), "--dtype", "float32"]) == 0
        saved = json.loads((out / "export_config.json").read_text())  # the resolved options, beside the model
        assert saved["export"] == {"adapter": str(adapter), "out": str(out), "dtype": "float32", "overwrite": False}
        made[family] = {"adapter": adapter, "out": out, "images": images, "base": base}
    return made


def our_captions(capsys, args: list[str], images) -> list[str]:
    code, out, err = run_launch("caption", [*args, "--json", "--dtype", "float32", *map(str, images)], capsys)
    assert code == 0, err
    assert "warning" not in err, err  # nothing overridden: the recorded settings, silently
    return [json.loads(line)["caption"] for line in out.strip().splitlines()]


def test_plain_transformers_in_a_fresh_process_captions_like_our_adapter_path(exported, capsys):
    spec = {
        f: {"dir": str(e["out"]), "images": [str(p) for p in e["images"]], "prompt": PROMPT}
        for f, e in exported.items()
    }
    env = cpu_env()
    env.pop("PYTHONPATH")  # the fresh process must not even see the repository
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, json.dumps(spec)], capture_output=True, text=True, timeout=300, env=env, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ours"] == []  # nothing of blip2-dist was imported
    for family, e in exported.items():
        plain = report["results"][family]
        assert plain["dtype"] == "torch.float32"
        assert {k: plain["generation"][k] for k in GENERATION} == GENERATION
        adapter_path = our_captions(capsys, ["--adapter", str(e["adapter"])], e["images"])
        export_path = our_captions(capsys, ["--model", str(e["out"])], e["images"])
        assert plain["captions"] == adapter_path == export_path, family
        assert any(c for c in adapter_path), f"{family}: every caption empty, nothing compared"


@pytest.mark.parametrize("family", FAMILIES)
def test_export_folder_contents_and_end_of_caption(exported, family):
    e = exported[family]
    out = e["out"]
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
        A.EXPORT_META,
        "processor_config.json",
        "tokenizer_config.json",
    } <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    base_config = json.loads((e["base"] / "config.json").read_text())
    # The end-of-caption token: the hub OPT's "\n", FLAN-T5's </s>; in both places generate() may read it.
    assert generation["eos_token_id"] == base_config["text_config"]["eos_token_id"]
    assert config["text_config"]["eos_token_id"] == generation["eos_token_id"]
    if family == "opt":
        tokenizer = Blip2Processor.from_pretrained(out).tokenizer
        assert tokenizer.decode([generation["eos_token_id"]]) == "\n"
    assert generation["pad_token_id"] == base_config["text_config"]["pad_token_id"]
    meta = json.loads((out / A.EXPORT_META).read_text())
    assert meta["caption_format"]["prompt"] == PROMPT and meta["generation"] == GENERATION
    # Merged: no LoRA tensors left, every base weight present, trained query tokens in place.
    tensors = load_file(out / "model.safetensors")
    assert not [k for k in tensors if "lora" in k]
    base_keys = set(load_file(e["base"] / "model.safetensors"))
    assert base_keys <= set(tensors)
    extras = load_file(e["adapter"] / A.EXTRAS_FILE)
    assert torch.equal(tensors["query_tokens"], extras["query_tokens"])


def test_model_cards_say_what_how_good_and_how_made(exported):
    e = exported["opt"]
    adapter_card = (e["adapter"] / "README.md").read_text()
    export_card = (e["out"] / "README.md").read_text()
    for card in (adapter_card, export_card):
        assert str(e["base"]) in card and '"a photo of"' in card  # base model, prompt
        assert "num_beams=3" in card and "length_penalty=0.8" in card  # generation settings
        assert "r=4" in card and "query_tokens" in card  # LoRA settings and what else was trained
        assert "Split `val`" in card and "| CIDEr | loss |" in card and "0.5000" in card  # metrics + split
        assert "text=PROMPT" in card and 'PROMPT = "a photo of"' in card
        assert '"\\n"' in card  # the OPT end-of-caption token, shown escaped
    assert "library_name: peft" in adapter_card and "PeftModel.from_pretrained" in adapter_card
    assert "library_name: transformers" in export_card
    assert "generation_config=model.generation_config" in export_card
    assert "launch/export.py --adapter" in export_card and "--dtype float32" in export_card  # the command


def test_export_overwrite_rules_and_bf16(exported, tmp_path, capsys):
    adapter = exported["t5"]["adapter"]
    code, _, err = run_launch("export", ["--adapter", str(adapter), "--out", str(exported["t5"]["out"])], capsys)
    assert code == 1 and "exists" in err and "--overwrite" in err
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    code, _, err = run_launch("export", ["--adapter", str(adapter), "--out", str(precious), "--overwrite"], capsys)
    assert code == 1 and "not an export of ours" in err
    assert (precious / "notes.txt").read_text() == "mine"  # nothing it did not write is deleted
    code, _, err = run_launch("export", ["--adapter", str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and "adapter_config.json" in err
    out = tmp_path / "bf16"
    for _ in range(2):  # the second time replaces the first export
        code, _, err = run_launch("export", ["--adapter", str(adapter), "--out", str(out), "--overwrite"], capsys)
        assert code == 0, err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_caption_flags_override_recorded_settings_with_a_warning(exported, capsys):
    e = exported["t5"]
    images = list(map(str, e["images"]))
    code, out, err = run_launch(
        "caption",
        ["--adapter", str(e["adapter"]), "--num-beams", "2", "--prompt", "a", "--dtype", "float32", *images],
        capsys,
    )
    assert code == 0, err
    assert "num_beams=2 differs from the recorded num_beams=3" in err and "--prompt 'a' differs" in err
    assert len(out.strip().splitlines()) == len(images)
    sampled = [
        "--adapter",
        str(e["adapter"]),
        "--dtype",
        "float32",
        "--json",
        "--do-sample",
        "--top-p",
        "0.9",
        "--num-return-sequences",
        "2",
        "--seed",
        "3",
        *images,
    ]
    runs = []
    for _ in range(2):
        code, out, err = run_launch("caption", sampled, capsys)
        assert code == 0, err
        rows = [json.loads(line) for line in out.strip().splitlines()]
        assert len(rows) == len(images) and all(len(r["captions"]) == 2 for r in rows)
        runs.append(rows)
    assert runs[0] == runs[1]  # --seed makes sampling repeatable
    for bad, message in (
        (["--top-p", "0.9"], "--do-sample"),
        (["--num-return-sequences", "4"], "--num-beams"),
        (["--max-memory", "cpu=1GiB"], "--device-map"),
    ):
        code, _, err = run_launch("caption", ["--adapter", str(e["adapter"]), *bad, *images], capsys)
        assert code not in (0, None) and message in str(code) + err


def test_device_map_auto_with_disk_offload_captions_the_same(exported, tmp_path, capsys):
    # accelerate spreads a model over the GPUs, then CPU memory, then disk. Here (no GPU) CPU memory for
    # 1.5x everything but the language model sends part of the language model to disk; accelerate's hooks
    # bring those layers in when they run.
    e = exported["opt"]
    tensors = load_file(e["out"] / "model.safetensors")
    budget = int(1.5 * sum(t.numel() * 4 for k, t in tensors.items() if not k.startswith("language_model")))
    # float32 throughout (--dtype): the memory budgets below count 4 bytes per parameter.
    placed = [
        "--dtype",
        "float32",
        "--device-map",
        "auto",
        "--offload-folder",
        str(tmp_path / "offload"),
        "--max-memory",
    ]
    plain = our_captions(capsys, ["--model", str(e["out"])], e["images"])
    assert our_captions(capsys, ["--model", str(e["out"]), *placed, f"cpu={budget}"], e["images"]) == plain
    dispatch = {"device_map": "auto", "max_memory": {"cpu": budget}, "offload_folder": str(tmp_path / "offload")}
    model, _ = A.load_for_inference(str(e["out"]), None, dtype=torch.float32, dispatch=dispatch)
    assert "disk" in model.hf_device_map.values()  # part of the language model really is on disk
    images = list(map(str, e["images"]))
    code, _, err = run_launch("caption", ["--model", str(e["out"]), *placed, "cpu=10KB", *images], capsys)
    assert code == 1 and "query_tokens" in err  # generate() needs them in memory: a clear error
    # peft cannot put LoRA into disk-offloaded layers of BLIP-2: a clear error pointing at the export.
    code, _, err = run_launch("caption", ["--adapter", str(e["adapter"]), *placed, f"cpu={budget}", *images], capsys)
    assert code == 1 and "launch/export.py" in err
