"""Captions made safe for the COCO toolkit and tokenised the way it tokenises them (metrics.py scores
the result).

    normalize_caption("a dog\\u2028runs")              # "a dog runs": one caption, one line, for Java
    ptb_tokenize(["A dog runs.", "Two cats"])        # ["a dog runs", "two cats"]: the toolkit's PTBTokenizer
    python_tokenize("A dog's toy.")                  # a pure-Python approximation, when there is no `java`

The PTB tokenizer reads one caption per line, and Java breaks lines at \\r, \\x0b, \\x0c, \\u2028 and
\\u2029 as well as \\n: one such character would silently shift every later caption onto the wrong
image, so captions are sanitised first and the tokenizer's output line count is checked. Its temp
file goes to the system temp dir rather than site-packages, and it runs under a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_mod

PTB_TOKENIZER = "ptb"  # Stanford PTBTokenizer (CoreNLP 3.4.1), as COCOEvalCap runs it


FALLBACK_TOKENIZER = "python-fallback"  # pure-Python approximation; numbers not paper-comparable


_PTB_DIR = os.path.dirname(os.path.abspath(_ptb_mod.__file__))


_PTB_JAR = os.path.join(_PTB_DIR, _ptb_mod.STANFORD_CORENLP_3_4_1_JAR)


_PUNCTUATIONS = frozenset(_ptb_mod.PUNCTUATIONS)  # the tokens the toolkit drops after tokenising


def normalize_caption(s: str) -> str:
    """Collapse every run of whitespace (incl. \\r \\n \\t \\x0b \\x0c \\x85 \\u2028 \\u2029) to one space.

    Those characters would otherwise reach Java, which treats several of them as line breaks and
    shifts captions between images. Lone surrogates (not encodable as UTF-8) become "?".
    """
    if not isinstance(s, str):
        raise TypeError(f"caption must be a str, got {type(s).__name__}: {s!r}")
    s = " ".join(s.split())
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s


def java_available() -> bool:
    """True when a `java` executable is on PATH (PTB tokenizer, METEOR and SPICE need it)."""
    return shutil.which("java") is not None


def ptb_tokenize(captions: Sequence[str], timeout: float | None = None) -> list[str]:
    """The toolkit's PTBTokenizer on a list of (sanitised) captions: one tokenised string each.

    Same command and post-processing as pycocoevalcap's `PTBTokenizer.tokenize` (one caption per
    line, `-preserveLines -lowerCase`, punctuation tokens dropped); the line count is checked.
    """
    return ptb_tokenize_many([captions], timeout)[0]


def ptb_tokenize_many(batches: Sequence[Sequence[str]], timeout: float | None = None) -> list[list[str]]:
    """One PTBTokenizer JVM per batch, run side by side (references and predictions, as COCOEvalCap
    tokenises them in two separate calls)."""
    java = shutil.which("java")
    if java is None:
        raise FileNotFoundError("no `java` on PATH")
    if timeout is None:
        timeout = 120.0 + 0.002 * sum(len(b) for b in batches)
    files, procs = [], []
    try:
        for captions in batches:
            with tempfile.NamedTemporaryFile("wb", suffix=".ptb.txt", delete=False) as f:
                f.write("\n".join(captions).encode())
            files.append(f.name)
            cmd = [
                java,
                "-cp",
                _PTB_JAR,
                "edu.stanford.nlp.process.PTBTokenizer",
                "-preserveLines",
                "-lowerCase",
                f.name,
            ]
            procs.append(
                subprocess.Popen(
                    cmd, cwd=_PTB_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
            )
        deadline = time.monotonic() + timeout
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for name in files:
            os.remove(name)
    result = []
    for captions, p, (out, err) in zip(batches, procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"PTBTokenizer exited with {p.returncode}: {err.decode(errors='replace')[-2000:]}")
        lines = out.decode().split("\n")
        if len(lines) != len(captions):
            raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
        result.append([" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATIONS) for line in lines])
    return result


_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc inc co corp ltd mt ft no e.g i.e".split())


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


_FALLBACK_RULES = [  # (pattern, replacement), applied in order to the lower-cased caption
    (re.compile(r'"'), " `` "),  # PTB turns quotes into `` / '' and the toolkit drops both
    (re.compile(r"(?:^|(?<=\s))'(?!\d0s\b|n'\s)"), " ` "),  # opening single quote ('90s, 'n' stay)
    (re.compile(r"(?<!'n)(?<=[^\s'])'(?=\s|$)"), " ' "),  # closing single quote, plural possessive
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m.group()]} "),
    (re.compile(r"\.\.\.+|\u2026"), " ... "),
    (re.compile(r"--+"), " -- "),
    (re.compile(r",(?!\d)|(?<!\d),"), " , "),
    (re.compile(r":(?!\d)|(?<!\d):"), " : "),
    (re.compile(r"[;!?]+"), lambda m: f" {m.group()} "),
    (re.compile(r"[$%#&|]"), lambda m: f" {m.group()} "),
    (re.compile(r"\bcannot\b"), "can not"),
    (re.compile(r"\b(gon|wan)(na)\b"), r"\1 \2"),
    (re.compile(r"(\w)(n't)\b"), r"\1 \2"),
    (re.compile(r"(\w)('s|'re|'ll|'ve|'d|'m)\b"), r"\1 \2"),
]


def python_tokenize(caption: str) -> str:
    """Pure-Python approximation of the toolkit's PTB tokenisation (used only without Java).

    Lower-cases, splits off punctuation, brackets (-lrb- ...), quotes and contractions the way
    PTBTokenizer does for everyday captions, then drops the toolkit's punctuation tokens. Exotic
    input (abbreviations, symbols, emoji) may tokenise differently: such numbers are flagged as not
    paper-comparable.
    """
    s = normalize_caption(caption).lower()
    for pattern, repl in _FALLBACK_RULES:
        s = pattern.sub(repl, s)
    tokens = []
    for tok in s.split():
        if len(tok) > 1 and tok.endswith(".") and not tok.endswith("..."):
            stem = tok[:-1]
            if "." not in stem and stem not in _ABBREVIATIONS and not (len(stem) == 1 and stem.isalpha()):
                tokens += [stem, "."]
                continue
        tokens.append(tok)
    return " ".join(t for t in tokens if t not in _PUNCTUATIONS)
