"""COCO caption metrics with the official toolkit (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr.

The numbers are the toolkit's own, computed the way COCOEvalCap does it: the Stanford PTB tokenizer
(Java) on the references and on the predictions, then Bleu(4), Meteor(), Rouge(), Cider() (CIDEr-D)
and, when its Stanford CoreNLP models are installed, Spice(). That makes them comparable with the
numbers in papers (BLIP-2, LAVIS), which report this toolkit. Values are fractions (0..1) as the
toolkit returns them; CIDEr can exceed 1.

    from blip2_dist.metrics import score_captions, score_captions_detailed, normalize_caption
    preds = {"img1": "a dog runs on the grass", "img2": "two cats on a sofa"}
    refs = {"img1": ["a brown dog running", "a dog on grass"], "img2": ["cats sleeping", "two cats"]}
    score_captions(preds, refs)   # {"BLEU-1": .., "BLEU-2": .., "BLEU-3": .., "BLEU-4": .., "METEOR": ..,
                                  #  "ROUGE-L": .., "CIDEr": ..}   (+ "SPICE" when its models are present)
    scores, info = score_captions_detailed(preds, refs)  # info: tokenizer, scorers, unavailable, per_image

    OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_metrics.py   # CPU; needs `java` (openjdk 17)

What this module adds around the toolkit, without changing its numbers:
- Captions are sanitised first (`normalize_caption`: `" ".join(s.split())`). The PTB tokenizer reads
  one caption per line and Java breaks lines at \\r, \\x0b, \\x0c, \\u2028 and \\u2029 as well as \\n
  (measured over every code point): one such character silently shifts every later caption onto the
  wrong image. METEOR's protocol is line based too (a \\n in a candidate hangs it). str.split() splits
  on all of these (and on tabs, \\x85, \\x1c-\\x1f, NBSP, ...). Lone surrogates become "?".
- The tokenizer's output line count is checked (the toolkit zips silently), its temp file goes to the
  system temp dir rather than site-packages, and it runs under a timeout.
- Images are scored in sorted-id order, so the result does not depend on the order ranks gathered
  them in (the toolkit's means are order-sensitive in the last bits).
- METEOR's JVM (~8-11 s to start, ~1.3 GB) is started once per process, lazily (or early with
  `warm_up_meteor()`, so it loads while captions are generated), never reused across a fork (a child
  starts its own), called under a timeout with one retry on a fresh JVM, and killed at exit without
  the toolkit's `__del__` lock (which hangs when a call failed mid-way).
- Without `java` on PATH, METEOR (and SPICE) are reported unavailable and a pure-Python approximation
  of the PTB tokenizer runs; `info["paper_comparable"]` is then False.
- An empty prediction is scored as the empty string (the toolkit handles it: BLEU/METEOR/CIDEr 0,
  ROUGE-L 0 unless a reference is empty too), never dropped.
- SPICE runs only when the Stanford CoreNLP 3.6.0 jars are already in pycocoevalcap's spice/lib (the
  toolkit would otherwise try to download them, which fails offline).
"""

from __future__ import annotations

import atexit
import math
import multiprocessing.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_mod
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as _spice_models_mod
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_mod

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPICE_KEY = "SPICE"
PTB_TOKENIZER = "ptb"  # Stanford PTBTokenizer (CoreNLP 3.4.1), as COCOEvalCap runs it
FALLBACK_TOKENIZER = "python-fallback"  # pure-Python approximation; numbers not paper-comparable

_PTB_DIR = os.path.dirname(os.path.abspath(_ptb_mod.__file__))
_PTB_JAR = os.path.join(_PTB_DIR, _ptb_mod.STANFORD_CORENLP_3_4_1_JAR)
_PUNCTUATIONS = frozenset(_ptb_mod.PUNCTUATIONS)  # the tokens the toolkit drops after tokenising
_METEOR_DIR = os.path.dirname(os.path.abspath(_meteor_mod.__file__))
_SPICE_LIB = os.path.join(os.path.dirname(os.path.abspath(_spice_models_mod.__file__)), "lib")
_SPICE_JARS = (f"{_spice_models_mod.JAR}.jar", f"{_spice_models_mod.JAR}-models.jar")


# --------------------------------------------------------------------------------------------------
# Sanitising and tokenising
# --------------------------------------------------------------------------------------------------
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


def spice_models_present(lib_dir: str | None = None) -> bool:
    """True when SPICE's Stanford CoreNLP jars are in pycocoevalcap's spice/lib (no download needed)."""
    lib_dir = lib_dir or _SPICE_LIB
    return all(os.path.isfile(os.path.join(lib_dir, name)) for name in _SPICE_JARS)


def ptb_tokenize(captions: Sequence[str], timeout: float | None = None) -> list[str]:
    """The toolkit's PTBTokenizer on a list of (sanitised) captions: one tokenised string each.

    Same command and post-processing as pycocoevalcap's `PTBTokenizer.tokenize` (one caption per
    line, `-preserveLines -lowerCase`, punctuation tokens dropped); the line count is checked.
    """
    return _ptb_tokenize_many([captions], timeout)[0]


def _ptb_tokenize_many(batches: Sequence[Sequence[str]], timeout: float | None = None) -> list[list[str]]:
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
            cmd = [java, "-cp", _PTB_JAR, "edu.stanford.nlp.process.PTBTokenizer",
                   "-preserveLines", "-lowerCase", f.name]
            procs.append(subprocess.Popen(cmd, cwd=_PTB_DIR, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
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
        result.append([" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATIONS)
                       for line in lines])
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


# --------------------------------------------------------------------------------------------------
# METEOR: one JVM per process
# --------------------------------------------------------------------------------------------------
class MeteorError(RuntimeError):
    """METEOR failed (timed out, crashed or answered garbage) even after a retry on a fresh JVM."""


class _ToolkitMeteor(_meteor_mod.Meteor):
    """pycocoevalcap's Meteor: same command and `compute_score`, a lifecycle that cannot hang.

    stderr goes to a temp file (the toolkit's unread PIPE could fill up), and `__del__` neither
    takes the toolkit's lock (left held when a call raised) nor touches a JVM of another process.
    """

    def __init__(self, java: str, cmd: Sequence[str] | None = None):  # no super(): it Popens itself
        self.meteor_cmd = list(cmd) if cmd else [
            java, "-jar", "-Xmx2G", _meteor_mod.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        self.owner_pid = os.getpid()
        self.stderr_file = tempfile.TemporaryFile()
        self.meteor_p = subprocess.Popen(self.meteor_cmd, cwd=_METEOR_DIR, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.stderr_file)
        self.lock = threading.Lock()

    def stderr_tail(self, limit: int = 1500) -> str:
        try:
            self.stderr_file.seek(0)
            return self.stderr_file.read().decode(errors="replace")[-limit:].strip()
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        """Kill first (unblocks any reader/writer thread), then reap and close the pipes."""
        if os.getpid() != self.owner_pid:
            return  # the JVM belongs to the parent of this forked process
        p = self.meteor_p
        try:
            p.kill()
            p.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (p.stdin, p.stdout, self.stderr_file):
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_ORPHANS: list[Any] = []  # JVM handles inherited across a fork: kept referenced, never touched
_INSTANCES: weakref.WeakSet = weakref.WeakSet()
_HOOKS_PID: int | None = None


class MeteorScorer:
    """A lazily started, fork-aware, timeout-guarded METEOR JVM (pycocoevalcap's Meteor inside).

    Use `get_meteor()` for the process-wide instance. `compute_score(gts, res)` takes the same
    tokenised dicts as the toolkit ({id: [refs...]}, {id: [hypothesis]}) and returns the same
    (score, per-image scores). A call that times out or fails kills the JVM and is retried once on
    a fresh one; a second failure raises MeteorError.
    """

    def __init__(self, timeout: float | None = None, retries: int = 1, cmd: Sequence[str] | None = None):
        self.timeout = timeout  # None: 180 s + 20 ms per image (the first call includes JVM start)
        self.retries = retries
        self.cmd = list(cmd) if cmd else None  # tests only: replace the JVM command
        self.starts = 0  # how many JVMs this instance started in this process
        self._meteor: _ToolkitMeteor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        _INSTANCES.add(self)

    def _adopt_after_fork(self) -> None:
        """In a forked child: forget the parent's JVM (without killing it) and start afresh."""
        if self._pid != os.getpid():
            if self._meteor is not None:
                _ORPHANS.append(self._meteor)
            self._meteor, self._pid, self.starts = None, os.getpid(), 0
            self._lock = threading.Lock()  # the parent's may have been held at fork time

    def start(self) -> None:
        """Start the JVM now (non-blocking: it loads while the caller does other work)."""
        self._adopt_after_fork()
        with self._lock:
            self._ensure_started()

    @property
    def pid(self) -> int | None:
        """The JVM's process id (None before the first start)."""
        return None if self._meteor is None else self._meteor.meteor_p.pid

    def _ensure_started(self) -> _ToolkitMeteor:
        m = self._meteor
        if m is None or m.meteor_p.poll() is not None:
            if m is not None:
                m.close()
            java = shutil.which("java")
            if java is None and not self.cmd:
                raise FileNotFoundError("no `java` on PATH")
            _register_exit_hooks()
            self._meteor = m = _ToolkitMeteor(java or "java", self.cmd)
            self.starts += 1
        return m

    def compute_score(self, gts: Mapping, res: Mapping, timeout: float | None = None) -> tuple[float, list[float]]:
        self._adopt_after_fork()
        timeout = timeout or self.timeout or 180.0 + 0.02 * len(res)
        with self._lock:
            errors = []
            for _ in range(1 + self.retries):
                try:
                    return self._call(gts, res, timeout)
                except MeteorError as e:
                    errors.append(str(e))
                    self._kill()
            raise MeteorError("; then ".join(errors))

    def _call(self, gts: Mapping, res: Mapping, timeout: float) -> tuple[float, list[float]]:
        m = self._ensure_started()
        out: dict[str, Any] = {}

        def run():
            try:
                out["result"] = m.compute_score(gts, res)
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                out["error"] = e

        worker = threading.Thread(target=run, name="meteor-call", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            m.close()  # unblocks the worker's readline/write
            worker.join(10)
            raise MeteorError(f"METEOR call timed out after {timeout:.0f} s (JVM killed)")
        if "error" in out:
            e = out["error"]
            raise MeteorError(f"METEOR call failed: {type(e).__name__}: {e} [stderr: {m.stderr_tail()}]")
        score, scores = out["result"]
        if len(scores) != len(res) or not all(math.isfinite(x) for x in [score, *scores]):
            raise MeteorError(f"METEOR answered {len(scores)} scores for {len(res)} images")
        return score, scores

    def _kill(self) -> None:
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def close(self) -> None:
        """Kill this process's JVM (a no-op in a forked child for the parent's JVM)."""
        if self._pid == os.getpid():
            self._kill()


_SHARED: MeteorScorer | None = None
_SHARED_LOCK = threading.Lock()


def get_meteor() -> MeteorScorer:
    """The process-wide MeteorScorer (a forked child gets its own, never the parent's JVM)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = MeteorScorer()
        return _SHARED


def warm_up_meteor() -> bool:
    """Start the shared METEOR JVM in the background now; False when Java is missing."""
    try:
        get_meteor().start()
        return True
    except (FileNotFoundError, OSError):
        return False


def _after_fork_in_child() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()  # may have been held by another thread at fork time


def _close_all() -> None:
    for inst in list(_INSTANCES):
        try:
            inst.close()
        except Exception:
            pass


def _register_exit_hooks() -> None:
    """Kill this process's JVMs at exit: atexit, plus a multiprocessing finaliser because a
    multiprocessing child leaves through os._exit (no atexit). Once per process."""
    global _HOOKS_PID
    if _HOOKS_PID != os.getpid():
        _HOOKS_PID = os.getpid()
        atexit.register(_close_all)
        multiprocessing.util.Finalize(None, _close_all, exitpriority=100)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def _check_inputs(predictions: Mapping, references: Mapping) -> list:
    """Validate keys and types; return the image ids in a deterministic (sorted) order."""
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError("predictions and references must be dicts keyed by image id")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        parts = []
        for ids, what in ((missing, "without a prediction"), (extra, "without references")):
            if ids:
                shown = sorted(ids, key=_id_key)[:5]
                parts.append(f"{len(ids)} image(s) {what}: {', '.join(map(repr, shown))}"
                             + (" ..." if len(ids) > 5 else ""))
        raise ValueError("predictions and references cover different images: " + "; ".join(parts))
    if not predictions:
        raise ValueError("nothing to score: predictions and references are empty")
    for k, p in predictions.items():
        if not isinstance(p, str):
            raise TypeError(f"prediction for image {k!r} must be a str, got {type(p).__name__}")
    for k, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(f"references for image {k!r} must be a list of str, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"image {k!r} has an empty reference list")
        for r in refs:
            if not isinstance(r, str):
                raise TypeError(f"a reference for image {k!r} is a {type(r).__name__}, not a str")
    return sorted(predictions, key=_id_key)


def _id_key(k):
    return (type(k).__name__, k)


def _tokenize(ids, predictions, references, info) -> tuple[dict, dict]:
    """Sanitise, then tokenise references and predictions (separately, as COCOEvalCap does)."""
    ref_caps = [normalize_caption(r) for k in ids for r in references[k]]
    pred_caps = [normalize_caption(predictions[k]) for k in ids]
    owners = [k for k in ids for _ in references[k]]
    blank_refs = list(dict.fromkeys(k for k, r in zip(owners, ref_caps) if not r))
    if blank_refs:
        msg = (f"{len(blank_refs)} image(s) have an empty reference string (ROUGE-L then gives an empty "
               f"prediction 1.0, as the toolkit does): {blank_refs[:5]!r}")
        warnings.warn(msg, stacklevel=3)
        info["warnings"].append(msg)
    tok_refs = tok_preds = None
    if java_available():
        try:
            tok_refs, tok_preds = _ptb_tokenize_many([ref_caps, pred_caps])
            info["tokenizer"], info["paper_comparable"] = PTB_TOKENIZER, True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            msg = f"PTB tokenizer failed ({type(e).__name__}: {e}); used the Python fallback"
            warnings.warn(msg, stacklevel=3)
            info["warnings"].append(msg)
    else:
        info["warnings"].append("no `java` on PATH: Python fallback tokenizer, no METEOR/SPICE")
    if tok_refs is None:
        tok_refs, tok_preds = [python_tokenize(c) for c in ref_caps], [python_tokenize(c) for c in pred_caps]
        info["tokenizer"], info["paper_comparable"] = FALLBACK_TOKENIZER, False
    gts, res, it = {}, {}, iter(tok_refs)
    for k, pred in zip(ids, tok_preds):
        gts[k] = [next(it) for _ in references[k]]
        res[k] = [pred]
    return gts, res


def score_captions_detailed(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    meteor: bool = True,
    spice: bool = True,
    per_image: bool = True,
    meteor_timeout: float | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Score captions with the COCO toolkit; return (scores, info).

    scores: "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr" (+ "SPICE") as floats; a scorer that
    could not run is absent from scores and named in info["unavailable"] with the reason.
    info: {"tokenizer": "ptb" | "python-fallback", "paper_comparable": bool, "scorers": [...ran],
    "unavailable": {name: reason}, "warnings": [...], "num_images": int, "timings_s": {...},
    "per_image": {id: {metric: float}} (when per_image)}.
    meteor/spice=False skip those scorers; meteor_timeout overrides the per-call METEOR timeout.
    """
    ids = _check_inputs(predictions, references)
    info: dict[str, Any] = {"tokenizer": None, "paper_comparable": None, "scorers": [],
                            "unavailable": {}, "warnings": [], "num_images": len(ids), "timings_s": {}}
    t0 = time.perf_counter()
    gts, res = _tokenize(ids, predictions, references, info)
    info["timings_s"]["tokenize"] = time.perf_counter() - t0
    scores: dict[str, float] = {}
    per: dict[str, dict[str, float]] = {k: {} for k in ids}

    def record(names, corpus, per_img):
        for name, value, values in zip(names, corpus, per_img):
            scores[name] = float(value)
            for k, v in zip(ids, values):
                per[k][name] = float(v)

    t = time.perf_counter()
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    record(METRIC_KEYS[:4], bleu, bleu_per)
    info["scorers"].append("BLEU")
    info["timings_s"]["BLEU"] = time.perf_counter() - t

    _run_meteor(meteor, gts, res, meteor_timeout, info, record)

    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        t = time.perf_counter()
        score, per_img = scorer.compute_score(gts, res)
        record([name], [score], [per_img])
        info["scorers"].append(name)
        info["timings_s"][name] = time.perf_counter() - t

    _run_spice(spice, gts, res, info, record)
    scores = {k: scores[k] for k in (*METRIC_KEYS, SPICE_KEY) if k in scores}
    info["timings_s"]["total"] = time.perf_counter() - t0
    if per_image:
        info["per_image"] = per
    return scores, info


def _run_meteor(enabled, gts, res, timeout, info, record) -> None:
    if not enabled:
        info["unavailable"]["METEOR"] = "disabled by the caller"
        return
    if not java_available():
        info["unavailable"]["METEOR"] = "no `java` on PATH (METEOR runs in a JVM)"
        return
    t = time.perf_counter()
    try:
        score, per_img = get_meteor().compute_score(gts, res, timeout=timeout)
    except (MeteorError, OSError) as e:
        info["unavailable"]["METEOR"] = f"failed: {e}"
        warnings.warn(f"METEOR failed and is left out: {e}", stacklevel=3)
        return
    record(["METEOR"], [score], [per_img])
    info["scorers"].append("METEOR")
    info["timings_s"]["METEOR"] = time.perf_counter() - t


def _run_spice(enabled, gts, res, info, record) -> None:
    if not enabled:
        info["unavailable"][SPICE_KEY] = "disabled by the caller"
        return
    if not spice_models_present():
        info["unavailable"][SPICE_KEY] = (
            f"Stanford CoreNLP jars {', '.join(_SPICE_JARS)} not in {_SPICE_LIB} (SPICE downloads them at "
            "first use, which fails offline; run `python -m pycocoevalcap.spice.get_stanford_models` "
            "where there is network)")
        return
    if not java_available():
        info["unavailable"][SPICE_KEY] = "no `java` on PATH"
        return
    from pycocoevalcap.spice.spice import Spice  # only here: SPICE writes caches into site-packages

    t = time.perf_counter()
    try:
        score, per_img = Spice().compute_score(gts, res)
    except Exception as e:  # noqa: BLE001 - SPICE is optional; report why it is missing
        info["unavailable"][SPICE_KEY] = f"failed: {type(e).__name__}: {e}"
        return
    by_id = dict(zip(sorted(gts), per_img))  # the toolkit's Spice returns them in sorted(ids) order
    record([SPICE_KEY], [score], [[by_id[k]["All"]["f"] for k in gts]])
    info["scorers"].append(SPICE_KEY)
    info["timings_s"][SPICE_KEY] = time.perf_counter() - t


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    **kwargs: Any,
) -> dict[str, float]:
    """COCO caption metrics {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"[, "SPICE"]: float}.

    predictions: {image_id: caption}; references: {image_id: [caption, ...]} over the same ids.
    Keyword arguments as in `score_captions_detailed`.
    """
    return score_captions_detailed(predictions, references, per_image=False, **kwargs)[0]
