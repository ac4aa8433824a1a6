"""COCO caption metrics against the real toolkit (pycocoevalcap) and real Java.

The JVM-heavy pieces are shared: one METEOR JVM for this module's process (the library's shared
instance, warmed by a module fixture) and one for the direct-toolkit reference, started side by side.
Run: OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_metrics.py
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from blip2_dist import caption_tokens, meteor
from blip2_dist.caption_tokens import normalize_caption, python_tokenize
from blip2_dist.meteor import MeteorError, MeteorScorer
from blip2_dist.metrics import METRIC_KEYS, score_captions, score_captions_detailed, spice_models_present

pytestmark = pytest.mark.skipif(not caption_tokens.java_available(), reason="needs `java` (openjdk) on PATH")

REFS = {
    "1000268201": [
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A girl going into a wooden building .",
        "A little girl climbing into a wooden playhouse .",
        "A little girl climbing the stairs to her playhouse .",
        "A little girl in a pink dress going into a wooden cabin .",
    ],
    "1001773457": [
        "A black dog and a spotted dog are fighting",
        "A black dog and a tri-colored dog playing with each other on the road .",
        "A black dog and a white dog with brown spots are staring at each other in the street .",
        "Two dogs of different breeds looking at each other on the road .",
        "Two dogs on pavement moving toward each other .",
    ],
    "1002674143": [
        "A little girl covered in paint sits in front of a painted rainbow with her hands in a bowl .",
        "A little girl is sitting in front of a large painted rainbow .",
        "A small girl in the grass plays with fingerpaints in front of a white canvas with a rainbow on it .",
        "There is a girl with pigtails sitting in front of a rainbow painting .",
        "Young girl with pigtails painting outside in the grass .",
    ],
    "1003163366": [
        "A man lays on a bench while his dog sits by him .",
        "A man lays on the bench to which a white dog is also tied .",
        "a man sleeping on a bench outside with a white and black dog sitting next to him .",
        "A shirtless man lies on a park bench with his dog .",
        "man laying on bench holding leash of dog sitting on ground",
    ],
    "1007129816": [
        "A man in an orange hat starring at something .",
        "A man wears an orange hat and glasses .",
        "A man with gauges and glasses is wearing a Blitz hat .",
        "A man with glasses is wearing a beer can crocheted hat .",
        "The man with pierced ears is wearing glasses and an orange hat .",
    ],
    "1007320043": [
        "A child playing on a rope net .",
        "A little girl climbing on red roping .",
        "A little girl in pink climbs a rope bridge at the park .",
        "A small child grips onto the red ropes at the playground .",
        "The small child climbs on a red ropes on a playground .",
    ],
    "1009434119": [
        "A black and white dog is running in a grassy garden surrounded by a white fence .",
        "A black and white dog is running through the grass .",
        "A Boston terrier is running in the grass .",
        "A Boston Terrier is running on lush green grass in front of a white fence .",
        "A dog runs on the green grass near a wooden fence .",
    ],
}
PREDS = {
    "1000268201": "a little girl in a pink dress climbs the stairs of a wooden house.",
    "1001773457": "Two dogs (one black, one spotted) play on the road!",
    "1002674143": "A young girl paints a rainbow; she's sitting on the grass.",
    "1003163366": "a man sleeping on a bench with his dog",
    "1007129816": "A man wearing glasses and an orange hat -- smiling...",
    "1007320043": "a child climbs a red rope net at the playground",
    "1009434119": "A black-and-white dog runs through the grass near a fence.",
}
SPACE_BREAKERS = ["\r", "\n", "\r\n", "\t", "\x0b", "\x0c", "\x85", "\u2028", "\u2029", "\x1c", "\xa0"]


def toolkit_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """COCOEvalCap's tokenisation step, verbatim: PTBTokenizer on {id: [{"caption": c}]}."""
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


@pytest.fixture(scope="module")
def direct_toolkit():
    """Score the standard COCOEvalCap way, independently of blip2_dist.metrics."""
    meteor.warm_up_meteor()  # the library's JVM loads while the toolkit's own one does
    toolkit_meteor = Meteor()

    def score(preds: dict[str, str], refs: dict[str, list[str]]):
        gts = toolkit_tokenize(refs)
        res = toolkit_tokenize({k: [v] for k, v in preds.items()})
        out, per = {}, {}
        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
        out.update(zip(METRIC_KEYS[:4], bleu))
        per.update(zip(METRIC_KEYS[:4], bleu_per))
        for name, scorer in (("METEOR", toolkit_meteor), ("ROUGE-L", Rouge()), ("CIDEr", Cider())):
            out[name], per[name] = scorer.compute_score(gts, res)
        return out, {k: {m: per[m][i] for m in per} for i, k in enumerate(gts)}

    yield score
    toolkit_meteor.meteor_p.kill()  # not Meteor.__del__: it can hang on its lock


def ordered(d: dict) -> dict:
    return {k: d[k] for k in sorted(d)}


def test_scores_equal_the_toolkit_called_directly(direct_toolkit):
    scores, info = score_captions_detailed(PREDS, REFS)
    expected, expected_per = direct_toolkit(ordered(PREDS), ordered(REFS))
    assert list(scores) == list(METRIC_KEYS)  # no SPICE here: its CoreNLP jars are not installed
    assert scores == {k: float(v) for k, v in expected.items()}
    assert info["tokenizer"] == "ptb" and info["paper_comparable"] is True
    assert info["scorers"] == ["BLEU", "METEOR", "ROUGE-L", "CIDEr"]
    assert "CoreNLP" in info["unavailable"]["SPICE"]
    assert info["per_image"] == {k: {m: float(v) for m, v in expected_per[k].items()} for k in sorted(PREDS)}
    assert 0 < scores["BLEU-4"] < scores["BLEU-1"] < 1 and scores["CIDEr"] > 0.5


def test_result_does_not_depend_on_input_order():
    rev_preds = {k: PREDS[k] for k in reversed(list(PREDS))}
    rev_refs = {k: REFS[k] for k in reversed(list(REFS))}
    assert score_captions(rev_preds, rev_refs) == score_captions_detailed(PREDS, REFS)[0]


def test_line_breaking_characters_are_sanitised(direct_toolkit):
    dirty = {
        k: v.replace(" ", SPACE_BREAKERS[i % len(SPACE_BREAKERS)], 2) + "\r" for i, (k, v) in enumerate(PREDS.items())
    }
    dirty["1001773457"] = "\u2028Two dogs\x0c(one black,\tone\r\nspotted) [play]\x85on the road! \u2029"
    dirty_refs = {k: [r.replace(" a ", " a\r") for r in v] for k, v in REFS.items()}
    clean = {k: normalize_caption(v) for k, v in dirty.items()}
    clean_refs = {k: [normalize_caption(r) for r in v] for k, v in dirty_refs.items()}
    scores, info = score_captions_detailed(dirty, dirty_refs)
    expected, expected_per = direct_toolkit(ordered(clean), ordered(clean_refs))
    assert scores == {k: float(v) for k, v in expected.items()}
    assert info["per_image"]["1009434119"]["CIDEr"] == float(expected_per["1009434119"]["CIDEr"])
    # without sanitising, the toolkit's tokenizer moves captions onto the wrong images, silently
    raw = toolkit_tokenize({"a": ["one\rtwo"], "b": ["three\u2028four"], "c": ["five"], "d": ["six"]})
    assert raw == {"a": ["one"], "b": ["two"], "c": ["three"], "d": ["four"]}  # "five", "six" lost


def test_normalize_caption_removes_every_java_line_break():
    # Java's PTB lexer breaks lines at \n \r \x0b \x0c \u2028 \u2029 (swept over all code points)
    for ch in SPACE_BREAKERS + [" \t\r\n "]:
        assert normalize_caption(f"  a{ch}dog{ch}{ch}runs {ch}") == "a dog runs"
    assert normalize_caption("") == "" and normalize_caption(" \n\t ") == ""
    assert normalize_caption("a (red) [dog], isn't it?") == "a (red) [dog], isn't it?"
    assert normalize_caption("bad \udc80 surrogate") == "bad ? surrogate"
    # every char Python calls whitespace, through the real tokenizer: one line per caption
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    assert caption_tokens.ptb_tokenize([normalize_caption(f"a{c}Dog.") for c in spaces]) == ["a dog"] * len(spaces)
    with pytest.raises(RuntimeError, match="returned 9 lines for 7 captions"):  # the check the toolkit lacks
        caption_tokens.ptb_tokenize(["a", "b\rc", "d", "e\u2028f", "g", "h", "i"])
    with pytest.raises(TypeError):
        normalize_caption(None)  # type: ignore[arg-type]


def test_empty_prediction_is_scored_not_dropped(direct_toolkit):
    preds = dict(PREDS, **{"1003163366": "", "1007129816": " \n\t "})
    scores, info = score_captions_detailed(preds, REFS)
    expected, expected_per = direct_toolkit(ordered({k: normalize_caption(v) for k, v in preds.items()}), ordered(REFS))
    assert scores == {k: float(v) for k, v in expected.items()}
    assert info["num_images"] == 7 and len(info["per_image"]) == 7
    for k in ("1003163366", "1007129816"):
        assert all(info["per_image"][k][m] == 0.0 for m in METRIC_KEYS), info["per_image"][k]
    all_empty = score_captions({k: "" for k in PREDS}, REFS)
    assert set(all_empty) == set(METRIC_KEYS) and all(v == 0.0 for v in all_empty.values())


def test_blank_reference_is_kept_with_a_warning():
    with pytest.warns(UserWarning, match=r"empty reference string .*\['b'\]"):
        scores, info = score_captions_detailed(
            {"a": "a dog", "b": ""}, {"a": ["a dog"], "b": ["\n", "two cats"]}, meteor=False
        )
    assert info["per_image"]["b"]["ROUGE-L"] == 1.0  # the toolkit's own quirk: "" vs "" is a match
    assert len(info["warnings"]) == 1 and scores["BLEU-1"] > 0


def test_key_and_type_errors_name_the_images():
    refs = {f"img{i}": ["a dog"] for i in range(10)}
    preds = {f"img{i}": "a dog" for i in range(3, 12)}
    with pytest.raises(ValueError) as e:
        score_captions(preds, refs)
    msg = str(e.value)
    assert "3 image(s) without a prediction: 'img0', 'img1', 'img2'" in msg
    assert "2 image(s) without references: 'img10', 'img11'" in msg
    many = {f"x{i:03d}": "a dog" for i in range(100)}
    with pytest.raises(ValueError, match=r"100 image\(s\) without references: 'x000', .* \.\.\."):
        score_captions(dict(many, img0="a"), {"img0": ["a"]})
    with pytest.raises(ValueError, match="'img1' has an empty reference list"):
        score_captions({"img0": "a", "img1": "b"}, {"img0": ["a"], "img1": []})
    with pytest.raises(TypeError, match="'img0'"):
        score_captions({"img0": None}, {"img0": ["a"]})
    with pytest.raises(TypeError, match="list of str"):
        score_captions({"img0": "a"}, {"img0": "a dog"})
    with pytest.raises(TypeError, match="'img0'"):
        score_captions({"img0": "a"}, {"img0": ["a", 3]})
    with pytest.raises(ValueError, match="nothing to score"):
        score_captions({}, {})


def test_java_missing_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    assert not caption_tokens.java_available()
    scores, info = score_captions_detailed(PREDS, REFS)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert "java" in info["unavailable"]["METEOR"]
    assert info["tokenizer"] == "python-fallback" and info["paper_comparable"] is False
    # the same toolkit scorers, on the fallback's tokens
    gts = {k: [python_tokenize(r) for r in REFS[k]] for k in sorted(REFS)}
    res = {k: [python_tokenize(PREDS[k])] for k in sorted(PREDS)}
    assert scores["CIDEr"] == float(Cider().compute_score(gts, res)[0])
    assert scores["BLEU-4"] == Bleu(4).compute_score(gts, res, verbose=0)[0][3]


def test_fallback_tokenizer_matches_ptb_on_everyday_captions():
    caps = (
        [c for v in REFS.values() for c in v]
        + list(PREDS.values())
        + [
            "The dog's owner isn't watching; he's on his phone.",
            '"Look!" says the boy, pointing up.',
            "Mr. Smith walks his dog in Washington D.C.",
            "A skier jumps over a 10,000 ft. drop at 5:30?",
            "They're gonna cross the street, aren't they?",
            "He can't reach it; he cannot find a ladder.",
            "ROCK 'n' ROLL band [live] {encore}",
            "Someone's cat: sleeping on a keyboard & a mouse",
            "Two people in '90s clothes, holding a $5 bill and a 50% off sign.",
            "Dogs' toys... everywhere",
            "a 'single quoted' phrase",
            "The car is red.The house is blue.",
            "What a day!!!",
            "e-mail the U.S. office",
            "",
        ]
    )
    assert [python_tokenize(c) for c in caps] == caption_tokens.ptb_tokenize([normalize_caption(c) for c in caps])


def test_spice_detection(tmp_path, monkeypatch):
    assert not spice_models_present(str(tmp_path))
    for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / name).write_bytes(b"")
    assert spice_models_present(str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no java: keeps this test JVM-free
    _, info = score_captions_detailed({"a": "a dog"}, {"a": ["a dog"]}, meteor=False, spice=False)
    assert info["unavailable"] == {"METEOR": "disabled by the caller", "SPICE": "disabled by the caller"}


def _child_scores(queue):
    try:
        scorer = meteor.get_meteor()
        scores = score_captions(PREDS, REFS)
        queue.put((scores, scorer.pid, scorer.starts, os.getpid()))
    except BaseException as e:  # noqa: BLE001
        queue.put(repr(e))


def test_meteor_in_forked_child_gets_its_own_jvm():
    gts = toolkit_tokenize(ordered(REFS))
    res = toolkit_tokenize({k: [v] for k, v in ordered(PREDS).items()})
    shared = meteor.get_meteor()
    parent_meteor = shared.compute_score(gts, res)  # the parent's JVM is up and used
    parent_jvm, parent_starts = shared.pid, shared.starts
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_scores, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join(30)
    assert not isinstance(got, str), got
    child_scores, child_jvm, child_starts, child_pid = got
    assert child_scores["METEOR"] == parent_meteor[0]
    assert child_jvm != parent_jvm and child_starts == 1 and child_pid != os.getpid()
    assert shared.pid == parent_jvm and shared._meteor.meteor_p.poll() is None  # parent's JVM untouched
    _wait_gone(child_jvm)  # the child's JVM went with the child
    assert shared.compute_score(gts, res) == parent_meteor  # and the parent's still answers
    assert shared.starts == parent_starts


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if os.path.exists(f"/proc/{pid}/stat") and open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            return  # a zombie: dead, waiting to be reaped
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still alive")


FAKE_METEOR = textwrap.dedent("""
    # A stand-in for the METEOR jar, speaking its stdio protocol; modes exercise the failure paths.
    import os, sys, time
    mode, counter = sys.argv[1], sys.argv[2]
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    if mode == "hang":
        time.sleep(600)
    if mode == "crash-first" and n == 0:
        sys.exit(3)
    if mode == "garbage":
        print("not a number", flush=True)
    for line in sys.stdin:
        if line.startswith("SCORE"):
            print("1.0 2.0 0.0", flush=True)
        elif line.startswith("EVAL"):
            print("\\n".join(["0.25"] * (line.count("|||") + 1)), flush=True)
""")


def _fake_cmd(tmp_path, mode):
    script = tmp_path / "fake_meteor.py"
    script.write_text(FAKE_METEOR)
    return [sys.executable, str(script), mode, str(tmp_path / f"{mode}.count")]


def test_meteor_timeout_kills_and_retries_once(tmp_path):
    scorer = MeteorScorer(timeout=1.0, cmd=_fake_cmd(tmp_path, "hang"))
    gts, res = {"a": ["a dog"], "b": ["a cat"]}, {"a": ["a dog"], "b": ["a cat"]}
    t = time.monotonic()
    with pytest.raises(MeteorError, match="timed out after 1 s.*then.*timed out"):
        scorer.compute_score(gts, res)
    assert time.monotonic() - t < 15
    assert scorer.starts == 2 and (tmp_path / "hang.count").read_text() == "2"
    assert scorer.pid is None  # killed, nothing left running


def test_meteor_crash_is_retried_on_a_fresh_process(tmp_path):
    scorer = MeteorScorer(timeout=30, cmd=_fake_cmd(tmp_path, "crash-first"))
    score, per = scorer.compute_score({"a": ["a dog"], "b": ["a cat"]}, {"a": ["a dog"], "b": ["a cat"]})
    assert (score, per) == (0.25, [0.25, 0.25]) and scorer.starts == 2
    pid = scorer.pid
    scorer.close()
    _wait_gone(pid)


def test_meteor_dead_process_is_replaced_before_the_next_call(tmp_path):
    scorer = MeteorScorer(timeout=30, cmd=_fake_cmd(tmp_path, "ok"))
    gts = {"a": ["a dog"]}
    assert scorer.compute_score(gts, gts) == (0.25, [0.25])
    first = scorer.pid
    os.kill(first, 9)
    _wait_gone(first)
    assert scorer.compute_score(gts, gts) == (0.25, [0.25])
    assert scorer.starts == 2 and scorer.pid != first
    bad = MeteorScorer(timeout=30, cmd=_fake_cmd(tmp_path, "garbage"))
    with pytest.raises(MeteorError, match="ValueError.*then.*ValueError"):
        bad.compute_score(gts, gts)
    scorer.close()


def test_meteor_failure_is_reported_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr(meteor, "_SHARED", MeteorScorer(timeout=0.5, retries=0, cmd=_fake_cmd(tmp_path, "hang")))
    with pytest.warns(UserWarning, match="METEOR failed"):
        scores, info = score_captions_detailed(PREDS, REFS)
    assert "METEOR" not in scores and "timed out" in info["unavailable"]["METEOR"]
    assert math.isfinite(scores["CIDEr"]) and info["tokenizer"] == "ptb"


def test_exit_does_not_hang_after_a_failed_call(tmp_path):
    """The toolkit's Meteor.__del__ waits on a lock a failed call left held; ours must not."""
    code = textwrap.dedent(f"""
        from blip2_dist.meteor import MeteorScorer, MeteorError
        s = MeteorScorer(timeout=0.5, retries=0, cmd={_fake_cmd(tmp_path, "hang")!r})
        try:
            s.compute_score({{"a": ["x"]}}, {{"a": ["x"]}})
        except MeteorError:
            pass
        s.start()  # a fresh (hanging) process, left for the exit hook to kill
        print(s.pid, flush=True)
    """)
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t < 30
    _wait_gone(int(out.stdout.split()[-1]))
