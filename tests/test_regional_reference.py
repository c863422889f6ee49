"""Regional sampling against Mix-of-Show's regional T2I-Adapter sampler, re-implemented here in a few lines.

The re-implementation follows the original's behaviour, not lorakit's code: cells fully inside a box
(``ceil(start * n)`` to ``floor(end * n)``); the global prompt's attention output outside every box; inside, the sum
of each box's attention output divided by the number of boxes covering the cell, before ``to_out``; the adapter's
features multiplied by a map (the global weight, each weight box set to its weight), the same features for the
unconditional and conditional rows, added inside the UNet's down blocks; plain CFG with the pipeline's scheduler.
"""

import copy
import math

import numpy as np
import torch
from PIL import Image

from lorakit.sampling import SamplerSettings, generate
from lorakit.sampling.conditions import Condition
from lorakit.sampling.regional import Region, RegionSpec


class RefRegionProcessor:
    """Cross-attention as the original's region rewrite computes it (one layer)."""

    def __init__(self, regions):  # regions: [(text features [2B, L, D], (top, left, bottom, right) fractions)]
        self.regions = regions

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        def attend(ctx, query):  # noqa: E306
            k, v = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
            return (torch.einsum("bqc,bnc->bqn", query, k) * attn.scale).softmax(-1) @ v
        out = attend(encoder_hidden_states, q)
        side = int(math.isqrt(q.shape[1]))  # square latents in this test
        cells = lambda a, b: (math.ceil(a * side), math.floor(b * side))  # noqa: E731
        count = torch.zeros(side, side)
        for _, (t, l, b, r) in self.regions:
            (r0, r1), (c0, c1) = cells(t, b), cells(l, r)
            count[r0:r1, c0:c1] += 1
        out = out.reshape(out.shape[0], side, side, -1)
        new = torch.where((count > 0)[None, :, :, None], torch.zeros_like(out), out)
        qg = q.reshape(q.shape[0], side, side, -1)
        for ctx, (t, l, b, r) in self.regions:
            (r0, r1), (c0, c1) = cells(t, b), cells(l, r)
            if r1 <= r0 or c1 <= c0:
                continue  # the original's einsum over an empty slice adds nothing
            part = attend(ctx, qg[:, r0:r1, c0:c1].reshape(q.shape[0], -1, q.shape[-1]))
            new[:, r0:r1, c0:c1] += part.reshape(q.shape[0], r1 - r0, c1 - c0, -1) / count[r0:r1, c0:c1, None]
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(new.reshape(q.shape[0], side * side, -1))))


@torch.no_grad()
def reference_regional(pipe, adapter, sketch, weight, weight_boxes, prompt, regions, steps, cfg, seed):
    """Final latents of the original's sampler: ``regions`` [(prompt, box)], ``weight_boxes`` [(box, weight)]."""
    def embed(text):  # noqa: E306
        ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]
    ctx = torch.cat([embed(""), embed(prompt)])
    region_list = [(torch.cat([embed(""), embed(p)]), box) for p, box in regions]
    pipe.unet.set_attn_processor({n: RefRegionProcessor(region_list) if n.endswith("attn2.processor") else p
                                  for n, p in pipe.unet.attn_processors.items()})
    x = torch.from_numpy(np.asarray(sketch, np.float32) / 255.0)[None, None]
    state = []
    for f in adapter(x):
        m = weight * torch.ones(f.shape[2:])
        for (t, l, b, r), w in weight_boxes:
            h, wd = f.shape[2:]
            m[math.ceil(t * h):math.floor(b * h), math.ceil(l * wd):math.floor(r * wd)] = w
        state.append(torch.cat([m * f] * 2))
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        inp = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = pipe.unet(inp, t, encoder_hidden_states=ctx, down_intrablock_additional_residuals=[s.clone() for s in state]).sample
        u, c = eps.chunk(2)
        latents = pipe.scheduler.step(u + cfg * (c - u), t, latents).prev_sample
    return latents


def test_regional_with_adapter_matches_reference(sd1_pipe):
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=1, channels=list(sd1_pipe.unet.config.block_out_channels), num_res_blocks=1,
                         downscale_factor=2).eval()
    sketch = Image.fromarray((np.random.default_rng(0).random((32, 32)) > 0.5).astype(np.uint8) * 255, "L")
    # boxes off the latent grid and overlapping; a weight box off the grid too
    boxes = [(0.03, 0.05, 0.97, 0.6), (0.2, 0.45, 0.9, 0.98)]
    prompts = ["a red cat", "a green dog"]
    weight_boxes = [((0.0, 0.5, 0.7, 1.0), 0.3)]
    pipe = copy.deepcopy(sd1_pipe)
    ours, _ = generate(pipe, [], SamplerSettings(steps=4, cfg=5.0), "", "", [7],
                       regions=RegionSpec("a blue bird", "", [Region(b, p, "") for b, p in zip(boxes, prompts)]),
                       conditions=[Condition(adapter, sketch, 0.8, weight_boxes)], output_type="latent")
    ref = reference_regional(copy.deepcopy(sd1_pipe), adapter, sketch, 0.8, weight_boxes, "a blue bird",
                             list(zip(prompts, boxes)), 4, 5.0, 7)
    assert (ours - ref).abs().max() < 1e-4
    plain, _ = generate(copy.deepcopy(sd1_pipe), [], SamplerSettings(steps=4, cfg=5.0), "a blue bird", "", [7],
                        output_type="latent")
    assert (ref - plain).abs().max() > 1e-2  # regions and adapter both matter here
    centre, _ = generate(copy.deepcopy(sd1_pipe), [], SamplerSettings(steps=4, cfg=5.0), "", "", [7],
                         regions=RegionSpec("a blue bird", "", [Region(b, p, "") for b, p in zip(boxes, prompts)],
                                            box_rounding="center"),
                         conditions=[Condition(adapter, sketch, 0.8, weight_boxes)], output_type="latent")
    assert (centre - ref).abs().max() > 1e-3  # the other rounding is a different sampler
