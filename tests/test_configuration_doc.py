"""docs/configuration.md is generated from the option dataclasses and stays current; every command's flags are in it."""

import argparse
from pathlib import Path

import pytest

from blip2_dist.commands import COMMANDS, PACK_SOURCES, reference, sections_of
from blip2_dist.config import build_parser
from blip2_dist.data.pack_cli import build_parser as pack_parser

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
DOC = DOC_PATH.read_text(encoding="utf-8")


def flags_of(parser: argparse.ArgumentParser) -> list[str]:
    return [
        opt
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--")
        and opt not in ("--help", "--local_rank", "--local-rank", "--config", "--debug")
        and not opt.startswith("--no-")
    ]


def test_reference_is_current():
    assert DOC == reference(), "docs/configuration.md is stale: run `make docs`"


@pytest.mark.parametrize("command", ["train", "evaluate", "caption", "export"])
def test_every_flag_of_a_command_is_in_its_section_of_the_reference(command):
    parser = build_parser("t") if command == "train" else build_parser("t", *sections_of(command))
    flags = flags_of(parser)
    heading = next(k for k in COMMANDS if k.startswith(command + " "))
    part = DOC.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    assert len(flags) >= 4 and not [f for f in flags if f"`{f}`" not in part]


def test_every_packer_flag_is_documented_under_its_subcommand():
    parser = pack_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {*PACK_SOURCES, "index", "synthetic"}
    for name, sub in subparsers.choices.items():
        heading = next(k for k in COMMANDS if k.startswith(f"pack {name} "))
        part = DOC.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
        missing = [f for f in flags_of(sub) if f"`{f}`" not in part]
        assert not missing, f"blip2-pack {name}: {missing} not in docs/configuration.md"


def test_every_option_of_every_command_has_help():
    # The generator reads help, type and default from each field; a field declared without option() has none.
    for table in COMMANDS.values():
        for cls, _ in table.values():
            for f in cls.__dataclass_fields__.values():
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
