"""``lorakit demo``: train a toy character LoRA and a second LoRA (v1: a style; v2: an object, a style or a
background identity), compose them every way lorakit can, and score every image with the toy oracle.

Rows of the report (``METHODS``), all on the same prompt and the same seeds:

* references: ``base`` (no LoRA), ``<character>_only`` and ``<second>_only`` (one LoRA, merge of one adapter);
* sampling-time compositions (:mod:`lorakit.sampling`): ``merge``, ``switch``, ``composite``, ``cmlora`` (a LoRA
  alone and ``merge`` keep the same adapters at every step, so their deltas are added to the weights once and the
  rows are sampled like a fused model: peft's unfused layers give the same images up to float rounding, at
  1.2-1.7 times the cost per image of the base on the toy UNet: docs/toyworld_v2.md);
* fusions (:mod:`lorakit.fusion`): ``gradient`` (Mix-of-Show closed form; the fused pipeline is sampled plainly) and
  ``weighted`` (the average of the two deltas added to the base, sampled plainly);
* v2 only, lorakit's own method (``LORAKIT_METHODS``): ``delta-masked-classes-ubase`` (``lorakit sample --method
  delta --masks attention --prompt-parts class-words --uncond base``).

Above them, **target** rows show what the concepts look like: the renderer's ground truth (``lorakit.toyworld.render``)
for the same seeds: ``<character>_target`` (the character alone on white), ``<second>_target`` (the second concept
without the character: a generic shape in the style, the object alone, the background alone) and ``target`` (the
scene the prompt asks for).

Both toy worlds run through this module: a world object (:class:`lorakit.toyworld.demo_v1.V1World`, 32x32; toy world v2's
:data:`lorakit.toyworld.v2.demo.WORLD`, 64x64, the default) gives the concepts, the prompt, the targets, the LoRAs
and the oracle. Every image is saved as ``<out>/images/<method>-s<seed>.png`` (what the oracle scores) and, enlarged
with nearest-neighbour scaling (v1 4x, v2 3x), as ``<out>/images/x<n>/<method>-s<seed>.png`` (what the reports
show); ``<out>/grid.png`` holds every row in one picture. Image files
a previous run listed in ``<out>/report.json`` and this run does not rewrite are removed (nothing else is touched).
The oracle gives per-image presence
probabilities of the character and the second concept; the report holds the rates (fraction of images with the concept),
the both-present rate, seconds per image and each method's setup time (profiling, fusing, adding deltas).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from lorakit.fileio import save_image
from lorakit.logs import library_chatter_off, tqdm
from lorakit.outputs import claim_dir, is_marked, write_marker
from lorakit.toyworld.demo_rows import SECOND_PROCESS_ROWS, RowRunner, sample_rows
from lorakit.toyworld.demo_report import format_table, remove_stale_images, row_intervals, write_reports
from lorakit.toyworld.evaluate import GUIDANCE, NUM_STEPS
from lorakit.toyworld.loras import default_cache_dir
from lorakit.toyworld.demo_v1 import V1World
from lorakit.toyworld.v2.demo import WORLD as V2_WORLD
from lorakit.toyworld.v2.demo import spawn_pool

# (row id template, kind, what it is). "{character}" / "{second}" are filled with the concept names.
METHODS = (
    ("base", "reference", "the base model, no LoRA"),
    ("{character}_only", "reference", "the character LoRA alone (its delta added to the weights)"),
    ("{second}_only", "reference", "the second LoRA alone (its delta added to the weights)"),
    ("merge", "sampling", "both LoRAs active at once: the sum of their deltas added to the weights, as set_adapters"),
    ("switch", "sampling", "LoRA Switch: one LoRA per step, rotating every 5 steps"),
    ("composite", "sampling", "LoRA Composite: mean of each LoRA's own CFG noise prediction"),
    ("cmlora", "sampling", "CMLoRA: frequency-ordered dominant LoRA, deep-feature cache"),
    ("gradient", "fusion", "Mix-of-Show gradient fusion (closed form) -> one fused model"),
    ("weighted", "fusion", "average of the two deltas added to the base -> one fused model"),
)
# lorakit's own composition, in worlds whose prompts name each trigger next to its class word (``kwibbit frog``):
# the method that beat every reference at N = 3 and merge on the demo's pair (docs/toyworld_v2.md)
LORAKIT_METHODS = (
    ("delta-masked-classes-ubase", "lorakit",
     "lorakit's delta: the base plus each LoRA's difference from it, where the base's cross-attention puts the "
     "LoRA's tag; the base's passes see the class words only (lorakit sample --method delta --masks attention "
     "--prompt-parts class-words --uncond base)"),
)


# Ground-truth rows drawn by the renderer (id template, what it shows).
TARGETS = (
    ("{character}_target", "rendered ground truth: the character alone on a white plain background"),
    ("{second}_target", "rendered ground truth: the second concept without the character"),
    ("target", "rendered ground truth of the prompt's scene"),
)


@dataclass
class DemoSettings:
    """What one demo run does.

    world: ``v2`` (64x64 toy world v2, identity LoRAs; :mod:`lorakit.toyworld.v2.demo`) or ``v1`` (32x32).
    character: a v2 character identity (``kwibbit``) or a v1 held-out character (``frog``/``kwibbit``).
    second: the second LoRA's concept: a v2 object, style or background identity (``hattock``, ``inkvel``,
        ``nocturo``) or a v1 held-out style (``ink``/``inkvel``). None (both) = the world's default pair.
    second_kind: the kind ``second`` must be (``style``, ``object``, ``background``: what ``--style`` /
        ``--object`` / ``--background`` ask for), or None for any kind the world composes.
    out: output folder (report.html / .json / .md, images/).
    lora_dir: where trained LoRAs are cached by recipe hash (default: the toy LoRA cache shared with the tests and
        CI, :func:`lorakit.toyworld.loras.default_cache_dir`).
    k: images per method; image i of every method uses seed ``seed + i``.
    scale: LoRA scale of both LoRAs in every method (fusions: the weight of each delta); None = the world's
        (v2: 0.8, the composition papers' value; v1: 1.0, the earlier demo's).
    train_steps: overrides the recipes' ``max_steps`` (None = the recipes' 300).
    jobs: processes (one thread each) for the two LoRAs' training (v2) and for the rows: with 2, the costliest rows
        that change adapters during sampling (composite, cmlora, lorakit's delta) run in a second process while this one
        samples the others; the images are the same bit for bit (default 2 where the machine has 2 cores or
        more, else 1).
    sample_steps / guidance: DDIM steps and CFG scale of every image (the toy measurements' 20 and 4).
    base: base model folder (default: the world's bundled base, ``data/toy2-base`` / ``data/toy-base``).
    """

    character: str | None = None
    second: str | None = None
    second_kind: str | None = None
    world: str = "v2"
    out: str = "demo_out"
    lora_dir: str | None = None
    k: int = 8
    seed: int = 0
    scale: float | None = None
    train_steps: int | None = None
    jobs: int | None = None
    sample_steps: int = NUM_STEPS
    guidance: float = GUIDANCE
    base: str | None = None
    methods: list[str] | None = field(default=None)  # row ids to run (default: all); mostly for tests


def get_world(name: str):
    """The demo's world object for ``v1`` / ``v2`` (ValueError naming the choices otherwise)."""
    if name == "v1":
        return V1World()
    if name == "v2":
        return V2_WORLD
    raise ValueError(f"--world {name!r}: expected v1 or v2")


def world_methods(world) -> tuple:
    """The rows ``world`` runs: :data:`METHODS`, then :data:`LORAKIT_METHODS` where its prompts have class words."""
    return METHODS + (LORAKIT_METHODS if world.class_words else ())


def method_ids(character: str, second: str, world: str = "v2") -> list[str]:
    """Row ids in report order, e.g. ``["base", "frog_only", "ink_only", "merge", ...]`` (``world="v1"``)."""
    return [m.format(character=character, second=second) for m, _, _ in world_methods(get_world(world))]


def target_ids(character: str, second: str) -> list[str]:
    """Ground-truth row ids, e.g. ``["frog_target", "ink_target", "target"]``."""
    return [t.format(character=character, second=second) for t, _ in TARGETS]


def _sample_rows_in_worker(s: DemoSettings, loras: dict, prompt: str, rows: list[str], seeds: list[int],
                           threads: int) -> dict:
    """:func:`~lorakit.toyworld.demo_rows.sample_rows` in a second process, with the parent's thread count (so the same images)."""
    import torch

    torch.set_num_threads(threads)
    with library_chatter_off():
        return sample_rows(RowRunner(s, loras, prompt, get_world(s.world)), rows, seeds)


_DEMO_NAMES = {"report.html", "report.json", "report.md", "grid.png", "images", "loras"}


def _claim_demo_folder(out: Path) -> None:
    """The demo writes only into a new, empty or lorakit folder (a demo folder of an earlier version, holding
    nothing but the demo's own names, counts as lorakit's)."""
    if out.is_dir() and not is_marked(out):
        names = {p.name for p in out.iterdir()}
        if names and names <= _DEMO_NAMES and (out / "report.json").is_file():
            write_marker(out, "demo")
    claim_dir(out, kind="demo")


def _check_second(world, settings: DemoSettings) -> str:
    """The second concept's name, checked against the kind the user asked for (``--style`` / ``--object`` /
    ``--background``), or against every kind the world composes when none was named."""
    if settings.second is None:
        return world.default_second
    kinds = (settings.second_kind,) if settings.second_kind else world.second_kinds
    if kinds[0] not in world.second_kinds:
        raise ValueError(f"--{kinds[0]} {settings.second!r}: the toy world {world.name} demo's second concept is a "
                         f"{' or '.join(world.second_kinds)} (--{kinds[0]} needs another --world)")
    errors = []
    for kind in kinds:
        try:
            return world.check_concept(settings.second, kind, f"--{kind}")
        except ValueError as e:
            errors.append(str(e))
    raise ValueError(errors[0] if len(errors) == 1 else f"{settings.second!r}: not a "
                     f"{' / '.join(kinds)} identity of toy world {world.name} ({'; '.join(errors)})")


def run_demo(settings: DemoSettings, progress: bool = True) -> dict:
    """Train/reuse the LoRAs, generate ``k`` images per method, score them, write the reports.

    Returns:
        The report dict (also ``<out>/report.json``): ``settings``, ``prompt``, ``loras`` (path, cached, seconds),
        ``rows`` (one per method: ``method``, ``kind``, ``character_rate``, ``second_rate``, ``both_rate``,
        ``s_per_image``, ``setup_s``, ``images`` (paths relative to ``out``), ``probs`` ``[k][2]``), ``total_s``.
    """
    t_start = time.perf_counter()
    world = get_world(settings.world)
    char = world.check_concept(settings.character or world.default_character, "character", "--character")
    second = _check_second(world, settings)
    scale = world.default_scale if settings.scale is None else settings.scale
    s = DemoSettings(**{**asdict(settings), "character": char, "second": second, "scale": scale})
    if not 0 < s.scale <= 2:
        raise ValueError(f"--scale must be in (0, 2], got {s.scale}")
    if s.k < 1:
        raise ValueError(f"--k must be >= 1, got {s.k}")
    if s.jobs is not None and s.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {s.jobs}")
    if s.train_steps is not None and s.train_steps < 1:
        raise ValueError(f"--steps must be >= 1, got {s.train_steps}")
    rows_all = method_ids(s.character, s.second, s.world)
    rows = rows_all if s.methods is None else list(s.methods)
    for r in rows:
        if r not in rows_all:
            raise ValueError(f"unknown demo method {r!r}; expected one of {rows_all}")
    out = Path(s.out)
    _claim_demo_folder(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if s.lora_dir:
        lora_dir = Path(s.lora_dir)
    else:
        lora_dir = default_cache_dir()
    prompt = world.prompt(s.character, s.second)
    seeds = [s.seed + i for i in range(s.k)]
    with library_chatter_off():
        report = _run(s, world, rows, out, lora_dir, prompt, seeds, progress)
    report["total_s"] = time.perf_counter() - t_start
    keep = {p for r in report["rows"] for p in r["images"] + r["images_large"]}
    report["removed_stale"] = [str(p.relative_to(out.resolve())) for p in remove_stale_images(out, keep)]
    write_reports(report, out)
    return report


class _MainRows:
    """What the demo's own process makes: the ground-truth rows (first, once) and the sampled rows not left to
    the second process; ``while_training`` starts on the rows of the first LoRA saved while the other trains."""

    def __init__(self, s: DemoSettings, world, rows: list[str], remote: list[str], out: Path, prompt: str,
                 seeds: list[int], progress: bool):
        self.s, self.world, self.rows, self.remote, self.out, self.seeds = s, world, rows, remote, out, seeds
        self.progress = progress
        self.runner = RowRunner(s, {}, prompt, world)  # its LoRA paths are filled in as they are saved
        self.sampled: dict = {}
        self.results: list = []

    @cached_property
    def bar(self):
        return tqdm(total=len(self.rows) * self.s.k, desc="demo", unit="img", disable=not self.progress,
                    dynamic_ncols=True)

    def sample(self, rows: list[str]) -> None:
        s = self.s
        if not self.results:
            for row, (_, desc) in zip(target_ids(s.character, s.second), TARGETS):
                images = self.world.target_images(row, s.character, s.second, self.seeds)
                self.results.append(_row_record(row, "target", desc, images, self.seeds, self.out, s, self.world,
                                                0.0, 0.0, {}))
        todo = [r for r in rows if r not in self.remote and r not in self.sampled]
        self.sampled.update(sample_rows(self.runner, todo, self.seeds, self.bar))

    def while_training(self, name: str, path: str) -> None:
        self.runner.loras[name] = {"path": path}
        self.sample([r for r in ("base", f"{name}_only") if r in self.rows])


def _run(s: DemoSettings, world, rows: list[str], out: Path, lora_dir: Path, prompt: str, seeds: list[int],
         progress: bool) -> dict:
    """The body of :func:`run_demo` (settings already checked): train, generate, score; the report without
    its total time."""
    jobs = s.jobs if s.jobs is not None else min(2, os.cpu_count() or 1)
    kinds = {m.format(character=s.character, second=s.second): (k, d) for m, k, d in world_methods(world)}
    # With 2 jobs one pool of two processes trains the LoRAs, then samples the costliest adapter rows (about half
    # the sampling time after training) in a worker already warm from training; each row is seeded on its own, so
    # which process samples it does not change its images.
    remote = [r for r in rows if r in SECOND_PROCESS_ROWS] if jobs >= 2 else []
    if len(remote) == len(rows):
        remote = []
    main = _MainRows(s, world, rows, remote, out, prompt, seeds, progress)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(spawn_pool(2)) if jobs >= 2 else None
        loras = world.train_loras(s.character, s.second, lora_dir, s.train_steps, s.base,
                                  log=print if progress else None, jobs=jobs, pool=pool,
                                  while_training=main.while_training)
        main.runner.loras.update(loras)
        future = pool.submit(_sample_rows_in_worker, s, loras, prompt, remote, seeds, _threads()) if remote else None
        main.sample(rows)
        sampled, results, bar = main.sampled, main.results, main.bar
        if future is not None:
            bar.set_postfix_str("waiting for " + ", ".join(remote))
            sampled.update(future.result())
            bar.update(len(remote) * s.k)
    bar.set_postfix_str("done")
    bar.close()
    for row in rows:
        images, s_per_image, setup_s, info = sampled[row]
        results.append(_row_record(row, kinds[row][0], kinds[row][1], images, seeds, out, s, world, s_per_image,
                                   setup_s, info))
    return {
        "settings": {**asdict(s), "lora_dir": str(lora_dir), "threads": _threads(), "enlarge": world.enlarge,
                     "image_size": world.image_size},
        "prompt": prompt,
        "concepts": {"character": {"name": s.character, "trigger": world.trigger(s.character)},
                     "second": {"name": s.second, "trigger": world.trigger(s.second), "kind": world.kind(s.second)}},
        "loras": loras,
        "rows": results,
    }


def _row_record(row: str, kind: str, description: str, images: list, seeds: list[int], out: Path, s: DemoSettings,
                world, s_per_image: float, setup_s: float, info: dict) -> dict:
    """Save one row's images (as generated + enlarged copies), score them with the world's oracle; the row's
    report entry."""
    from PIL import Image

    paths, big, x = [], [], world.enlarge
    for seed, image in zip(seeds, images):
        rel, rel_big = f"images/{row}-s{seed}.png", f"images/x{x}/{row}-s{seed}.png"
        save_image(image, out / rel)
        save_image(image.resize((image.width * x, image.height * x), Image.NEAREST), out / rel_big)
        paths.append(rel)
        big.append(rel_big)
    sc = world.score(images, [s.character, s.second])
    return {
        "method": row, "kind": kind, "description": description,
        "character_rate": sc.rates[s.character], "second_rate": sc.rates[s.second], "both_rate": sc.all_rate,
        "s_per_image": s_per_image, "setup_s": setup_s, "images": paths, "images_large": big, "seeds": seeds,
        "probs": [[float(v) for v in p] for p in sc.probs], "info": info,
        "wilson95": row_intervals(sc.probs),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


__all__ = [
    "LORAKIT_METHODS", "METHODS", "TARGETS", "DemoSettings", "V1World", "format_table", "get_world", "method_ids",
    "remove_stale_images", "run_demo", "target_ids", "world_methods", "write_reports",
]
