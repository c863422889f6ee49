"""``lorakit toyworld``: list the toy world's concepts, write a concept's training folder, render scenes."""

from __future__ import annotations


HELP = "toy-world concepts: list them, write a LoRA training folder for one, render a scene"
DESCRIPTION = (
    "The toy world: procedurally drawn 32x32 scenes with generic concepts (the bundled base "
    "model data/toy-base knows them) and held-out concepts with trigger words (only LoRAs learn them)."
)


def add_arguments(p) -> None:
    tsub = p.add_subparsers(dest="toy_command", metavar="ACTION")
    ls = tsub.add_parser("list", help="list every concept (name, kind, set, trigger word, look)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=run_list)
    mk = tsub.add_parser(
        "make-dataset",
        help="write N images + .txt captions of one concept (the folder the trainers read as data.path)",
        description="Render N training images of CONCEPT (a name such as robot, or its trigger word such as "
        "zorbo) into OUT as 00000.png + 00000.txt pairs. Same arguments give identical files.",
    )
    mk.add_argument("concept", help="concept name or trigger word (see `lorakit toyworld list`), or `generic` for "
                    "generic scenes with their captions (regularisation images, data.reg_path)")
    mk.add_argument("--out", required=True, help="output folder")
    mk.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    mk.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    mk.add_argument("--size", type=int, default=32, help="image size in pixels (default: 32, the toy base's size)")
    mk.set_defaults(func=run_make_dataset)
    rd = tsub.add_parser("render", help="render one scene from a caption-like spec to a PNG")
    rd.add_argument("--out", required=True, help="output .png")
    rd.add_argument("--background", default="plain", help="plain|gradient|stripes|checker|starry (default: plain)")
    rd.add_argument("--bg-color", default="white", help="white|gray|cyan|pink|sand (generic backgrounds)")
    rd.add_argument("--shape", help="circle|square|triangle|cross")
    rd.add_argument("--shape-color", default="red", help="red|green|blue|yellow|purple|orange")
    rd.add_argument("--character", action="append", default=[], help="robot|frog|ghost (up to 2)")
    rd.add_argument("--object", action="append", default=[], help="tophat|mushroom")
    rd.add_argument("--style", help="pixel|ink")
    rd.add_argument("--seed", type=int, default=0, help="layout jitter seed (default: 0)")
    rd.add_argument("--size", type=int, default=32, help="image size in pixels (default: 32, the toy base's size)")
    rd.set_defaults(func=run_render)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_list(args) -> int:
    import json

    from lorakit.toyworld.concepts import CONCEPTS

    rows = [{"name": c.name, "kind": c.kind, "set": "held-out" if c.heldout else "generic",
             "trigger": c.trigger, "look": c.description} for c in CONCEPTS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<10} {'kind':<11} {'set':<9} {'trigger':<9} look")
    for r in rows:
        print(f"{r['name']:<10} {r['kind']:<11} {r['set']:<9} {r['trigger'] or '-':<9} {r['look']}")
    return 0


def run_make_dataset(args) -> int:
    from lorakit.toyworld.concepts import get_concept
    from lorakit.toyworld.dataset import GENERIC, make_dataset

    if args.concept == GENERIC:
        paths = make_dataset(GENERIC, args.out, args.n, seed=args.seed, size=args.size)
        print(f"wrote {len(paths)} generic scenes + captions (regularisation images) to {args.out}")
        return 0
    concept = get_concept(args.concept)
    paths = make_dataset(args.concept, args.out, args.n, seed=args.seed, size=args.size)
    print(f"wrote {len(paths)} images + captions of {concept.name}"
          + (f" (trigger {concept.trigger})" if concept.trigger else "") + f" to {args.out}")
    return 0


def run_render(args) -> int:
    from lorakit.toyworld.render import Scene, caption, render

    scene = Scene(args.background, args.bg_color, args.shape, args.shape_color, tuple(args.character),
                  tuple(args.object), args.style, args.seed)
    from lorakit.fileio import save_image
    from lorakit.outputs import check_out_file

    check_out_file(args.out, overwrite=False, overwrite_flag=None)  # never replaces an existing file
    save_image(render(scene, args.size), args.out)
    print(f"wrote {args.out}: {caption(scene)}")
    return 0
