"""The README stays true to the code: the two set-up commands first, the data contract; every training flag
is documented in docs/configuration.md (the generated reference the README links to)."""

from pathlib import Path

from blip2_dist.config import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def test_two_setup_commands_come_first():
    top = "\n".join(README.splitlines()[:25])
    assert "make demo" in top and "make test" in top


def test_every_training_flag_is_documented():
    parser = build_parser("t")
    flags = [
        opt
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--")
        and opt not in ("--help", "--local_rank", "--local-rank")
        and not opt.startswith("--no-")
    ]
    missing = [f for f in flags if f"`{f}" not in CONFIGURATION]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_data_contract_documented():
    for needle in ('"image_id"', '"captions"', '"split"', "manifest.json", "{split}-{NNNNNN}.tar"):
        assert needle in README, needle
