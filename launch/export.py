"""Merge a trained adapter into its base and save a full BLIP-2 folder that plain transformers loads.

    python launch/export.py --adapter runs/ft5xl/best --out exports/ft5xl                   # bfloat16
    python launch/export.py --adapter runs/demo/best --out runs/demo/merged --dtype float32

The folder holds the merged weights, the processor, a generation_config.json with the recorded
generation settings and the end-of-caption token, and a model card (README.md) with the prompt.
Load it with `Blip2ForConditionalGeneration.from_pretrained(OUT)` and `Blip2Processor.from_pretrained(OUT)`,
or caption with `python launch/caption.py --model OUT photos/`. The resolved options go to OUT/export_config.json
(every option: docs/configuration.md). Exit codes: 0 written, 1 error, 2 bad command line.
"""

from __future__ import annotations

import shlex
import sys

from blip2_dist.commands import sections_of
from blip2_dist.config import parse_sections, save_config
from blip2_dist.errors import UserError, run_main
from blip2_dist.export import DTYPES, export_merged
from blip2_dist.models import ModelNotAvailableError

EXPORT_CONFIG = "export_config.json"  # not config.json: that is the merged model's own


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parsed = parse_sections(argv, __doc__, *sections_of("export"))
    a = parsed.sections["export"]
    command = shlex.join(["python", "launch/export.py", *argv])
    try:
        out = export_merged(a.adapter, a.out, dtype=DTYPES[a.dtype], overwrite=a.overwrite, command=command)
    except ModelNotAvailableError as e:  # a base that is not on this machine: one line, not a traceback
        raise UserError(str(e)) from e
    save_config(out / EXPORT_CONFIG, parsed.sections)
    print(
        f"merged model in {out}: Blip2ForConditionalGeneration.from_pretrained({str(out)!r}); "
        f"model card {out}/README.md"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
