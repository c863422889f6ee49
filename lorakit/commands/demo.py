"""``lorakit demo``: the whole toolkit on the bundled toy world, offline, on a CPU.

The work is in :mod:`lorakit.toyworld.demo`; this module parses options, sets the thread count and prints.
"""

from __future__ import annotations

from lorakit.logs import show_progress

DESCRIPTION = """\
Offline end-to-end demo on a bundled toy world (default --world v2: data/toy2-base, 64x64 images;
--world v1: data/toy-base, 32x32, the earlier demo):

  1. trains a character LoRA and a second LoRA (v2: identities kwibbit (a frog) + nocturo (a night background)
     from train_configs/toy2_<identity>.yaml (kwibbit 300 steps, nocturo 1200), the two in parallel processes
     when both are missing; --style / --object / --background choose another second identity; v1: frog + ink from
     train_configs/toy_<concept>.yaml, 300 steps each), cached by recipe hash under LORA_DIR, shared with the
     tests and CI, so a second run reuses them;
  2. composes them with every method: sampling-time merge, switch, composite, cmlora and fusion-time
     gradient (Mix-of-Show) and weighted, plus reference rows: base (no LoRA) and each LoRA alone, and (v2)
     lorakit's own delta-masked-classes-ubase (sample --method delta --masks attention --prompt-parts
     class-words --uncond base);
     K images per method from one whole-scene caption (v2: "kwibbit frog, nocturo night background"), every
     LoRA at scale SCALE (0.8, as the composition papers; v1: 1.0), the same seeds for every method;
  3. scores every image with the world's oracle (is the character there? the second concept? both?);
  4. writes OUT/report.html (the table with Wilson 95% intervals; target rows = the rendered ground truth,
     then every method's images enlarged with the oracle's verdict under each), OUT/report.json,
     OUT/report.md, OUT/grid.png (every row in one picture), OUT/images/.

Time on an idle 2-core machine (--jobs 2, the default there, one thread per process): a first run 256-322 s
wall (2026-12-05 and 12-06), most of it nocturo's 1200 training steps, whose time varies with the machine
(217-287 s); the base row and the row of the first LoRA saved are sampled while the other still trains, the
composite / CMLoRA / lorakit rows in the second process. With both LoRAs cached: about 30-40 s.
`--steps 20 --k 2 --out demo_out/quick` is a quick look in its own folder (two 20-step LoRAs: they teach little).
"""


HELP = "offline demo: train a toy character LoRA + a second one, compose them every way, score, write report.html"


def add_arguments(p) -> None:
    p.add_argument("--world", choices=("v2", "v1"), default="v2",
                   help="toy world: v2 (64x64, identity LoRAs; docs/toyworld_v2.md) or v1 (32x32; docs/toyworld.md) "
                   "(default: v2)")
    p.add_argument("--character", default=None,
                   help="character: a v2 character identity (kwibbit, zorbo, bloopo) or a v1 held-out character "
                   "name or trigger (default: kwibbit; v1: frog)")
    second = p.add_mutually_exclusive_group()
    second.add_argument("--style", default=None,
                        help="second LoRA, a style: a v2 style identity (inkvel, pixlor) or a v1 held-out style "
                        "(v1 default: ink). pixlor's palette recolours the character, and the oracle tells "
                        "characters by their colours: its target row shows the pair cannot be scored")
    second.add_argument("--object", default=None,
                        help="second LoRA, an object: a v2 object identity (hattock, shroomel)")
    second.add_argument("--background", default=None,
                        help="second LoRA, a background: a v2 background identity (nocturo, chekka)")
    p.add_argument("--k", type=int, default=8, help="images per method (default: 8)")
    p.add_argument("--scale", type=float, default=None,
                   help="LoRA scale of both LoRAs in every method (default: 0.8, the composition papers' value; "
                   "v1: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default: 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of each LoRA, overriding the recipes' max_steps (default: the recipes' 300)")
    p.add_argument("--jobs", "--train-jobs", dest="jobs", type=int, default=None,
                   help="processes, one thread each, for training the two LoRAs at once (v2) and for sampling: "
                   "with 2, composite / cmlora / lorakit's delta sample in a second process, the same images (default: 2 "
                   "on a machine with 2 or more cores, else 1)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps per image (default: 20)")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--lora-dir", help="LoRA cache folder (default: $LORAKIT_TOY_LORAS, else artifacts/adapters in "
                   "the repository: the cache the tests and .ci/run use, so a LoRA is trained once per recipe)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1, or OMP_NUM_THREADS when set; 1 is the fastest for the toy "
                   "model: 2 threads took 2x longer)")


def run(args) -> int:
    from lorakit.threads import configure_threads

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads = configure_threads(args.threads)  # (passive OpenMP waiting only takes effect before torch loads)
    import torch

    torch.set_num_threads(threads)  # torch's own default stops at the core count; an explicit --threads does not

    from lorakit.toyworld.demo import DemoSettings, format_table, run_demo

    kind = next((k for k in ("style", "object", "background") if getattr(args, k) is not None), None)
    settings = DemoSettings(character=args.character, second=getattr(args, kind) if kind else None,
                            second_kind=kind, world=args.world, out=args.out,
                            lora_dir=args.lora_dir,
                            k=args.k, seed=args.seed, scale=args.scale, train_steps=args.steps,
                            jobs=args.jobs)
    if args.sample_steps is not None:
        if args.sample_steps < 1:
            raise ValueError(f"--sample-steps must be >= 1, got {args.sample_steps}")
        settings.sample_steps = args.sample_steps
    report = run_demo(settings, progress=show_progress())
    print()
    print(f"lorakit demo: {report['prompt']!r}, {settings.k} image(s) per method, "
          f"{report['total_s']:.0f} s in all ({torch.get_num_threads()} thread(s))")
    for name, v in report["loras"].items():
        how = "cached" if v["cached"] else f"trained in {v['seconds']:.0f} s"
        print(f"  {name} LoRA: {v['path']} ({how})")
    print()
    print(format_table(report))
    print()
    print("rates: fraction of images where the oracle sees the concept; setup s: profiling / fusing time")
    print(f"report: {args.out}/report.html (also report.md, report.json, grid.png; images in {args.out}/images/)")
    return 0
