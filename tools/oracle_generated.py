"""The oracle on generated images, against a person's labels: precision and recall of one concept.

1. ``make``: generate a fixed, seeded set of images that may show the concept (its LoRA alone, and merged with a
   style LoRA, at scale 0.8 on the demo's prompt and on training-caption prompts), write them 4x enlarged with
   their index into ``OUT/sheet.png`` (to label by eye) and the list into ``OUT/images.json``;
2. a person writes the labels (a JSON list of 0/1 in index order, 1 = "I would call this a frog") into a file;
3. ``score``: the oracle's verdicts on the same images (``--oracle`` folders, several to compare) against the
   labels: precision (of the images the oracle calls positive, how many the person does), recall, with n and
   95% Wilson intervals, at ``--thresholds``.

    python tools/oracle_generated.py make --concept frog --style ink --n 48 --out /tmp/og
    python tools/oracle_generated.py score --out /tmp/og --labels data/oracle/generated_frog_labels.json \\
        --oracle data/oracle /tmp/oracle_hn
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="generate the images and the labelling sheet")
    m.add_argument("--concept", default="frog")
    m.add_argument("--style", default="ink")
    m.add_argument("--n", type=int, default=48, help="images per source (LoRA alone, merged with the style)")
    m.add_argument("--scale", type=float, default=0.8)
    m.add_argument("--adapters-dir", default=str(ROOT / "artifacts" / "adapters"))
    m.add_argument("--out", required=True)
    s = sub.add_parser("score", help="precision / recall of oracles against the labels")
    s.add_argument("--out", required=True, help="the folder 'make' wrote")
    s.add_argument("--labels", required=True, help="JSON list of 0/1, one per image in images.json order")
    s.add_argument("--oracle", nargs="+", default=[str(ROOT / "data" / "oracle")])
    s.add_argument("--thresholds", nargs="+", type=float, default=[0.5])
    s.add_argument("--half", choices=("all", "even", "odd"), default="all",
                   help="score only the even or odd indices (train_oracle.py --generated trains on the even ones)")
    return p.parse_args(argv)


def make(args) -> int:
    import torch
    from PIL import Image, ImageDraw

    from lorakit.sampling import SamplerSettings, generate, load_adapters, load_pipeline
    from lorakit.toyworld.concepts import get_concept
    from lorakit.toyworld.demo_v1 import demo_prompt
    from lorakit.toyworld.evaluate import GUIDANCE, NUM_STEPS, concept_prompts
    from lorakit.toyworld.loras import train_concept_lora

    torch.set_num_threads(1)
    c, st = get_concept(args.concept), get_concept(args.style)
    files = [train_concept_lora(c.name, args.adapters_dir), train_concept_lora(st.name, args.adapters_dir)]
    pipe = load_pipeline(str(ROOT / "data" / "toy-base"), "fp32")
    ads = load_adapters(pipe, files)
    from dataclasses import replace

    ads = [replace(a, weight=args.scale) for a in ads]
    settings = SamplerSettings(method="merge", steps=NUM_STEPS, cfg=GUIDANCE)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, images = [], []
    captions = concept_prompts(c.name, args.n, seed=321)
    for source, adapters, prompts in (("lora_alone", ads[:1], captions),
                                      ("merged_with_style", ads, [demo_prompt(c.name, st.name)] * args.n)):
        for i, prompt in enumerate(prompts):
            seed = 2000 + i
            img = generate(pipe, adapters, settings, prompt, "", [seed])[0][0]
            rel = f"images/{len(records):03d}.png"
            img.save(out / rel)
            images.append(img)
            records.append({"index": len(records), "source": source, "prompt": prompt, "seed": seed, "file": rel,
                            "adapters": [Path(f).name for f in files[: len(adapters)]], "scale": args.scale})
    cols, cell = 12, 100
    sheet = Image.new("RGB", (cols * cell, ((len(images) + cols - 1) // cols) * cell), "white")
    d = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * cell
        sheet.paste(img.resize((96, 96), Image.NEAREST), (x, y))
        d.text((x + 2, y + 84), str(i), fill=(255, 0, 255))
    sheet.save(out / "sheet.png")
    (out / "images.json").write_text(json.dumps({"concept": c.name, "style": st.name, "images": records}, indent=1))
    print(f"wrote {len(records)} images, {out / 'sheet.png'}, {out / 'images.json'}")
    return 0


def score_cmd(args) -> int:
    from PIL import Image

    from lorakit.toyworld.oracle import Oracle
    from lorakit.eval.stats import rate

    out = Path(args.out)
    meta = json.loads((out / "images.json").read_text())
    labels = json.loads(Path(args.labels).read_text())
    labels = labels["labels"] if isinstance(labels, dict) else labels
    if len(labels) != len(meta["images"]):
        print(f"oracle_generated: {args.labels} has {len(labels)} labels for {len(meta['images'])} images",
              file=sys.stderr)
        return 2
    images = [Image.open(out / r["file"]).convert("RGB") for r in meta["images"]]
    truth = [bool(v) for v in labels]
    for folder in args.oracle:
        o = Oracle.load(folder)
        p = o.probabilities(images)[:, o.concepts.index(meta["concept"])].tolist()
        for t in args.thresholds:
            pos = [v >= t for v in p]
            tp = sum(a and b for a, b in zip(pos, truth))
            for source in (None, *dict.fromkeys(r["source"] for r in meta["images"])):
                idx = [i for i, r in enumerate(meta["images"]) if (source is None or r["source"] == source)
                       and (args.half == "all" or i % 2 == (args.half == "odd"))]
                tp = sum(pos[i] and truth[i] for i in idx)
                print(json.dumps({"oracle": folder, "concept": meta["concept"], "threshold": t, "half": args.half,
                                  "images": source or "all", "n": len(idx),
                                  "person_positive": sum(truth[i] for i in idx),
                                  "oracle_positive": sum(pos[i] for i in idx),
                                  "precision": rate(tp, sum(pos[i] for i in idx)),
                                  "recall": rate(tp, sum(truth[i] for i in idx)),
                                  "agreement": rate(sum(pos[i] == truth[i] for i in idx), len(idx))}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return make(args) if args.cmd == "make" else score_cmd(args)


if __name__ == "__main__":
    raise SystemExit(main())
