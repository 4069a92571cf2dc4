"""REPA (DiTs) and U-REPA (UNets) regularizers for any training loop, driven by SimpleTuner's keys.

    reg = build_regularizer("config.json", model, max_train_steps=10_000)   # before the optimizer/prepare
    pred = model(noisy, t, ...)                       # the hook stores block k's / mid_block's output
    loss, logs = reg.loss(step=step, pixels=images)   # images in [-1, 1]; or latents=, vae= / features= / keys=
    (diffusion_loss + loss).backward()

One ``reg.loss`` call: pop the captured tokens h (B, N_h, C) -> projector (registered on the model, so
optimizers, DDP and ``state_dict`` see it) -> encoder features y (B, N_y, D) from pixels, decoded latents, the
caller or a feature cache, under no_grad -> the public loss (``cosine_alignment_loss`` for REPA,
``urepa_loss`` for U-REPA) -> times λ(step). When λ(step) is 0 nothing of that runs: the loss returned is
0 · Σ(projector parameters), so every rank's backward still reaches the projector and DDP's gradient sync
keeps working. Logs are tensors (no host sync per step); ``float(v)`` them when you log.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import functional, irepa
from .capture import attach_capture
from .config import Config, RepaConfig, URepaConfig, load_config
from .schedule import CoefficientSchedule

Grid = tuple[int, int]

# Patch-token width of the DINOv2 checkpoints, so the projector can be built before the encoder is loaded.
_DINOV2_WIDTH = {"small": 384, "base": 768, "large": 1024, "giant": 1536}


def build_projector(kind: str, in_width: int, out_width: int, hidden: int = 2048) -> nn.Module:
    """``"linear"``: LayerNorm(C) -> Linear(C, D) (SimpleTuner); ``"mlp"``: REPA's Linear(C, P) -> SiLU ->
    Linear(P, P) -> SiLU -> Linear(P, D). Maps (..., C) to (..., D)."""
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(in_width), nn.Linear(in_width, out_width))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                             nn.Linear(hidden, out_width))
    raise ValueError(f"projector must be 'linear' or 'mlp', got {kind!r}")


class AlignmentRegularizer:
    """Shared machinery of :class:`RepaRegularizer` and :class:`URepaRegularizer` (see the module doc).

    Attributes: ``config``, ``projector`` (nn.Module, also ``model.<PROJECTOR_ATTR>``), ``capture``,
    ``schedule``, ``encoder`` (None until first needed when not given), ``feature_cache`` (or None).
    """

    KIND = ""            # capture kind: "dit" | "unet"
    NAME = ""            # for messages
    PROJECTOR_ATTR = ""  # where the projector hangs on the model
    LOG_PREFIX = ""      # SimpleTuner's log names: crepa_* / urepa_*

    def __init__(self, config: Union[RepaConfig, URepaConfig], model: nn.Module, *, encoder=None,
                 max_train_steps: Optional[int] = None):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(f"build the {self.NAME} regularizer before wrapping the model (DDP, "
                             "accelerator.prepare): the projector must be registered on the bare model")
        model = getattr(model, "_orig_mod", model)  # torch.compile shares the module and its parameters
        self.config = config
        self.model = model
        self.schedule = CoefficientSchedule.from_config(config, max_train_steps)
        self.encoder = encoder
        self.feature_cache = _open_cache(config, encoder) if config.feature_cache else None
        width = _target_width(config, encoder, self.feature_cache)
        if getattr(model, self.PROJECTOR_ATTR, None) is not None:
            raise ValueError(f"the model already has a {self.PROJECTOR_ATTR}: a regularizer is attached; call "
                             "its remove() first")
        self.capture = attach_capture(model, self.KIND, self._block_index())
        param = next(model.parameters(), None)
        # float32 like SimpleTuner: the projector is trained from scratch, whatever the model's dtype.
        self.projector = (irepa.ConvProjector(self.capture.hidden_width, width, config.irepa_projector_kernel_size)
                          if config.irepa_enabled else
                          build_projector(config.projector, self.capture.hidden_width, width, config.projector_dim)).to(
            device=param.device if param is not None else None, dtype=torch.float32)
        model.add_module(self.PROJECTOR_ATTR, self.projector)
        self._removed = False

    def _block_index(self) -> Optional[int]:
        return None

    # -- the loss ---------------------------------------------------------------------------------------

    def loss(self, *, step: int, pixels: Optional[torch.Tensor] = None, latents: Optional[torch.Tensor] = None,
             vae: Optional[nn.Module] = None, features: Optional[torch.Tensor] = None,
             features_grid: Optional[Sequence[int]] = None,
             keys: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(λ(step) · alignment loss, logs) for the last model forward.

        Exactly one source of the clean image's features: ``pixels`` (B, 3, H, W) in [-1, 1]; ``latents``
        (B, C, h, w) with ``vae`` (AutoencoderKL, or AutoencoderTiny when ``*_use_tae``), decoded to pixels;
        ``features`` (B, N, D) encoder patch tokens you computed, or read from the ``*_feature_cache`` in your
        DataLoader's workers (``features_grid`` (H, W) when N is not a square; pinned ones are copied without
        blocking); ``keys`` (B names) looked up in the ``*_feature_cache`` here, in the step.
        """
        if self._removed:
            raise RuntimeError(f"this {self.NAME} regularizer was removed")
        self._check_sources(pixels, latents, vae, features, features_grid, keys)
        tokens, h_grid = self.capture.pop()  # always: the stored graph must not outlive this step
        weight = self.schedule.weight(step)
        if weight == 0.0:
            return self._skipped(step, tokens.device)
        y, y_grid = self._features(tokens, pixels, latents, vae, features, features_grid, keys)
        if self.config.irepa_enabled:  # z-score on the encoder's grid, before any grid alignment
            y = irepa.spatial_normalize(y, self.config.irepa_spatial_norm_alpha)
        x = tokens.to(self.projector[-1].weight.dtype)
        h = self.projector(x, h_grid) if self.config.irepa_enabled else self.projector(x)
        terms = self._terms(h, h_grid, y, y_grid)
        similarity = -terms["alignment_loss"].detach()
        gate = self.schedule.observe(similarity)
        scale = torch.full((), weight, device=h.device) if gate is None else weight * gate
        loss = terms.pop("total") * scale
        p = self.LOG_PREFIX
        logs = {f"{p}_loss": loss.detach(), **{f"{p}_{k}": v.detach() for k, v in terms.items()},
                f"{p}_similarity": similarity}
        return loss, self._finish_logs(logs, step, scale, h.device)

    def _terms(self, h, h_grid, y, y_grid) -> dict[str, torch.Tensor]:
        """{"total": unweighted loss, "alignment_loss": ..., (U-REPA) "manifold_loss": ...}."""
        raise NotImplementedError

    def _skipped(self, step: int, device) -> tuple[torch.Tensor, dict]:
        # Zero, yet reaching every trainable projector parameter: DDP then syncs their (zero) gradients.
        params = [p for p in self.projector.parameters() if p.requires_grad]
        loss = sum((q.sum() for q in params), torch.zeros((), device=device)) * 0.0
        logs = {f"{self.LOG_PREFIX}_loss": loss.detach()}
        return loss, self._finish_logs(logs, step, torch.zeros((), device=device), device)

    def _finish_logs(self, logs: dict, step: int, scale: torch.Tensor, device) -> dict:
        p = self.LOG_PREFIX
        cut = torch.full((), self.schedule.step_cutoff(step), dtype=torch.bool, device=device)
        if self.schedule.similarity_cutoff is not None:
            cut = cut | self.schedule.similarity_cutoff.to(device)
        logs[f"{p}_weight"] = scale.detach().float()
        logs[f"{p}_cutoff"] = cut
        if self.schedule.similarity_ema is not None:
            logs[f"{p}_similarity_ema"] = self.schedule.similarity_ema
        return logs

    # -- encoder features -------------------------------------------------------------------------------

    def _check_sources(self, pixels, latents, vae, features, features_grid, keys) -> None:
        given = [n for n, v in (("pixels", pixels), ("latents", latents), ("features", features), ("keys", keys))
                 if v is not None]
        if len(given) != 1:
            raise ValueError("pass exactly one of pixels=, latents= (with vae=), features= or keys= to "
                             f"reg.loss, got {given or 'none'}")
        if (vae is None) != (latents is None):
            raise ValueError("latents= and vae= go together: the VAE decodes the latents to pixels")
        if features_grid is not None and features is None:
            raise ValueError("features_grid= describes features=; it was given without them")
        p = self.config.PREFIX
        if keys is not None and self.feature_cache is None:
            raise ValueError(f"keys= reads the feature cache, but {p}feature_cache is not set")
        if self.feature_cache is not None and keys is None and features is None:
            raise ValueError(f"{p}feature_cache is set: pass keys= (the cached images' keys), or features= read "
                             "from the cache by your DataLoader, so that neither the encoder nor the VAE is ever "
                             "loaded")

    def _features(self, tokens, pixels, latents, vae, features, features_grid, keys) -> tuple[torch.Tensor, Grid]:
        batch, device = tokens.shape[0], tokens.device
        if keys is not None:
            y, y_grid = self.feature_cache.get(keys, device=device)
            source = "keys"
        elif features is not None:
            if not isinstance(features, torch.Tensor) or features.dim() != 3:
                raise ValueError(f"features must be a (B, N, D) tensor, got "
                                 f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)}")
            # Pinned features (a DataLoader's pin_memory=True) copy without blocking the host, as cache reads do.
            y = features.detach().to(device, non_blocking=features.device.type == "cpu" and features.is_pinned())
            y_grid, source = features_grid, "features"
        else:
            with torch.no_grad():  # the encoder checks the pixels' shape and [-1, 1] range
                if latents is not None:
                    pixels = self._decode(latents, vae)
                y, y_grid = self._encoder(device)(pixels.to(device))
            source = "latents" if latents is not None else "pixels"
        if y.shape[0] != batch:
            raise ValueError(f"{source} give {y.shape[0]} samples but the model forward had {batch}")
        if y.shape[-1] != self.projector[-1].out_features:
            raise ValueError(f"{source} have width {y.shape[-1]} but the projector maps to "
                             f"{self.projector[-1].out_features} (the encoder's width at build time)")
        return y, (None if y_grid is None else tuple(y_grid))

    def _encoder(self, device):
        if self.encoder is None:
            from .encoders import load_encoder

            cfg = self.config
            max_batch = getattr(cfg, "encoder_frames_batch_size", 0)
            self.encoder = load_encoder(cfg.model, cfg.encoder_image_size, device=device,
                                        max_batch=max_batch if max_batch > 0 else None, aspect=cfg.encoder_aspect)
        return self.encoder

    def _decode(self, latents: torch.Tensor, vae: nn.Module) -> torch.Tensor:
        tiny = any(cls.__name__ == "AutoencoderTiny" for cls in type(vae).__mro__)
        if tiny != self.config.use_tae:
            p = self.config.PREFIX
            raise ValueError(f"{p}use_tae={self.config.use_tae} but vae is a {type(vae).__name__}: pass "
                             f"{'an AutoencoderTiny' if self.config.use_tae else 'the AutoencoderKL'} or set "
                             f"{p}use_tae={'false' if self.config.use_tae else 'true'}")
        from .decode import decode_latents

        return decode_latents(latents, vae)

    # -- state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The schedule's state (similarity EMA, cutoff flag); the projector's weights live in the model's."""
        return {"kind": self.LOG_PREFIX, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.LOG_PREFIX:
            raise ValueError(f"this state is from a {state.get('kind')!r} regularizer, not {self.LOG_PREFIX!r}")
        self.schedule.load_state_dict(state["schedule"])

    def remove(self) -> None:
        """Detach the hooks and take the projector off the model (call before save_pretrained for export)."""
        self.capture.remove()
        if getattr(self.model, self.PROJECTOR_ATTR, None) is self.projector:
            delattr(self.model, self.PROJECTOR_ATTR)
        self._removed = True

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.capture.block_name} of {type(self.model).__name__}, "
                f"λ={self.config.lambda_}, projector={self.config.projector} "
                f"{self.capture.hidden_width}->{self.projector[-1].out_features})")


class RepaRegularizer(AlignmentRegularizer):
    """REPA on a DiT block: λ · −mean cos(projector(h), y) on the smaller of the two token grids."""

    KIND, NAME, PROJECTOR_ATTR, LOG_PREFIX = "dit", "REPA", "repa_projector", "crepa"

    def _block_index(self) -> int:
        return self.config.block_index

    def _terms(self, h, h_grid, y, y_grid):
        if not self.config.spatial_align and (h.shape[1] != y.shape[1]
                                              or (y_grid is not None and y_grid != tuple(h_grid))):
            # SimpleTuner's crepa_spatial_align=false: different grids compare by their mean token.
            h, y, h_grid, y_grid = h.mean(1, keepdim=True), y.mean(1, keepdim=True), (1, 1), (1, 1)
        alignment = functional.cosine_alignment_loss(h, y, h_grid=h_grid, y_grid=y_grid, align="min")
        return {"total": alignment, "alignment_loss": alignment}


class URepaRegularizer(AlignmentRegularizer):
    """U-REPA on a UNet mid block: λ · (alignment + manifold_weight · manifold) on the ``urepa_align`` grid."""

    KIND, NAME, PROJECTOR_ATTR, LOG_PREFIX = "unet", "U-REPA", "urepa_projector", "urepa"

    def _terms(self, h, h_grid, y, y_grid):
        total, alignment, manifold = functional.urepa_loss(
            h, y, manifold_weight=self.config.manifold_weight, h_grid=h_grid, y_grid=y_grid, align=self.config.align,
            pairs=self.config.manifold_pairs)
        return {"total": total, "alignment_loss": alignment, "manifold_loss": manifold}


def build_regularizer(config: Union[dict, str, os.PathLike, Config], model: nn.Module, *, encoder=None,
                      max_train_steps: Optional[int] = None) -> AlignmentRegularizer:
    """The regularizer the config enables, attached to ``model``.

    ``crepa_enabled`` -> :class:`RepaRegularizer` (DiTs), ``urepa_enabled`` -> :class:`URepaRegularizer`
    (UNets); exactly one must be true. ``encoder``: a loaded ``VisionEncoder`` (else loaded from
    ``*_model`` on first use; never with a feature cache). ``max_train_steps``: the horizon of a decay whose
    ``*_decay_steps`` is 0. Build it before creating the optimizer and before ``accelerator.prepare``.
    Errors (raised here): bad keys or values, both or neither enabled, the wrong model type, a block index
    out of range, a feature cache made with another encoder, image size or preprocessing.
    """
    cfg = load_config(config)
    if cfg.repa.enabled and cfg.urepa.enabled:
        raise ValueError("crepa_enabled and urepa_enabled are both true: enable crepa_* (REPA) for a "
                         "diffusion transformer or urepa_* (U-REPA) for a UNet, one per model")
    if not (cfg.repa.enabled or cfg.urepa.enabled):
        raise ValueError("neither crepa_enabled nor urepa_enabled is true: set crepa_enabled (REPA, for "
                         "diffusion transformers) or urepa_enabled (U-REPA, for UNets)")
    if cfg.repa.enabled:
        return RepaRegularizer(cfg.repa, model, encoder=encoder, max_train_steps=max_train_steps)
    return URepaRegularizer(cfg.urepa, model, encoder=encoder, max_train_steps=max_train_steps)


# -- encoder width and the feature cache ---------------------------------------------------------------------


def _target_width(cfg, encoder, cache) -> int:
    """D, the encoder's token width, known before the encoder is loaded (or without it, with a cache)."""
    if encoder is not None:
        return int(encoder.hidden_size)
    if cache is not None and cache.metadata.get("hidden_size") is not None:
        return int(cache.metadata["hidden_size"])
    return encoder_geometry(cache.metadata["encoder"] if cache is not None else cfg.model)[0]


def encoder_geometry(name_or_path: str) -> tuple[int, int]:
    """(hidden_size, patch_size) of an encoder from its name or config alone: no weights, and no download
    for the DINOv2 checkpoints load_encoder names."""
    from .encoders import ENCODER_ALIASES, resolve_encoder_name

    resolved = resolve_encoder_name(name_or_path)
    if resolved in ENCODER_ALIASES.values():
        return _DINOV2_WIDTH[resolved.rsplit("-", 1)[1]], 14
    if os.path.isdir(resolved):
        config_path = os.path.join(resolved, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"encoder directory {resolved!r} has no config.json")
        with open(config_path) as fh:
            config = json.load(fh)
        return int(config["hidden_size"]), int(config["patch_size"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved)
    return int(config.hidden_size), int(config.patch_size)


def _open_cache(cfg, encoder):
    """The FeatureCache at ``*_feature_cache``, checked against the encoder the config (or caller) names."""
    from . import cache as cache_module

    cache = cache_module.FeatureCache(cfg.feature_cache)
    meta, p = cache.metadata, cfg.PREFIX
    if encoder is not None:
        name, size, preprocessing = encoder.name, int(encoder.image_size), encoder.preprocessing
        name_from = size_from = "the encoder passed"
    else:
        name, size = cfg.model, cfg.encoder_image_size
        preprocessing = _expected_preprocessing(cfg.model, size, cfg.encoder_aspect)
        name_from, size_from = f"{p}model", f"{p}encoder_image_size"
    problems = []
    if _canonical_encoder(meta.get("encoder")) != _canonical_encoder(name):
        problems.append(f"encoder {meta.get('encoder')!r} (wanted: {name!r}, from {name_from})")
    if meta.get("image_size") != size:
        problems.append(f"image size {meta.get('image_size')!r} (wanted: {size}, from {size_from})")
    if meta.get("preprocessing") != preprocessing:
        problems.append(f"preprocessing {meta.get('preprocessing')!r} (wanted: {preprocessing!r})")
    if problems:
        raise ValueError(f"feature cache {cfg.feature_cache!r} was made with " + "; ".join(problems)
                         + ": rebuild it with repa-fused cache-features or change the config to match")
    return cache


def _expected_preprocessing(name: str, image_size: int, aspect: str) -> dict:
    """The ``preprocessing`` record of the encoder load_encoder would build, without loading it."""
    from types import SimpleNamespace

    from .encoders import VisionEncoder

    patch = encoder_geometry(name)[1]
    return VisionEncoder.preprocessing.fget(SimpleNamespace(image_size=image_size, aspect=aspect, patch_size=patch))


def _canonical_encoder(name) -> Optional[str]:
    """Hub id for names and aliases, the real path for directories; unresolvable names compare as given."""
    if name is None:
        return None
    from .encoders import resolve_encoder_name

    try:
        resolved = resolve_encoder_name(str(name))
    except ValueError:
        return str(name)
    return os.path.realpath(resolved) if os.path.isdir(resolved) else resolved
