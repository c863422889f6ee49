"""Configs: OmegaConf structured configs from dataclasses, loaded from YAML plus ``key=value`` overrides.

An unknown key anywhere (YAML or override) is an error that names the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class NetworkConfig:
    """Which modules get an adapter, and how big.

    ``blocks``: any block spec of :mod:`lorakit.blocks` (preset, mapping, kohya 25/19 vector, LBW 17/12 vector).
    """

    type: str = "lora"  # lora | locon
    rank: int = 4
    alpha: float = 4.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    blocks: Any = "all"
    # None: every module of the network type in the selected blocks; else a list of module-name suffixes (peft's
    # target_modules rule), e.g. [attn2.to_k, attn2.to_v]: Custom Diffusion's cross-attention keys and values only
    target_modules: Any = None
    dropout: float = 0.0
    # > 0: after training, the cross-attention key / value layers keep their change on the training captions and
    # drop it on data.reg_path's captions, with this weight on the second (lorakit.training.kv_prior); 0 = off
    kv_reg_strength: float = 0.0
    train_text_encoder: bool = False
    text_encoder_rank: int = 4
    text_encoder_alpha: float = 4.0


@dataclass
class DataConfig:
    """``data.*`` keys of every training recipe.

    ``path``: a folder of images with same-name ``.txt`` captions, or a ``datasets`` imagefolder with
    ``metadata.jsonl`` (``file_name`` + ``text``/``caption`` columns).
    """

    path: str = ""
    caption_extension: str = ".txt"
    default_caption: str = ""  # used for images without a caption
    repeats: int = 1
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    shuffle_tags: bool = False  # shuffle comma-separated tags ...
    keep_tokens: int = 0  # ... keeping the first N tags in place
    caption_dropout: float = 0.0  # probability of an empty caption
    buckets: bool = False  # aspect-ratio buckets
    bucket_min: int = 256
    bucket_max: int = 1024
    bucket_step: int = 64
    reg_path: str | None = None  # regularisation (prior-preservation) images
    reg_weight: float = 1.0
    reg_repeats: int = 1
    cache_latents: bool = False
    cache_dir: str | None = None  # default: <output_dir>/latent_cache
    on_bad_image: str = "error"  # error | skip


def _valid_keys(schema_node) -> list[str]:
    if isinstance(schema_node, DictConfig):
        return [str(k) for k in schema_node.keys()]
    return []


def _unknown_key_error(schema: DictConfig, dotted: str, source: str) -> ConfigError:
    parts = dotted.split(".")
    node = schema
    for i, part in enumerate(parts):
        keys = _valid_keys(node)
        if part not in keys:
            prefix = ".".join(parts[:i])
            near = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + near[0]!r}?" if near else ""
            valid = ", ".join(keys)
            return ConfigError(f"{source}: unknown config key {dotted!r}{hint} (valid keys here: {valid})")
        node = node[part]
    return ConfigError(f"{source}: invalid config key {dotted!r}")


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.endswith("blocks"):
            out += _flatten(v, key + ".")
        else:
            out.append(key)
    return out


def load_config(schema_cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None):
    """Load a config: schema defaults <- YAML file <- ``key=value`` overrides.

    Args:
        schema_cls: a dataclass describing every valid key.
        path: a YAML file, or None for defaults only.
        overrides: dotlist strings such as ``["max_steps=100", "network.rank=8"]``.
    Returns:
        A ``DictConfig`` (typed, read-only keys) for the resolved config.
    Raises:
        ConfigError naming the file/override, the bad key and the closest valid key, or a bad value's type.
    """
    schema = OmegaConf.structured(schema_cls)
    cfg = schema
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
        raw = OmegaConf.to_container(loaded)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        _check_keys(schema, raw, str(path))
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except ValidationError as err:
            raise ConfigError(f"{path}: bad value for {err.full_key!r}: {err.msg}") from err
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip().lstrip("+")
        _check_keys(schema, _nest(key), f"override {item!r}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except ValidationError as err:
            raise ConfigError(f"override {item!r}: bad value for {err.full_key!r}: {err.msg}") from err
        except (ConfigKeyError, ConfigAttributeError) as err:
            raise _unknown_key_error(schema, key, f"override {item!r}") from err
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]} (quote the value?)") from None
    try:  # resolve every interpolation now: a missing environment variable is named before any work starts
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{path or 'config'}: cannot resolve {key or 'a value'}: {str(err).splitlines()[0]}") from None
    return cfg


def _nest(dotted: str) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = None
    return out


def _check_keys(schema: DictConfig, raw: dict, source: str) -> None:
    for key in _flatten(raw):
        node = schema
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node:
                raise _unknown_key_error(schema, key, source)
            if OmegaConf.is_missing(node, part) or node._get_node(part)._is_none():
                break
            child = node[part]
            if not isinstance(child, DictConfig):
                break
            node = child


def to_dict(cfg) -> dict:
    """A resolved config as a plain dict, for metadata, checkpoints and logs.

    Values that come from the environment (``${oc.env:HF_TOKEN}``, also through another key or inside a longer
    string) stay as the unresolved interpolation: a secret given through the environment never lands in a file.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    raw = OmegaConf.to_container(cfg, resolve=False)
    secrets: set[str] = set()
    _env_values(resolved, raw, secrets)
    return _keep_unresolved(resolved, raw, secrets)


def _from_env(raw) -> bool:
    return isinstance(raw, str) and "${" in raw and "env:" in raw


def _env_values(resolved, raw, out: set) -> None:
    if isinstance(resolved, dict) and isinstance(raw, dict):
        for k in resolved:
            _env_values(resolved[k], raw.get(k), out)
    elif isinstance(resolved, list) and isinstance(raw, list):
        for a, b in zip(resolved, raw):
            _env_values(a, b, out)
    elif _from_env(raw) and resolved not in (None, ""):
        out.add(str(resolved))


def _keep_unresolved(resolved, raw, secrets: set):
    if isinstance(resolved, dict) and isinstance(raw, dict):
        return {k: _keep_unresolved(v, raw.get(k), secrets) for k, v in resolved.items()}
    if isinstance(resolved, list) and isinstance(raw, list) and len(raw) == len(resolved):
        return [_keep_unresolved(a, b, secrets) for a, b in zip(resolved, raw)]
    if isinstance(raw, str) and "${" in raw:
        if _from_env(raw) or any(s in str(resolved) for s in secrets):
            return raw
    return resolved


def schema_defaults(schema_cls, prefix: str = "") -> list[tuple[str, Any]]:
    """``[(dotted key, default)]`` of a dataclass schema, nested sections flattened (for ``--help`` text)."""
    out = []
    for f in fields(schema_cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            out += schema_defaults(type(default), prefix + f.name + ".")
        else:
            out.append((prefix + f.name, default))
    return out


def schema_keys(schema_cls, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema."""
    return [key for key, _ in schema_defaults(schema_cls, prefix)]


__all__ = ["ConfigError", "NetworkConfig", "load_config", "to_dict", "schema_keys", "schema_defaults", "field"]
