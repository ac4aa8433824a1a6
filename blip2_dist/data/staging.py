"""The packer's --out, written atomically: checked before any work, written last.

    check_out(out, overwrite)                # at once: refuses a folder holding what the packer did not write
    with staged_out(out, overwrite) as tmp:  # a temporary folder beside --out ...
        pack_records(records, tmp, ...)      # ... swapped in only when the block ends without an error

The pack is written into `.NAME.packing-*` beside --out and swapped in when complete, so a failed
run leaves --out as it was. --out may be missing, empty, or hold a pack this packer wrote (which is
then replaced, its own files only); a folder holding anything else is refused unless --overwrite is
given, and even then only files named like the new pack's are replaced: nothing the packer did not
write is deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blip2_dist.data.flickr8k import PackError
from blip2_dist.data.shards import MANIFEST, WRITER, read_manifest

_SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")


PACK_CONFIG = "pack_config.json"  # the packer command's resolved options, written beside the manifest (pack_cli)


def own_pack_files(out_dir: str | os.PathLike) -> set[str] | None:
    """The files of a pack this packer wrote in `out_dir` (its manifest, the shards it lists, its options),
    or None when the folder holds no such pack."""
    try:
        manifest = read_manifest(out_dir)
    except (OSError, ValueError):
        return None
    if manifest.get("written_by") != WRITER:
        return None
    shards = {s["name"] for split in manifest.get("splits", {}).values() for s in split["shards"]}
    return {MANIFEST, MANIFEST + ".tmp", PACK_CONFIG} | shards


def check_out(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Before any work: --out must be missing, empty, or a pack this packer wrote; anything else
    only with `overwrite`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    foreign = sorted(set(os.listdir(out)) - (own_pack_files(out) or set()))
    if foreign and not overwrite:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PackError(
            f"--out {out} holds files this packer did not write ({listed}): choose an empty or new "
            "folder, or pass --overwrite to write the pack there (files not named like the pack's "
            "are kept)"
        )


@contextmanager
def staged_out(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out_dir` to write the pack into: swapped in when the block ends
    without an error, deleted otherwise (it holds nothing but what the block wrote)."""
    out = Path(out_dir).absolute()
    check_out(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.packing-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a pack is shared like any folder
    except OSError as e:
        raise PackError(f"--out {out_dir}: cannot write in {out.parent} ({e.strerror or e})") from None
    try:
        yield tmp
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished pack in `tmp` at `out`. A missing or empty `out` is replaced in one rename;
    otherwise the old manifest goes first (a folder without one is an unfinished pack), then the
    new shards move in, the old pack's other shards are deleted, and the new manifest comes last."""
    try:
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            os.replace(tmp, out)
            return
        old = own_pack_files(out) or set()
        new = set(os.listdir(tmp))
        (out / MANIFEST).unlink(missing_ok=True)
        for name in sorted(new - {MANIFEST}):
            os.replace(tmp / name, out / name)
        for name in sorted(old - new):
            (out / name).unlink(missing_ok=True)
        os.replace(tmp / MANIFEST, out / MANIFEST)
        tmp.rmdir()
    except OSError as e:
        raise PackError(f"--out {out}: cannot move the finished pack there ({e.strerror or e})") from None
    stray = sorted(n for n in os.listdir(out) if _SHARD_NAME.match(n) and n not in new)
    if stray:
        print(
            f"note: {out} also holds {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}, not written by "
            "this packer: left in place, and not part of the new pack",
            file=sys.stderr,
        )
