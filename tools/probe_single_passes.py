"""What each pass of a composition sees, drawn alone: on toy world v2 composition sets, the base and each recipe LoRA
alone (merged, one at a time) on the set's prompt and on the prompt its pass sees under ``--prompt-parts
class-words`` (the base: every trigger out; a LoRA: its own trigger back). One JSON line per (set, cell): how many
of the ``--k`` images show each identity and each class of the set, by the v2 oracle.

    python tools/probe_single_passes.py --size 3 --sets n3-zorbo-hattock-chekka n3-zorbo-hattock-nocturo --k 8

Cells: ``base`` / ``only-<identity>`` on the set's prompt (``joint``) and on the class-words prompts
(``class-words``); seeds 1000.. (the benchmark's validation seeds); LoRA scale ``--scale`` (1.0, the scale the
benchmark's validation chose for delta); the recipe LoRAs of ``--adapters-dir`` on the bundled base.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from probe_v2_common import add_probe_args, load_probe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_probe_args(p, k=8)
    p.add_argument("--scale", type=float, default=1.0)
    args = p.parse_args(argv)

    from lorakit.sampling import SamplerSettings, generate
    from lorakit.sampling.prompt_parts import class_word_prompts
    from lorakit.toyworld.v2.composition import IDENTITY_CLASS

    probe = load_probe(args, "probe_single_passes")
    if probe is None:
        return 2
    sets, files, pipe, loaded, oracle, seeds = probe
    settings = SamplerSettings(method="merge", steps=20, cfg=4.0)
    for s in sets:
        ids = list(s["concepts"].values())
        scored = ids + [IDENTITY_CLASS[i] for i in ids]
        base_prompt, parts = class_word_prompts(s["prompt"], ids)
        cells = [("joint", "base", [], s["prompt"]), ("class-words", "base", [], base_prompt)]
        cells += [(form, f"only-{i}", [i], prompt) for form, prompts in (("joint", [s["prompt"]] * len(ids)),
                                                                         ("class-words", parts))
                  for i, prompt in zip(ids, prompts)]
        for form, cell, use, prompt in cells:
            ads = [replace(loaded[n], weight=args.scale) for n in use]
            found = oracle.score(generate(pipe, ads, settings, prompt, None, seeds)[0], scored).probs >= 0.5
            print(json.dumps({"set": s["id"], "prompts": form, "cell": cell, "prompt": prompt, "n": len(seeds),
                              **{n: int(found[:, j].sum()) for j, n in enumerate(scored)},
                              "adapters": [files[n].name for n in use]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
