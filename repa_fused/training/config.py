"""SimpleTuner's ``crepa_*`` (REPA, DiTs) and ``urepa_*`` (U-REPA, UNets) keys -> validated dataclasses.

A config is a dict, a JSON (or TOML) file, or parsed argparse flags. Keys are SimpleTuner's, with its
defaults; keys without a ``crepa_``/``urepa_`` prefix are ignored, so a whole SimpleTuner ``config.json``
(its ``--key`` spelling included) loads as is. A value of ``None`` means "not set" (the default applies);
any other value, 0 included, is taken as given.

    repa, urepa = load_config({"crepa_enabled": True, "crepa_block_index": 8})
    parser = argparse.ArgumentParser(); add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Union

PREFIXES = ("crepa_", "urepa_", "irepa_")  # irepa_*: SimpleTuner's, unprefixed, for whichever is enabled
SCHEDULERS = ("constant", "linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")
PROJECTORS = ("linear", "mlp")
ASPECTS = ("square", "preserve")


def _key(text: str, *, choices: tuple = (), check=None, rule: str = "", aliases: tuple = (),
         optional: bool = False, shared: bool = False):
    """Field metadata: help text, allowed values or a range check with its wording, alias key suffixes;
    ``shared``: the key is the field name itself, one key for both regularizers (SimpleTuner's irepa_*)."""
    return dict(help=text, choices=choices, check=check, rule=rule, aliases=aliases, optional=optional,
                shared=shared)


def _nonneg(v):
    return v >= 0


@dataclass
class _AlignmentConfig:
    """Keys shared by REPA and U-REPA; the field name is the key without its prefix (``lambda_`` -> lambda)."""

    PREFIX = ""  # set by the subclasses: "crepa_" or "urepa_"

    enabled: bool = field(default=False, metadata=_key("turn the regularizer on"))
    lambda_: float = field(default=0.5, metadata=_key(
        "weight λ of the alignment loss added to the diffusion loss (0 = never computed)",
        check=_nonneg, rule="must be ≥ 0"))
    model: str = field(default="dinov2_vitg14", metadata=_key(
        "vision encoder: dinov2_vit{s,b,l,g}14[_reg], a SimpleTuner alias, a hub id or a local directory"))
    encoder_image_size: int = field(default=518, metadata=_key(
        "side the encoder input is resized to (pixels)", check=lambda v: v > 0, rule="must be > 0"))
    encoder_aspect: str = field(default="square", metadata=_key(
        "encoder resize: square (S×S, as SimpleTuner) or preserve (aspect kept, about S² pixels)",
        choices=ASPECTS))
    use_tae: bool = field(default=False, metadata=_key(
        "latents= inputs are decoded with a tiny autoencoder (AutoencoderTiny) passed as vae="))
    feature_cache: Optional[str] = field(default=None, metadata=_key(
        "directory of a feature cache (repa-fused cache-features); reg.loss(keys=...) then reads encoder "
        "features from it and never loads the encoder or the VAE", optional=True))
    projector: str = field(default="linear", metadata=_key(
        "projector head: linear (LayerNorm + Linear, as SimpleTuner) or mlp (REPA's 3-layer SiLU MLP)",
        choices=PROJECTORS))
    projector_dim: int = field(default=2048, metadata=_key(
        "hidden width of the mlp projector", check=lambda v: v > 0, rule="must be > 0"))
    scheduler: str = field(default="constant", metadata=_key(
        "shape of λ after warmup: constant, or a decay from λ to lambda_end", choices=SCHEDULERS))
    warmup_steps: int = field(default=0, metadata=_key(
        "steps over which λ ramps linearly from 0", check=_nonneg, rule="must be ≥ 0"))
    decay_steps: int = field(default=0, metadata=_key(
        "step at which the decay reaches lambda_end (counted from 0, warmup included); 0 = max_train_steps",
        check=_nonneg, rule="must be ≥ 0"))
    lambda_end: float = field(default=0.0, metadata=_key(
        "λ at the end of the decay", check=_nonneg, rule="must be ≥ 0"))
    power: float = field(default=1.0, metadata=_key(
        "exponent of the polynomial decay", check=lambda v: v > 0, rule="must be > 0"))
    cutoff_step: int = field(default=0, metadata=_key(
        "from this step on, λ = 0 (0 = no step cutoff)", check=_nonneg, rule="must be ≥ 0"))
    similarity_threshold: Optional[float] = field(default=None, metadata=_key(
        "λ = 0 once the EMA of the cosine similarity reaches this value (unset = never)",
        check=lambda v: -1 <= v <= 1, rule="must be in [-1, 1]", optional=True))
    similarity_ema_decay: float = field(default=0.99, metadata=_key(
        "decay of that EMA (0.99 ≈ a 100-step window; 0 = no smoothing)",
        check=lambda v: 0 <= v <= 1, rule="must be in [0, 1]"))
    threshold_mode: str = field(default="permanent", metadata=_key(
        "permanent: the similarity cutoff never lifts; recoverable: λ returns when the EMA drops below",
        choices=THRESHOLD_MODES))
    irepa_enabled: bool = field(default=False, metadata=_key(
        "iREPA: z-score the encoder features per channel over the tokens and project with a Conv2d over "
        "the hidden token grid (applies to the enabled one of crepa_* / urepa_*)", shared=True))
    irepa_spatial_norm_alpha: float = field(default=0.6, metadata=_key(
        "iREPA: share α of the spatial mean removed, (y − α·mean) / (std + 1e-6); 1 removes it all",
        check=lambda v: 0 <= v <= 1, rule="must be in [0, 1]", shared=True))
    irepa_projector_kernel_size: int = field(default=3, metadata=_key(
        "iREPA: kernel size k of the Conv2d projector (padding k // 2)",
        check=lambda v: v >= 1 and v % 2 == 1, rule="must be an odd int ≥ 1", shared=True))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(self.PREFIX, f, getattr(self, f.name)))

    def to_dict(self) -> dict:
        """{key: value} with the full prefixed key names; load_config(cfg.to_dict()) gives back ``cfg``."""
        return {_full_key(self.PREFIX, f): getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class RepaConfig(_AlignmentConfig):
    """REPA for DiTs: ``crepa_*`` keys."""

    PREFIX = "crepa_"

    block_index: int = field(default=8, metadata=_key(
        "DiT block whose output is aligned (0-based; Flux-like models count double then single blocks)",
        check=_nonneg, rule="must be ≥ 0"))
    spatial_align: bool = field(default=True, metadata=_key(
        "true: bilinear resampling to the smaller token grid; false: when the grids differ, compare "
        "mean-pooled tokens instead (as SimpleTuner)"))
    encoder_frames_batch_size: int = field(default=-1, metadata=_key(
        "images per encoder forward (bounds memory); ≤ 0 = the whole batch at once"))


@dataclass
class URepaConfig(_AlignmentConfig):
    """U-REPA for UNets (mid block): ``urepa_*`` keys."""

    PREFIX = "urepa_"

    manifold_weight: float = field(default=3.0, metadata=_key(
        "weight w of the manifold term: loss = alignment + w · manifold", check=_nonneg, rule="must be ≥ 0"))
    align: str = field(default="min", metadata=_key(
        "token grid the losses compare on: min (the smaller, as SimpleTuner), y (the encoder's: upsample "
        "the UNet features, as the U-REPA paper), h (the UNet's)", choices=("min", "y", "h")))
    manifold_pairs: str = field(default="tokens", metadata=_key(
        "pairs of the manifold term: tokens (token pairs within each image, as SimpleTuner), samples "
        "(between the images' mean tokens) or batch (all tokens of the batch)",
        choices=("tokens", "samples", "batch")))


# SimpleTuner's legacy spelling of the encoder key.
_ALIASES = {"crepa_encoder": "crepa_model"}

# SimpleTuner keys for video CREPA: they have no effect on one image (a single frame has no neighbours),
# so a SimpleTuner config that sets them loads, with a warning naming each.
INERT_KEYS = frozenset({
    "crepa_adjacent_distance", "crepa_adjacent_tau", "crepa_cumulative_neighbors", "crepa_normalize_by_frames",
    "crepa_normalize_neighbour_sum", "crepa_drop_vae_encoder", "crepa_self_flow_mask_ratio",
})

# SimpleTuner keys that select a teacher other than an external encoder: only the encoder one is supported.
_UNSUPPORTED = {
    "crepa_use_backbone_features": (False,),
    "crepa_self_flow": (False,),
    "crepa_feature_source": ("encoder",),
    "crepa_teacher_block_index": (),  # only meaningful with the two above
}


class Config(NamedTuple):
    """Both regularizers' settings, as loaded; at most one may be enabled for one model."""

    repa: RepaConfig
    urepa: URepaConfig

    def to_dict(self) -> dict:
        return {**self.repa.to_dict(), **self.urepa.to_dict()}


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _suffix(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")


def _full_key(prefix: str, f: dataclasses.Field) -> str:
    return _suffix(f) if f.metadata["shared"] else prefix + _suffix(f)


def _type_name(f: dataclasses.Field) -> str:
    return _base_type(f).__name__


def _base_type(f: dataclasses.Field) -> type:
    # Annotations are strings here (postponed evaluation): "float" or "Optional[float]".
    return _TYPES[f.type.removeprefix("Optional[").removesuffix("]")]


def _checked(prefix: str, f: dataclasses.Field, value):
    """``value`` validated for field ``f`` (a float field turns an int into float); errors name the key."""
    key, meta, typ = _full_key(prefix, f), f.metadata, _base_type(f)
    if value is None:
        if meta["optional"]:
            return None
        raise ValueError(f"{key} must be set (got None)")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not typ:
        raise TypeError(f"{key} must be of type {_type_name(f)}, got {type(value).__name__} {value!r}")
    if typ is float and not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value}")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{key} must be one of {list(meta['choices'])}, got {value!r}")
    if meta["check"] is not None and not meta["check"](value):
        raise ValueError(f"{key} {meta['rule']}, got {value!r}")
    return value


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {_full_key(cls.PREFIX, f): f for f in dataclasses.fields(cls)}


def known_keys() -> list[str]:
    """Every accepted key: the two dataclasses' keys, SimpleTuner's aliases and its inert video keys."""
    return sorted([*_fields(RepaConfig), *_fields(URepaConfig), *_ALIASES, *INERT_KEYS, *_UNSUPPORTED])


def _read(source) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, argparse.Namespace):  # a trainer's parsed flags; unset ones are None
        return vars(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            raise IsADirectoryError(f"config file {path!r} is a directory: pass the JSON or TOML file in it")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path, "rb") as fh:
            if path.endswith(".toml"):
                import tomllib

                try:
                    data = tomllib.load(fh)
                except tomllib.TOMLDecodeError as e:
                    raise ValueError(f"config file {path!r} is not valid TOML: {e}") from None
            else:
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as e:
                    raise ValueError(f"config file {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a JSON object, got {type(data).__name__}")
        return data
    raise TypeError(f"config must be a dict, an argparse Namespace or a path to a JSON/TOML file, got "
                    f"{type(source).__name__}")


def load_config(source: Union[Mapping[str, Any], str, os.PathLike, argparse.Namespace, Config, None] = None
                ) -> Config:
    """``Config(repa, urepa)`` from a dict, a JSON/TOML path, an argparse Namespace (flags left at None are
    unset) or a Config; unset keys get SimpleTuner's defaults.

    Raises ValueError for an unknown ``crepa_``/``urepa_`` key (naming the nearest valid one) or a value out
    of range, TypeError for a value of the wrong type; both name the key.
    """
    if isinstance(source, Config):
        return source
    raw = {} if source is None else _read(source)
    given: dict[str, Any] = {}
    for name, value in raw.items():
        key = name.lstrip("-") if isinstance(name, str) else name
        if not isinstance(key, str):
            continue
        if not key.startswith(PREFIXES):
            if key.lower().replace("-", "_").startswith(PREFIXES):
                raise ValueError(f"config key {name!r} is spelled {key.lower().replace('-', '_')!r} here: keys "
                                 "are lower case with underscores (a dash or capital would leave it unread)")
            continue  # other trainer settings share the file
        if value is None:
            continue
        if key in INERT_KEYS:
            warnings.warn(f"{key}={value!r} is a video-CREPA setting with no effect on single images: ignored",
                          stacklevel=2)
            continue
        if key in _UNSUPPORTED:
            if value not in _UNSUPPORTED[key]:
                raise ValueError(f"{key}={value!r} is not supported: repa_fused aligns to an external vision "
                                 f"encoder only (leave {key} unset)")
            continue
        canonical = _ALIASES.get(key, key)
        if canonical in given and given[canonical][1] != value:
            raise ValueError(f"{given[canonical][0]}={given[canonical][1]!r} and {key}={value!r} name the same "
                             f"setting with different values; keep one")
        if canonical not in _fields(RepaConfig) and canonical not in _fields(URepaConfig):
            near = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
        given[canonical] = (key, value)
    # SimpleTuner's U-REPA reads the encoder from crepa_model when urepa_model is unset.
    if "urepa_model" not in given and "crepa_model" in given:
        given["urepa_model"] = given["crepa_model"]
    out = []
    for cls in (RepaConfig, URepaConfig):
        kwargs = {f.name: given[key][1] for key, f in _fields(cls).items() if key in given}
        out.append(cls(**kwargs))
    return Config(*out)


def _str2bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _optional_float(text: str) -> Optional[float]:
    return None if text.strip().lower() in ("none", "null", "") else float(text)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add every key as a ``--crepa_*`` / ``--urepa_*`` flag (default None = unset); returns the group.

    Booleans take an optional value (``--crepa_enabled`` or ``--crepa_enabled false``). Turn the parsed
    namespace back into a config with :func:`config_from_args`.
    """
    group = parser.add_argument_group("representation alignment (REPA / U-REPA)")
    for cls in (RepaConfig, URepaConfig):
        for key, f in _fields(cls).items():
            if cls is URepaConfig and f.metadata["shared"]:
                continue  # one flag for a shared key
            typ, meta = _base_type(f), f.metadata
            kwargs = dict(default=None, help=f"{meta['help']} (default: {f.default})")
            if typ is bool:
                kwargs.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
            elif meta["optional"] and typ is float:
                kwargs.update(type=_optional_float)
            else:
                kwargs.update(type=typ)
            if meta["choices"]:
                kwargs["choices"] = list(meta["choices"])
            names = [f"--{key}"] + [f"--{a}" for a, target in _ALIASES.items() if target == key]
            group.add_argument(*names, dest=key, **kwargs)
    return group


def config_from_args(args: argparse.Namespace, base: Union[Mapping[str, Any], str, os.PathLike, None] = None
                     ) -> Config:
    """The Config of a namespace parsed with :func:`add_config_arguments`: the flags given (not None) over
    ``base`` (a dict or a JSON/TOML path, as :func:`load_config` takes; e.g. the trainer's config file)."""
    raw = {} if base is None else _read(base)
    merged = {_ALIASES.get(k.lstrip("-"), k.lstrip("-")) if isinstance(k, str) else k: v for k, v in raw.items()}
    merged.update({k: v for k, v in vars(args).items() if k.startswith(PREFIXES) and v is not None})
    return load_config(merged)


def key_table() -> str:
    """The README's key table (markdown): key, type, default, meaning."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for cls in (RepaConfig, URepaConfig):
        for key, f in _fields(cls).items():
            if cls is URepaConfig and f.metadata["shared"]:
                continue  # one row for a shared key
            default = "unset" if f.default is None else json.dumps(f.default)
            alias = [a for a, t in _ALIASES.items() if t == key]
            meaning = f.metadata["help"] + (f" (alias: `{alias[0]}`)" if alias else "")
            rows.append(f"| `{key}` | {_type_name(f)} | `{default}` | {meaning} |")
    return "\n".join(rows)
