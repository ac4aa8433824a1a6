"""Benchmarks. One subcommand per thing measured; each imports the library, never the tests.

    python benchmarks/bench.py loader --synthesize 400 --images /tmp/flickr_like     # CPU, minutes
    python benchmarks/bench.py loader --images shards/flickr8k --workers 8 --json loader.json
    python benchmarks/bench.py train --model tiny-t5 --steps 20                       # CPU, ~1 minute
    python benchmarks/bench.py train --model Salesforce/blip2-opt-2.7b --random-init --device cuda \\
        --micro-batch 16 --steps 30 --json train.json                                # one GPU, no download
    python benchmarks/bench.py preprocess photos/*.jpg --json preprocess.json     # pixels vs the hub processor

Each subcommand's options are the fields of its dataclass (TrainBenchConfig in bench_train.py,
LoaderBenchConfig in bench_loader.py, PreprocessBenchConfig in bench_preprocess.py), turned into
flags by blip2_dist.config's generator; `--json` writes the report, the resolved options included.
Figures and the machines they came from: docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_loader import LoaderBenchConfig  # noqa: E402 - siblings in this folder
from bench_preprocess import PreprocessBenchConfig  # noqa: E402
from bench_train import TrainBenchConfig  # noqa: E402

from blip2_dist.config import ArgumentParser, add_section_args, check_values, option  # noqa: E402
from blip2_dist.errors import run_main  # noqa: E402


@dataclass
class ReportArgs:
    json: str = option("", "also write the report here (JSON)")


COMMANDS = {  # name -> (options, help, description)
    "loader": (
        LoaderBenchConfig,
        "shard stream vs the seed notebook's per-item processor loader",
        "Images/s and examples/s of TrainStream against the notebook loader. See benchmarks/bench_loader.py.",
    ),
    "train": (
        TrainBenchConfig,
        "our trainer step vs the HF PEFT notebook's loop, same model and batch",
        "Samples/s, tokens/s, s/step, peak memory, TFLOP/s and MFU of our DeepSpeed ZeRO-2 step (vision "
        "encoder once per image) and of the HF PEFT notebook's plain loop, in one run, with ours/baseline "
        "ratios. See benchmarks/bench_train.py.",
    ),
    "preprocess": (
        PreprocessBenchConfig,
        "our image pixels vs the hub image processor's, on photos",
        "Mean and max |difference| (8-bit levels) between ImageTransform (JPEG draft decoding on/off, "
        "torch/PIL resize) and BlipImageProcessorPil with the hub settings. "
        "See benchmarks/bench_preprocess.py.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (options, help_text, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description)
        if name == "preprocess":
            p.add_argument("photos", nargs="+", help="photo files (JPEG or PNG)")
        add_section_args(p, options, name)
        add_section_args(p, ReportArgs, "report")
    return parser


def section(cls: type, args: argparse.Namespace):
    """The dataclass from the flags given (the generator leaves unset flags out: the field's default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    obj = cls(**{k: v for k, v in vars(args).items() if k in names})
    check_values(obj)
    return obj


def run_command(args: argparse.Namespace) -> dict:
    options = section(COMMANDS[args.command][0], args)
    if args.command == "loader":
        from bench_loader import run

        return run(options)
    if args.command == "train":
        from bench_train import estimate_flops, run

        return estimate_flops(options) if options.flops_only else run(options)
    from bench_preprocess import run

    return run(args.photos, size=options.size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report_args = section(ReportArgs, args)
    report = run_command(args)
    if report_args.json:
        Path(report_args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
