"""Train toy world v2 identity LoRAs (``train_configs/toy2_<identity>.yaml``) in parts that fit a time budget.

On a shared machine one recipe may not finish in one sitting. This trains ``--chunk`` steps at a time
(:func:`lorakit.toyworld.v2.loras.train_identity_lora_chunk`: a checkpoint at each stop, resumed bit-exactly) and
stops before the next part would pass ``--budget-s``; run the same command again to continue. The finished LoRA
is the file ``tools/measure_toyworld.py --world v2 --work <the same --out>`` looks for (same recipe hash).

    python tools/train_toy2_loras.py --out /work/shared_artifacts/toy2_loras \\
        --identities kwibbit inkvel --budget-s 480

Prints one JSON line per identity: ``{"identity", "done", "step", "max_steps", "adapter"}``; exit status 0 when
every identity is done, 3 when some are not (run it again), 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a v2 pipeline folder (default: the bundled data/toy2-base)")
    p.add_argument("--out", required=True, help="the LoRA cache folder (as measure_toyworld.py's --work)")
    p.add_argument("--identities", nargs="+", required=True, help="v2 identities, in the order to train them")
    p.add_argument("--chunk", type=int, default=50, help="steps per part (default 50)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="stop before a part would end later than this many seconds after the start")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (max_steps=400)")
    p.add_argument("--threads", type=int, default=1)
    return p


def train_within(identity: str, out: str, base: str, overrides: list[str], chunk: int, deadline: float,
                 clock=time.monotonic) -> dict:
    """Train ``identity``'s parts while the next one is expected to end before ``deadline`` (by ``clock``);
    the row that says how far it got."""
    from lorakit.config import load_config
    from lorakit.toyworld.loras import partial_step
    from lorakit.toyworld.v2.loras import _overrides, lora_path, recipe_path, train_identity_lora_chunk
    from lorakit.training.blockwise import BlockwiseConfig

    target = lora_path(identity, out, base, overrides)
    max_steps = load_config(BlockwiseConfig, recipe_path(identity),
                            _overrides(identity, base, target.parent, overrides)).max_steps
    step, last = (max_steps if target.exists() else partial_step(target)), None
    while step < max_steps:
        if last is not None and clock() + last > deadline:
            break
        start = clock()
        stop = min(max_steps, (step // chunk + 1) * chunk)
        with contextlib.redirect_stdout(sys.stderr):
            train_identity_lora_chunk(identity, out, base, stop, overrides)
        step, last = stop, clock() - start
    done = target.exists()
    return {"identity": identity, "done": done, "step": step, "max_steps": max_steps,
            "adapter": str(target) if done else None}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.base is None:
        from lorakit.toyworld.v2.models import DEFAULT_BASE

        args.base = str(DEFAULT_BASE)
    deadline = time.monotonic() + args.budget_s
    for identity in args.identities:
        row = train_within(identity, args.out, args.base, args.set, args.chunk, deadline)
        print(json.dumps(row), flush=True)
        if not row["done"]:
            return 3
    return 0


if __name__ == "__main__":
    from lorakit.errors import run_guarded

    raise SystemExit(run_guarded(main, "train_toy2_loras"))
