"""Where captions are judged: image cards for TensorBoard, an HTML page per evaluation, and one page per
run that puts every evaluation's captions side by side (before training, each step, standalone ones).

    card = caption_card(chw_uint8, generated="a red circle", references=[...], title="val · step 500")
    write_eval_page(out_dir, items, header)   # OUT/eval/STEP/gallery.html + gallery/NNN.jpg
    write_run_page(run_dir)                   # RUN/gallery.html from every RUN/*/results.json and
                                              # RUN/eval/*/results.json (an evaluation written inside
                                              # the run folder joins its comparison)

TensorBoard shows images and text in different places, so a card carries both: the image with its
generated caption and its references drawn under it, labelled. An image's cards of several runs (the
untrained model, the training run) share a tag, so TensorBoard shows them next to each other, and the
step slider walks through training.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CARD_WIDTH = 320
PAGE = "gallery.html"
IMAGES = "gallery"
RESULTS = "results.json"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (FreeType builds of Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def caption_card(
    chw: np.ndarray, generated: str, references: list[str], title: str = "", score: str = ""
) -> np.ndarray:
    """The image (scaled to CARD_WIDTH) above its labelled captions: a CHW uint8 array for TensorBoard."""
    image = Image.fromarray(np.transpose(chw, (1, 2, 0)))
    scale = CARD_WIDTH / image.width
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC  # keep tiny pixels crisp
    image = image.resize((CARD_WIDTH, max(1, round(image.height * scale))), resample)
    font, small = _font(14), _font(12)
    blocks: list[tuple[str, Any, tuple[int, int, int]]] = []
    if title:
        blocks.append((title, small, (90, 90, 90)))
    blocks.append((f"generated{f' ({score})' if score else ''}: {generated or '(empty)'}", font, (0, 0, 0)))
    blocks += [(f"reference {i}: {r}", small, (60, 60, 140)) for i, r in enumerate(references, 1)]
    lines = [(line, f, colour) for text, f, colour in blocks for line in _wrap(text, f, CARD_WIDTH - 12)]
    line_height = 18
    canvas = Image.new("RGB", (CARD_WIDTH, image.height + 8 + line_height * len(lines)), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = image.height + 4
    for line, f, colour in lines:
        draw.text((6, y), line, fill=colour, font=f)
        y += line_height
    return np.transpose(np.asarray(canvas), (2, 0, 1)).copy()


def gallery_markdown(rows: list[dict], header: dict) -> str:
    """One TensorBoard text entry per evaluation: what was evaluated, then a table of every gallery image."""
    meta = " · ".join(f"**{k}** {v}" for k, v in header.items() if v not in (None, ""))
    table = ["| image | generated | CIDEr | references |", "|---|---|---|---|"]
    for row in rows:
        refs = " / ".join(_md(r) for r in row["references"])
        generated = f"**{_md(row['generated'])}**" if row["generated"].strip() else "*(empty)*"
        table.append(f"| {_md(row['image_id'])} | {generated} | {row.get('CIDEr', '')} | {refs} |")
    return meta + "\n\n" + "\n".join(table)


def _md(text: str) -> str:
    return html.escape(str(text)).replace("|", "\\|")


def save_gallery_images(out_dir: Path, gallery: list[tuple[str, np.ndarray]]) -> list[dict]:
    """JPEGs under out_dir/gallery/ (numbered: image ids may hold any character); [{image_id, file}]."""
    folder = out_dir / IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for i, (image_id, chw) in enumerate(gallery):
        name = f"{IMAGES}/{i:03d}.jpg"
        Image.fromarray(np.transpose(chw, (1, 2, 0))).save(out_dir / name, format="JPEG", quality=92)
        saved.append({"image_id": image_id, "file": name})
    return saved


_STYLE = (
    "body{font-family:sans-serif;margin:16px} table.meta td{padding:2px 10px 2px 0;vertical-align:top}"
    " .c{display:inline-block;width:272px;vertical-align:top;margin:8px;font-size:14px}"
    " img{width:256px;image-rendering:pixelated} .lbl{color:#666;font-size:12px;text-transform:uppercase}"
    " .gen{font-weight:bold} ul{margin:2px 0;padding-left:18px;color:#335} table.cmp td,table.cmp th"
    "{border-top:1px solid #ddd;padding:6px;vertical-align:top;text-align:left;font-size:14px}"
)


def _meta_table(header: dict) -> str:
    rows = "".join(
        f"<tr><td><b>{html.escape(str(k))}</b></td><td>{html.escape(str(v))}</td></tr>"
        for k, v in header.items()
        if v not in (None, "")
    )
    return f"<table class='meta'>{rows}</table>"


def write_eval_page(out_dir: Path, items: list[dict], header: dict, run_page: str | None = None) -> Path:
    """out_dir/gallery.html: the header (what was evaluated, split, step, prompt, generation settings,
    metrics), then per image: the image, its generated caption and score, its references.
    items: [{image_id, file, generated, references, CIDEr (optional)}]. run_page: a relative link to the
    run's comparison page."""
    cards = []
    for it in items:
        score = f" <small>CIDEr {it['CIDEr']}</small>" if it.get("CIDEr") not in (None, "") else ""
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in it["references"])
        generated = html.escape(it["generated"] or "(empty)")
        cards.append(
            f"<div class='c'><img src='{html.escape(it['file'])}'><div><small>{html.escape(it['image_id'])}"
            f"</small></div><div class='lbl'>generated</div><div class='gen'>{generated}"
            f"{score}</div><div class='lbl'>references</div><ul>{refs}</ul></div>"
        )
    link = f"<p><a href='{html.escape(run_page)}'>all evaluations of this run, side by side</a></p>" if run_page else ""
    title = html.escape(str(header.get("evaluated", "evaluation")))
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
        f"<h2>{title}</h2>{link}{_meta_table(header)}{''.join(cards)}"
    )
    path = out_dir / PAGE
    path.write_text(page, encoding="utf-8")
    return path


def find_evaluations(run_dir: Path) -> list[tuple[Path, dict]]:
    """(folder, results) of every evaluation in the run folder: RUN/*/ and RUN/eval/*/; before training
    (step 0) first, then by step."""
    found = []
    for path in sorted(run_dir.glob(f"*/{RESULTS}")) + sorted(run_dir.glob(f"eval/*/{RESULTS}")):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # one being written or a stray file: not part of the page
            continue
        if "per_image" in results:
            found.append((path.parent, results))
    return sorted(found, key=lambda f: (f[1].get("step") or 0, str(f[0])))


def write_run_page(run_dir: str | os.PathLike) -> Path | None:
    """RUN/gallery.html: one table per split, a row per gallery image of the latest evaluation, a column per
    evaluation (its caption of that image). Returns None when the run has no evaluation yet."""
    run = Path(run_dir)
    evals = find_evaluations(run)
    if not evals:
        return None
    sections = []
    for split in sorted({r.get("split") for _, r in evals}, key=str):
        chosen = [(d, r) for d, r in evals if r.get("split") == split]
        sections.append(_split_table(run, split, chosen))
    page = (
        f"<!doctype html><meta charset='utf-8'><title>captions: {html.escape(run.name)}</title>"
        f"<style>{_STYLE}</style><h2>Captions across evaluations: {html.escape(str(run))}</h2>"
        "<p>Each column is one evaluation (its own page is linked in the header); each row one image of the "
        "latest evaluation's gallery, with its reference captions.</p>" + "".join(sections)
    )
    path = run / PAGE
    tmp = path.with_name(PAGE + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _split_table(run: Path, split: str, evals: list[tuple[Path, dict]]) -> str:
    latest_dir, latest = evals[-1]
    heads = []
    for folder, r in evals:
        metrics = r.get("metrics", {})
        summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("CIDEr", "BLEU-4", "loss") if k in metrics)
        link = os.path.relpath(folder / PAGE, run)
        heads.append(
            f"<th><a href='{html.escape(link)}'>{html.escape(r.get('label') or folder.name)}</a>"
            f"<br><small>step {r.get('step')} · {html.escape(summary)}</small></th>"
        )
    rows = []
    for item in latest.get("gallery", []):
        image_id = item["image_id"]
        src = os.path.relpath(latest_dir / item["file"], run)
        references = latest["per_image"].get(image_id, {}).get("references", [])
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in references)
        cells = [
            f"<td><img src='{html.escape(src)}'><br><small>{html.escape(image_id)}</small></td>",
            f"<td><div class='lbl'>references</div><ul>{refs}</ul></td>",
        ]
        for _, r in evals:
            entry = r["per_image"].get(image_id)
            caption = html.escape(entry["prediction"] or "(empty)") if entry else "—"
            cells.append(f"<td><div class='lbl'>generated</div><div class='gen'>{caption}</div></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<h3>split {html.escape(str(split))}</h3><table class='cmp'><tr><th>image</th><th></th>"
        + "".join(heads)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
