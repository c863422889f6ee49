"""The ``lorakit demo`` report: the summary table (terminal, markdown) and the HTML page with every image."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.eval.report import markdown_table
from lorakit.eval.stats import rate, wilson
from lorakit.fileio import save_image, write_json, write_text


def counts(row: dict) -> tuple[int, int, int, int]:
    """(images with the character, with the second concept, with both, images) by the oracle's 0.5 threshold."""
    found = [[p >= 0.5 for p in probs] for probs in row["probs"]]
    return (sum(f[0] for f in found), sum(f[1] for f in found), sum(all(f) for f in found), len(found))


def rate_cell(k: int, n: int) -> str:
    """``"0.88 [0.53, 0.98]"``: the rate and its Wilson 95% interval."""
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]" if n else "-"


def table_rows(report: dict) -> list[list[str]]:
    """The summary table as strings: header + one row per method (rates with Wilson 95% intervals)."""
    c, st = _names(report)
    head = ["method", "kind", f"{c} rate", f"{st} rate", "both rate", "s / image", "setup s"]
    def timing(r, key, fmt):
        return "-" if r["kind"] == "target" else format(r[key], fmt)

    body = []
    for r in report["rows"]:
        kc, ks, kb, n = counts(r)
        body.append([r["method"], r["kind"], rate_cell(kc, n), rate_cell(ks, n), rate_cell(kb, n),
                     timing(r, "s_per_image", ".2f"), timing(r, "setup_s", ".1f")])
    return [head] + body


def format_table(report: dict) -> str:
    """Plain-text table for the terminal."""
    rows = table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _lora_lines(report: dict) -> list[str]:
    return [f"{name}: {Path(v['path']).name} ({'cached' if v['cached'] else 'trained'}, {v['seconds']:.1f} s)"
            for name, v in report["loras"].items()]


def _seed_range(report: dict) -> str:
    seeds = report["rows"][0]["seeds"] if report["rows"] else []
    return "-" if not seeds else str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"


def to_markdown(report: dict) -> str:
    rows = table_rows(report)
    lines = ["# lorakit demo", "", f"Prompt: `{report['prompt']}`; {report['settings']['k']} images per method, "
             f"seeds {_seed_range(report)}; "
             f"{report['settings']['sample_steps']} DDIM steps, guidance {report['settings']['guidance']}; "
             f"oracle presence threshold 0.5; rates with Wilson 95% intervals.", "",
             markdown_table(rows[0], rows[1:]).rstrip("\n")]
    lines += ["", "LoRAs: " + "; ".join(_lora_lines(report)), "",
              f"Total {report['total_s']:.1f} s, {report['settings']['threads']} thread(s). "
              "setup s = time before the first image (cmlora: frequency profiles; gradient/weighted: fusing).", "",
              "## Images", ""]
    for r in report["rows"]:
        lines.append(f"**{r['method']}** ({r['description']}): "
                     + " ".join(f"[![]({big})]({p})" for p, big in zip(r["images"], r["images_large"])))
        lines.append("")
    return "\n".join(lines)


def to_html(report: dict) -> str:
    from html import escape

    rows = table_rows(report)
    th = "".join(f"<th>{escape(v)}</th>" for v in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in r) + "</tr>" for r in rows[1:])
    grid = "".join(
        f"<tr><th title=\"{escape(r['description'])}\">{escape(r['method'])}</th>"
        + "".join(f"<td><a href=\"{escape(p)}\"><img src=\"{escape(big)}\" alt=\"{escape(r['method'])} seed {sd}\" "
                  f"title=\"seed {sd}: {escape(report['concepts']['character']['name'])} {pr[0]:.2f}, "
                  f"{escape(report['concepts']['second']['name'])} {pr[1]:.2f}\"></a>"
                  f"<div class=\"v\">{escape(_verdict(pr, _names(report)))}</div></td>"
                  for p, big, sd, pr in zip(r["images"], r["images_large"], r["seeds"], r["probs"]))
        + "</tr>"
        for r in report["rows"])
    set_ = report["settings"]
    x, size = set_.get("enlarge", 4), set_.get("image_size", 32)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lorakit demo</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{background:#f3f3f3}}
.grid img{{width:{size * x}px;height:{size * x}px;image-rendering:pixelated}} .grid td{{padding:2px;text-align:center}}
.v{{font-size:11px;color:#555}}</style></head><body>
<h1>lorakit demo</h1>
<p>Prompt <code>{escape(report['prompt'])}</code>; {set_['k']} images per method (same seeds for every method);
{set_['sample_steps']} DDIM steps, guidance {set_['guidance']}. Rates: fraction of images where the oracle finds the
concept (probability &ge; 0.5), with its Wilson 95% interval over the {set_['k']} images; both rate: both
concepts in the same image.
setup s: time before the first image (cmlora: frequency profiles; gradient/weighted: fusing).</p>
<table><tr>{th}</tr>{body}</table>
<p>LoRAs: {escape('; '.join(_lora_lines(report)))}. Total {report['total_s']:.1f} s, {set_['threads']} thread(s).</p>
<h2>Images</h2><p>Shown {x}x enlarged (nearest neighbour; click for the {size}x{size} file). Under each image the
oracle's verdict on each concept (&#10003; = present, &#10007; = absent: probability &ge; 0.5 or not); hover for the
probabilities. The target rows are the renderer's ground truth for the same seeds: what the concepts should look
like. The oracle scores them too: the <code>target</code> row's rates are the most any method can reach by this
oracle (where it misses a concept in its own ground truth, a &#10007; under a generated image means little).</p>
<table class="grid">{grid}</table>
</body></html>
"""


PRESENT, ABSENT = "\u2713", "\u2717"  # check mark, ballot x


def _names(report: dict) -> tuple[str, str]:
    return report["concepts"]["character"]["name"], report["concepts"]["second"]["name"]


def _verdict(probs, names: tuple[str, str]) -> str:
    """The oracle's verdict under an image, e.g. ``"frog ✗ ink ✓"``."""
    return " ".join(f"{n} {PRESENT if p >= 0.5 else ABSENT}" for n, p in zip(names, probs))


GRID_COLOURS = {True: (40, 160, 60), False: (200, 50, 50)}  # verdict marks: found / not found


def grid_image(report: dict, out: Path, scale: int = 2, columns: int | None = None):
    """One picture of the report: a row per report row (its name on the left), its images ``scale``x larger
    (nearest neighbour) and under each two marks, the character then the second concept (green = the oracle finds it, red = not);
    a 64-colour palette image, small enough for docs. ``columns`` limits the images per row."""
    from PIL import Image

    rows = report["rows"]
    k = min(len(rows[0]["images"]), columns or len(rows[0]["images"]))
    grid_rows = []
    for r in rows:
        images = []
        for rel in r["images"][:k]:
            with Image.open(out / rel) as im:
                images.append(im.convert("RGB"))
        grid_rows.append((r["method"], images, [[p >= 0.5 for p in probs[:2]] for probs in r["probs"][:k]]))
    return image_grid(grid_rows, report["settings"].get("image_size", 32) * scale)


def image_grid(rows, size: int, label_w: int = 104):
    """Rows of images, each ``(label, images, marks)``: the label on the left, the images resized to ``size``
    (nearest neighbour) side by side, and under each image one mark per entry of its ``marks`` list (green = True,
    red = False; ``marks`` None: no marks); a 64-colour palette image."""
    from PIL import Image, ImageDraw

    mark_h, pad = 6, 2
    cell_w, cell_h = size + pad, size + mark_h + 2 * pad
    k = max(len(images) for _, images, _ in rows)
    canvas = Image.new("RGB", (label_w + k * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, images, marks) in enumerate(rows):
        y = i * cell_h
        lines = _wrap(draw, label, label_w - 8)
        draw.multiline_text((4, y + size // 2 - 6 * len(lines)), "\n".join(lines), fill="black", spacing=2)
        for j, im in enumerate(images):
            x = label_w + j * cell_w
            canvas.paste(im.resize((size, size), Image.NEAREST), (x, y + pad))
            found = marks[j] if marks else []
            for m, ok in enumerate(found):
                w, top = size // len(found), y + pad + size + 2
                draw.rectangle([x + m * w + 1, top, x + (m + 1) * w - 2, top + mark_h - 1], fill=GRID_COLOURS[ok])
    return canvas.quantize(colors=64)


def _wrap(draw, label: str, width: int) -> list[str]:
    """``label`` in lines no wider than ``width`` pixels, broken after a ``-`` (a long row id such as
    ``delta-masked-classes-ubase``); a part wider than ``width`` stays whole."""
    parts = [p + "-" for p in label.split("-")[:-1]] + [label.split("-")[-1]]
    lines = [""]
    for part in parts:
        if lines[-1] and draw.textlength(lines[-1] + part) > width:
            lines.append("")
        lines[-1] += part
    return lines


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``grid.png`` (:func:`grid_image`) into ``out``
    (atomically)."""

    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html",
             "grid": out / "grid.png"}
    write_json(report, paths["json"])
    write_text(to_markdown(report), paths["md"])
    write_text(to_html(report), paths["html"])
    if report["rows"] and report["rows"][0]["images"]:
        save_image(grid_image(report, out), paths["grid"])
    return paths


def row_intervals(probs) -> dict:
    """``{"character", "second", "both"}``: each rate as :func:`lorakit.eval.stats.rate` (k, n, Wilson 95%)."""
    found = (probs >= 0.5).tolist()
    n = len(found)
    return {"character": rate(sum(f[0] for f in found), n), "second": rate(sum(f[1] for f in found), n),
            "both": rate(sum(all(f[:2]) for f in found), n)}


def remove_stale_images(out: Path, keep: set[str]) -> list[Path]:
    """Delete the image files the previous run listed in ``out/report.json`` that are not in ``keep`` (paths
    relative to ``out``). Only files inside ``out/images`` that an earlier demo report names are touched.

    Returns:
        The removed paths.
    """
    try:
        old = json.loads((out / "report.json").read_text())
        listed = {p for r in old.get("rows", []) for p in r.get("images", []) + r.get("images_large", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    images = (out / "images").resolve()
    removed = []
    for rel in sorted(listed - keep):
        path = (out / rel).resolve()
        if images in path.parents and path.suffix == ".png" and path.is_file():
            path.unlink()
            removed.append(path)
    return removed
