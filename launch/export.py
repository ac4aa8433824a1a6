"""Merge a trained adapter into its base and save a full BLIP-2 folder that plain transformers loads.

    python launch/export.py --adapter runs/ft5xl/best --out exports/ft5xl                   # bfloat16
    python launch/export.py --adapter runs/demo/best --out runs/demo/merged --dtype float32

The folder holds the merged weights, the processor, a generation_config.json with the recorded
generation settings and the end-of-caption token, and a model card (README.md) with the prompt.
Load it with `Blip2ForConditionalGeneration.from_pretrained(OUT)` and `Blip2Processor.from_pretrained(OUT)`,
or caption with `python launch/caption.py --model OUT photos/`. Exit codes: 0 written, 1 error.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from blip2_dist.errors import UserError, run_main
from blip2_dist.export import DTYPES, export_merged
from blip2_dist.models import ModelNotAvailableError


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True,
                   help="adapter folder saved by training (RUN/best, RUN/checkpoints/step_N/adapter)")
    p.add_argument("--out", required=True, help="folder to write; must not exist unless --overwrite")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="dtype of the saved weights (default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier export")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    command = shlex.join(["python", "launch/export.py", *argv])
    try:
        out = export_merged(a.adapter, a.out, dtype=DTYPES[a.dtype], overwrite=a.overwrite, command=command)
    except ModelNotAvailableError as e:  # a base that is not on this machine: one line, not a traceback
        raise UserError(str(e)) from e
    print(f"merged model in {out}: Blip2ForConditionalGeneration.from_pretrained({str(out)!r}); "
          f"model card {out}/README.md")
    return 0


if __name__ == "__main__":
    run_main(main)
