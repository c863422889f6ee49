"""--adapter-start: the base model samples the first steps alone, the method's adapters act from then on."""

import copy

import pytest

from lorakit.adapters.io import save_adapter
from lorakit.sampling import SamplerSettings, generate, load_adapters
from lorakit.sampling.methods import Term, method_plan
from lorakit.testing import random_adapter


def test_the_first_steps_are_base_passes_by_diffusers_start_rule():
    plan = method_plan(SamplerSettings(method="merge", adapter_start=0.25), 2, 8, None, None)
    assert plan.terms[:2] == [[Term((), 1.0, 1.0)]] * 2 and plan.terms[2] == [Term((0, 1), 1.0, 1.0)]
    assert plan.info["base_steps"] == 2
    # steps i with i / n < start: 0.34 of 3 steps holds steps 0 and 1 (1/3 < 0.34)
    delta = method_plan(SamplerSettings(method="delta", adapter_start=0.34), 2, 3, None, None).terms
    assert delta[1] == [Term((), 1.0, 1.0)] and delta[2] == method_plan(SamplerSettings(method="delta"), 2, 3,
                                                                         None, None).terms[2]
    assert "base_steps" not in method_plan(SamplerSettings(method="merge"), 2, 8, None, None).info
    for bad, msg in (({"adapter_start": 1.0}, r"in \[0, 1\)"), ({"adapter_start": -0.1}, r"in \[0, 1\)"),
                     ({"method": "cmlora", "adapter_start": 0.2}, "does not apply to cmlora")):
        with pytest.raises(ValueError, match=msg):
            SamplerSettings(**bad).check()


def test_a_start_past_every_step_is_the_base_and_a_later_one_differs(tmp_path, sd1_pipe):
    pipe = copy.deepcopy(sd1_pipe)
    files = [save_adapter(random_adapter(pipe, seed=k, text_encoder=True, std=0.2), tmp_path / f"a{k}.safetensors")
             for k in range(2)]
    ads = load_adapters(pipe, files, [0.8, 0.8])

    def latents(adapters, start):
        st = SamplerSettings(method="merge", steps=3, cfg=4.0, adapter_start=start)
        return generate(pipe, adapters, st, "a cat", "", [3], output_type="latent")[0]

    base, merged = latents([], 0.0), latents(ads, 0.0)
    assert (latents(ads, 0.9) == base).all()  # every step before the start: the base's image, bit for bit
    late = latents(ads, 0.5)  # steps 0 and 1 base, step 2 merged
    assert (late - base).abs().max() > 1e-3 and (late - merged).abs().max() > 1e-3
