"""COCO caption metrics with the official toolkit (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr.

The numbers are the toolkit's own, computed the way COCOEvalCap does it: the Stanford PTB tokenizer
(Java) on the references and on the predictions, then Bleu(4), Meteor(), Rouge(), Cider() (CIDEr-D)
and, when its Stanford CoreNLP models are installed, Spice(). That makes them comparable with the
numbers in papers (BLIP-2, LAVIS), which report this toolkit. Values are fractions (0..1) as the
toolkit returns them; CIDEr can exceed 1.

    from blip2_dist.metrics import score_captions, score_captions_detailed
    preds = {"img1": "a dog runs on the grass", "img2": "two cats on a sofa"}
    refs = {"img1": ["a brown dog running", "a dog on grass"], "img2": ["cats sleeping", "two cats"]}
    score_captions(preds, refs)   # {"BLEU-1": .., "BLEU-2": .., "BLEU-3": .., "BLEU-4": .., "METEOR": ..,
                                  #  "ROUGE-L": .., "CIDEr": ..}   (+ "SPICE" when its models are present)
    scores, info = score_captions_detailed(preds, refs)  # info: tokenizer, scorers, unavailable, per_image

    OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_metrics.py   # CPU; needs `java` (openjdk 17)

What this module adds around the toolkit, without changing its numbers:
- Captions are sanitised first (caption_tokens.py, `normalize_caption`: `" ".join(s.split())`). The PTB tokenizer reads
  one caption per line and Java breaks lines at \\r, \\x0b, \\x0c, \\u2028 and \\u2029 as well as \\n
  (measured over every code point): one such character silently shifts every later caption onto the
  wrong image. METEOR's protocol is line based too (a \\n in a candidate hangs it). str.split() splits
  on all of these (and on tabs, \\x85, \\x1c-\\x1f, NBSP, ...). Lone surrogates become "?".
- The tokenizer's output line count is checked (the toolkit zips silently), its temp file goes to the
  system temp dir rather than site-packages, and it runs under a timeout (caption_tokens.py).
- Images are scored in sorted-id order, so the result does not depend on the order ranks gathered
  them in (the toolkit's means are order-sensitive in the last bits).
- METEOR's JVM (meteor.py; ~8-11 s to start, ~1.3 GB) is started once per process, lazily (or early with
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

import os
import subprocess
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as _spice_models_mod

from blip2_dist.caption_tokens import (
    FALLBACK_TOKENIZER,
    PTB_TOKENIZER,
    java_available,
    normalize_caption,
    ptb_tokenize_many,
    python_tokenize,
)
from blip2_dist.meteor import MeteorError, get_meteor

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPICE_KEY = "SPICE"

_SPICE_LIB = os.path.join(os.path.dirname(os.path.abspath(_spice_models_mod.__file__)), "lib")
_SPICE_JARS = (f"{_spice_models_mod.JAR}.jar", f"{_spice_models_mod.JAR}-models.jar")


def spice_models_present(lib_dir: str | None = None) -> bool:
    """True when SPICE's Stanford CoreNLP jars are in pycocoevalcap's spice/lib (no download needed)."""
    lib_dir = lib_dir or _SPICE_LIB
    return all(os.path.isfile(os.path.join(lib_dir, name)) for name in _SPICE_JARS)


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
                parts.append(
                    f"{len(ids)} image(s) {what}: {', '.join(map(repr, shown))}" + (" ..." if len(ids) > 5 else "")
                )
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
        msg = (
            f"{len(blank_refs)} image(s) have an empty reference string (ROUGE-L then gives an empty "
            f"prediction 1.0, as the toolkit does): {blank_refs[:5]!r}"
        )
        warnings.warn(msg, stacklevel=3)
        info["warnings"].append(msg)
    tok_refs = tok_preds = None
    if java_available():
        try:
            tok_refs, tok_preds = ptb_tokenize_many([ref_caps, pred_caps])
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
    info: dict[str, Any] = {
        "tokenizer": None,
        "paper_comparable": None,
        "scorers": [],
        "unavailable": {},
        "warnings": [],
        "num_images": len(ids),
        "timings_s": {},
    }
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
            "where there is network)"
        )
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
