"""Must-show of the toy world: every held-out concept's LoRA makes the oracle find that concept in generated
images far more often than the base model alone.

The LoRAs are the recipes' own (``train_configs/toy_<concept>.yaml``) from the toy LoRA cache that ``lorakit demo``
and ``.ci/run`` share (the ``toy_loras`` fixture: reused while recipe, base weights and data are unchanged; missing
ones are trained first, about a minute each on one idle core). Slow (``pytest -m slow``; ``.ci/run`` runs it after
training the LoRAs).
"""

from pathlib import Path

import pytest

from lorakit.toyworld.concepts import HELDOUT

ROOT = Path(__file__).resolve().parents[1]
N = 16
# "Far more often": the LoRA's rate beats the base's by at least this much (measured margins: docs/toyworld.md).
MIN_GAIN = 0.25


@pytest.fixture(scope="module")
def toy_pipe():
    from lorakit.models import load_base

    pipe = load_base(str(ROOT / "data" / "toy-base"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("concept", [c.name for c in HELDOUT])
def test_concept_lora_beats_base(toy_pipe, toy_loras, concept):
    from lorakit.toyworld.oracle import score
    from lorakit.toyworld.evaluate import concept_prompts, generate

    path = toy_loras[concept]
    prompts = concept_prompts(concept, N, seed=123)
    base_rate = score(generate(toy_pipe, prompts, seed=1000), [concept]).rates[concept]
    toy_pipe.load_lora_weights(str(path), adapter_name=concept)
    try:
        lora_rate = score(generate(toy_pipe, prompts, seed=1000), [concept]).rates[concept]
    finally:
        toy_pipe.delete_adapters(concept)
    print(f"{concept}: base {base_rate:.3f} -> LoRA {lora_rate:.3f} (n={N})")
    assert lora_rate >= base_rate + MIN_GAIN, (concept, base_rate, lora_rate)
