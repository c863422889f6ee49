"""Time lorakit's SAI-name resolution (through diffusers' converter) on every LoRA-able layer of a full-size SDXL UNet
(built on the meta device). Prints one JSON line."""
import time, json, torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from lorakit.adapters.keys import sai_unet_path, sai_names_to_module_keys
cfg = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
           transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
           projection_class_embeddings_input_dim=2816)
with init_empty_weights():
    unet = UNet2DConditionModel(**cfg)
paths = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (".attentions." in n or ".resnets." in n or "samplers" in n)]
names = ["lora_unet_" + sai_unet_path(p, "sdxl").replace(".", "_") for p in paths]
t = time.perf_counter(); out = sai_names_to_module_keys(names); dt = time.perf_counter() - t
print(json.dumps({"bench": "sai_names_to_module_keys", "layers": len(names), "seconds": round(dt, 3),
                  "all_round_trip": all(out[n] == "unet." + p for n, p in zip(names, paths))}))
