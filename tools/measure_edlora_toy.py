"""Toy-world quality check of ED-LoRA: does the oracle recognise the trained concept in generated images?

    python tools/measure_edlora_toy.py                        # robot, recipe train_configs/toy_edlora_character.yaml
    python tools/measure_edlora_toy.py --steps 200 --n 32 --concept robot

Trains the recipe (``--steps`` overrides max_steps), then generates ``--n`` images from the toy evaluation prompts
of the concept (``lorakit.toyworld.evaluate.concept_prompts``) twice with the same seeds: on the base with the
concept's trigger word, and with the ED-LoRA loaded (``load_edlora``) where the trigger is replaced by the two
pseudo-words. Prints one JSON line with both oracle presence rates.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="train_configs/toy_edlora_character.yaml")
    p.add_argument("--concept", default="robot", help="toy concept (its trigger must be the recipe's placeholder)")
    p.add_argument("--base", default="data/toy-base")
    p.add_argument("--steps", type=int)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", help="output folder of the training (default: a temp folder)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides of the recipe")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lorakit.adapters.edlora import load_edlora
    from lorakit.config import load_config
    from lorakit.toyworld.oracle import score
    from lorakit.models import load_base
    from lorakit.toyworld.concepts import get_concept
    from lorakit.toyworld.evaluate import concept_prompts, generate
    from lorakit.training.edlora import EDLoRAConfig, train

    concept = get_concept(args.concept)
    work = Path(args.work or tempfile.mkdtemp(prefix="edlora_toy_"))
    overrides = [f"output_dir={work}", f"base_model={args.base}", "sample_every=0", "logging=none",
                 "checkpointing_steps=0", *args.overrides]
    if args.steps:
        overrides.append(f"max_steps={args.steps}")
    cfg = load_config(EDLoRAConfig, args.config, overrides)
    if cfg.concept.placeholder != concept.trigger:
        raise ValueError(f"{args.config}: concept.placeholder is {cfg.concept.placeholder!r}, the trigger of "
                         f"{concept.name} is {concept.trigger!r}")
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0

    prompts = concept_prompts(concept.name, args.n, seed=123)
    base = load_base(args.base)
    base.set_progress_bar_config(disable=True)
    base_rate = score(generate(base, prompts, seed=1000), [concept.name]).rates[concept.name]
    pipe = load_base(args.base)
    pipe.set_progress_bar_config(disable=True)
    info = load_edlora(pipe, result.final_path)
    words = info["concepts"][cfg.concept.name or str(cfg.concept.tokens).split()[0].strip("<>")]
    ed_prompts = [q.replace(concept.trigger, words) for q in prompts]
    ed_rate = score(generate(pipe, ed_prompts, seed=1000), [concept.name]).rates[concept.name]
    print(json.dumps({
        "measure": "edlora_toy_presence", "concept": concept.name, "recipe": args.config, "steps": cfg.max_steps,
        "batch": cfg.train_batch_size, "n": args.n, "train_seconds": round(train_s, 1),
        "base_rate_with_trigger": round(base_rate, 3), "edlora_rate": round(ed_rate, 3),
        "example_prompt": ed_prompts[0], "adapter": str(result.final_path),
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
