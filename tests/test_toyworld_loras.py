"""Must-show of the toy world: every held-out concept's LoRA makes the oracle find that concept in generated
images far more often than the base model alone.

The LoRAs are the recipes' own (``train_configs/toy_<concept>.yaml``), trained through
``lorakit.toyworld.loras.train_concept_lora`` into ``artifacts/adapters`` and reused while recipe, base weights
and data are unchanged. ``.ci/run`` trains them before the tests (the same files feed the CI benchmark); on a
machine without them this file trains them first (about a minute each on one CPU core).
"""

from pathlib import Path

import pytest
import torch

from lorakit.toyworld.concepts import HELDOUT

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "artifacts" / "adapters"
N = 16
# "Far more often": the LoRA's rate beats the base's by at least this much (measured margins: docs/toyworld.md).
MIN_GAIN = 0.25


@pytest.fixture(scope="module")
def toy_pipe():
    from lorakit.models import load_base

    pipe = load_base(str(ROOT / "data" / "toy-base"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("concept", [c.name for c in HELDOUT])
def test_concept_lora_beats_base(toy_pipe, concept):
    from lorakit.eval.oracle import score
    from lorakit.toyworld.evaluate import concept_prompts, generate
    from lorakit.toyworld.loras import train_concept_lora

    torch.set_num_threads(1)
    path = train_concept_lora(concept, CACHE)
    prompts = concept_prompts(concept, N, seed=123)
    base_rate = score(generate(toy_pipe, prompts, seed=1000), [concept]).rates[concept]
    toy_pipe.load_lora_weights(str(path), adapter_name=concept)
    try:
        lora_rate = score(generate(toy_pipe, prompts, seed=1000), [concept]).rates[concept]
    finally:
        toy_pipe.delete_adapters(concept)
    print(f"{concept}: base {base_rate:.3f} -> LoRA {lora_rate:.3f} (n={N})")
    assert lora_rate >= base_rate + MIN_GAIN, (concept, base_rate, lora_rate)
