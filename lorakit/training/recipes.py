"""The recipes' schemas: every key a training recipe takes, with its default.

Plain dataclasses without torch, so ``train_*.py --help`` lists the keys at once; the trainers
(:mod:`lorakit.training.blockwise`, :mod:`~lorakit.training.edlora`, :mod:`~lorakit.training.lorarar`) import them
from here. ``lorakit.config.load_config`` fills them from YAML + ``key=value`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.config import DataConfig, NetworkConfig


@dataclass
class TrainConfig:
    """Keys every lorakit training recipe accepts (YAML or ``key=value`` overrides).

    Trainers subclass this dataclass and add their own keys (``network``, ...).
    """

    base_model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "output"
    output_name: str = "lora"
    max_steps: int = 1000
    seed: int = 0
    train_batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # default: learning_rate
    optimizer: str = "adamw"  # adamw | adamw8bit
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"  # any diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ...
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500  # 0 = no checkpoints (unless checkpoint_at_end: true, or stop_at_step)
    # None: a checkpoint at the end when checkpointing_steps > 0 or the run stops early (stop_at_step)
    checkpoint_at_end: bool | None = None
    checkpoints_total_limit: int | None = 3
    resume: str | None = None  # latest | <path to checkpoint-N>
    overwrite: bool = False  # start afresh in an output_dir holding an earlier run (its checkpoints are removed)
    stop_at_step: int = 0  # >0: end this run early at that step (checkpoint + step artifact), resume later
    save_every: int = 0  # 0 = only the final artifact
    sample_every: int = 0  # 0 = never
    sample_prompts: list[str] = field(default_factory=list)
    sample_num_inference_steps: int = 25
    sample_guidance_scale: float = 7.0
    sample_seed: int = 0
    logging: str = "tensorboard"  # tensorboard | none
    log_every: int = 1
    dataloader_num_workers: int = 0
    memory_check: bool = True  # refuse to start when lorakit.memory's estimate exceeds the free RAM / VRAM


@dataclass
class BlockwiseConfig(TrainConfig):
    """Config of ``train_blockwise.py``: the shared keys (:class:`TrainConfig`) plus these."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    trigger: str = ""  # recorded in metadata (lorakit.trigger)
    prediction_type: str | None = None  # epsilon | v_prediction; default: the base scheduler's
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the paper's value
    save_precision: str = "fp32"  # fp32 | fp16 | bf16 (adapter file dtype)
    channels_last: bool = False
    compile: bool = False  # torch.compile the UNet (GPU)
    sample_resolution: int | None = None  # default: data.resolution


@dataclass
class ConceptConfig:
    """``concept.*``: the pseudo-words, the class word for the second one, the caption placeholder."""

    name: str = ""  # default: the first pseudo-word without <>
    tokens: str = "<concept1> <concept2>"  # two new pseudo-words
    init_word: str = ""  # class word (one token) that initialises the second pseudo-word, e.g. cat, man
    placeholder: str = "<TOK>"  # replaced by the pseudo-words in every caption
    init_std: float = 0.013  # std of the first pseudo-word's random init


@dataclass
class EDLoRANetwork:
    """``network.*``: LoRA rank/alpha (text encoder and UNet attention)."""

    rank: int = 4
    alpha: float = 4.0  # scale alpha / rank = 1, as the reference's LoRA
    text_encoder_rank: int = 4
    text_encoder_alpha: float = 4.0
    train_text_encoder: bool = True


@dataclass
class EDLoRAConfig(TrainConfig):
    """Config of ``train_edlora.py``: the shared keys (:class:`TrainConfig`) plus these."""

    concept: ConceptConfig = field(default_factory=ConceptConfig)
    network: EDLoRANetwork = field(default_factory=EDLoRANetwork)
    output_name: str = "edlora"
    learning_rate: float = 1e-4  # UNet LoRA
    text_encoder_lr: float | None = 1e-5  # text-encoder LoRA
    embedding_lr: float = 1e-3  # the new token rows
    lr_scheduler: str = "linear"
    noise_offset: float = 0.01
    prediction_type: str | None = None  # epsilon | v_prediction; default: the base scheduler's
    mask_path: str | None = None  # folder of masks, same stems as the images
    masked_loss: bool = False
    attn_reg_weight: float = 0.0  # 0.01 in the paper (needs masks)
    save_precision: str = "fp32"
    sample_resolution: int | None = None


@dataclass
class SyntheticConfig:
    """Random LoRAs on the base (``lorakit.testing.random_adapter``) for tests and the CPU toy recipe."""

    content: int = 0  # how many random content LoRAs (blocks: content_blocks)
    style: int = 0  # how many random style LoRAs (blocks: style_blocks)
    eval_pairs: int = 0  # extra held-out (content, style) pairs, used only for the end-of-run evaluation
    rank: int = 4
    alpha: float = 4.0
    content_blocks: str = "all"
    style_blocks: str = "upper"
    std: float = 0.3
    images: str = "random"  # random (noise images) | generate (images made with each LoRA alone)


@dataclass
class LoraRarConfig(TrainConfig):
    """Config of ``train_lorarar.py``: the shared keys (:class:`TrainConfig`) plus these."""

    content: list[Any] = field(default_factory=list)  # paths / globs / {path, images, prompt}
    style: list[Any] = field(default_factory=list)
    eval_pairs: list[Any] = field(default_factory=list)  # [[content, style], ...]: held-out pairs to report
    merge_layers: list[str] = field(default_factory=lambda: ["to_q", "to_out.0"])  # others both touch: summed
    hidden: int = 128
    column_norm: str = "layer_rms"  # layer_rms | none
    init_scale: float = 0.1
    lam: float = 0.01  # weight of sum_layers |cos(m_c dW_c, m_s dW_s)|
    ref_batch_size: int = 1  # noisy reference latents per LoRA per pair sample
    num_ref_images: int = 4
    reference_size: int = 0  # pixels; 0 = the base's native resolution
    generate_steps: int = 20  # sampling steps for generated references
    eval_batches: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    output_name: str = "lorarar_hypernet"
    learning_rate: float = 0.01
    adam_weight_decay: float = 0.0
