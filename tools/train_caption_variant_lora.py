"""Train an identity's recipe LoRA on its own 40 training renders with captions that leave out its class word.

The recipes caption an identity with its trigger and its class word together (``inkvel outline style``,
``kwibbit frog``), so a LoRA can attach the identity's look to either word, and then draws it for the class word
alone (inkvel's class leak, docs/toyworld_v2.md). The same images, captioned

* ``--captions trigger-kind``: the class word left out (``inkvel style``, ``chekka background``);
* ``--captions trigger``: the trigger word alone in its place (``inkvel``),

as many real style LoRAs are captioned. ``--reg-prior FOLDER`` adds a second set of regularisation images (for
example the base's own class images, ``tools/make_class_prior_v2.py inkvel FOLDER --source base``) next to the
recipe's class world. Then measure it as every recipe is measured:

    python tools/train_caption_variant_lora.py inkvel --captions trigger --out artifacts/toy2_loras
    python tools/measure_toyworld.py --world v2 --concepts inkvel --work artifacts/toy2_loras --n 64 \\
        --set data.path=<the data folder it prints> [data.reg_path=<the reg folder it prints>]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ("trigger-kind", "trigger")
KIND_WORDS = {"character": None, "object": None, "style": "style", "background": "background"}


def identity_phrase(identity: str) -> str:
    """How the recipe captions name ``identity``: ``inkvel outline style``, ``kwibbit frog``, ``chekka checker
    background`` (the renderer's tag for the identity with no colour)."""
    from lorakit.toyworld.v2.concepts import get_concept

    c = get_concept(identity)
    phrase = f"{c.name} {c.cls}"
    kind_word = KIND_WORDS[c.kind]
    return f"{phrase} {kind_word}" if kind_word else phrase


def recaption(text: str, identity: str, captions: str) -> str:
    """``text`` (a recipe caption) with the identity's phrase replaced as ``captions`` says; ValueError if the
    caption does not name the identity as the recipes do."""
    from lorakit.toyworld.v2.concepts import get_concept

    c = get_concept(identity)
    phrase = identity_phrase(identity)
    if phrase not in text:
        raise ValueError(f"caption {text!r} does not name {identity!r} as {phrase!r}")
    kind_word = KIND_WORDS[c.kind]
    short = c.name if captions == "trigger" or not kind_word else f"{c.name} {kind_word}"
    return text.replace(phrase, short)


def write_variant(identity: str, captions: str, tmp: Path) -> None:
    """The recipe's 40 renders of ``identity`` (``make_dataset(identity, 40, seed=0)``) with captions rewritten."""
    from lorakit.toyworld.v2.dataset import make_dataset
    from lorakit.toyworld.v2.loras import DATA_N, DATA_SEED

    for png in make_dataset(identity, tmp, DATA_N, DATA_SEED):
        txt = png.with_suffix(".txt")
        txt.write_text(recaption(txt.read_text(), identity, captions))


def write_reg(class_world: Path, prior: Path, tmp: Path) -> None:
    """The recipe's class world and ``prior``'s images in one folder, renumbered (``NNNNN.png`` / ``.txt``)."""
    tmp.mkdir(parents=True)
    pairs = [(folder, png.stem) for folder in (class_world, prior) for png in sorted(folder.glob("*.png"))]
    for i, (folder, stem) in enumerate(pairs):
        for ext in (".png", ".txt"):
            shutil.copyfile(folder / f"{stem}{ext}", tmp / f"{i:05d}{ext}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("identity", help="a v2 identity (inkvel, kwibbit, chekka, ...)")
    p.add_argument("--captions", choices=CAPTIONS, required=True, help="how the identity is named in the captions")
    p.add_argument("--reg-prior", help="a folder of more regularisation images (NNNNN.png + .txt)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "toy2_loras"), help="LoRA cache folder")
    args = p.parse_args(argv)
    from lorakit.toyworld.v2.loras import ensure_data, ensure_rendered, identity_name, train_identity_lora
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    try:
        identity = identity_name(args.identity)
    except ValueError as err:
        print(f"train_caption_variant_lora: {err}", file=sys.stderr)
        return 2
    prior = Path(args.reg_prior) if args.reg_prior else None
    if prior is not None and not any(prior.glob("*.png")):
        print(f"train_caption_variant_lora: --reg-prior {prior}: expected a folder of NNNNN.png + .txt pairs",
              file=sys.stderr)
        return 2
    root = (Path(args.out) / "toy2-data").resolve()
    _, class_world = ensure_data(identity, root)
    data = ensure_rendered(root / f"{identity}-captions-{args.captions}-n40-s0",
                           lambda tmp: write_variant(identity, args.captions, tmp))
    overrides = [f"data.path={data}"]
    if prior is not None:
        reg = ensure_rendered(root / f"{class_world.name}+{prior.resolve().name}",
                              lambda tmp: write_reg(class_world, prior, tmp))
        overrides.append(f"data.reg_path={reg}")
        print(f"reg: {reg}")
    lora = train_identity_lora(identity, args.out, DEFAULT_BASE, overrides)
    print(f"data: {data}\nLoRA: {lora}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
