"""REPA (DiTs) and U-REPA (UNets) regularizers for any training loop, driven by SimpleTuner's keys.

    reg = build_regularizer(args, model)                 # dict, JSON/TOML path or argparse Namespace
    optimizer = AdamW([*model.parameters(), *reg.parameters()])
    reg.to(accelerator.device); reg.max_train_steps = max_train_steps
    pred = model(noisy, t, ...)                          # the hook stores block k's / mid_block's output
    loss, logs = reg.loss(step=global_step, pixels=images)   # or latents=, vae= / features= / keys=
    accelerator.backward(diffusion_loss + loss)
    if accelerator.sync_gradients: reg.sync_gradients()  # average the projector's gradients over ranks
    optimizer.step()

The regularizer owns its projector, a module of its own beside the model, never grafted onto it: the
model's checkpoint stays a plain model checkpoint (``save_pretrained`` / ``from_pretrained`` and strict
loads work unchanged), and DDP, whatever its flags, only ever sees parameters its forward uses. The
projector's weights and the schedule travel in ``reg.state_dict()`` (``accelerator.register_for_checkpointing
(reg)``, or ``torch.save``). Gradients are averaged across ranks by :meth:`~AlignmentRegularizer.sync_gradients`,
one all-reduce outside autograd, so it does not depend on how the model is wrapped (DDP with or without
``find_unused_parameters``, ``static_graph``, FSDP) nor on DDP's ``no_sync`` during gradient accumulation.

One ``reg.loss`` call: pop the captured tokens h (B, N_h, C) -> projector -> encoder features y (B, N_y, D)
from pixels, decoded latents, the caller or a feature cache, under no_grad -> the public loss
(``cosine_alignment_loss`` for REPA, ``urepa_loss`` for U-REPA) -> times λ(step). When λ(step) is 0 nothing
of that runs: the loss returned is 0 · Σ(projector parameters), so every backward reaches the projector
alike. Logs are tensors (no host sync per step); ``float(v)`` them when you log.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
import weakref
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .. import ops
from . import irepa
from .capture import attach_capture
from .config import Config, RepaConfig, URepaConfig, load_config
from .encoders import encoder_spec, feature_record, record_differences
from .schedule import CoefficientSchedule, DeferredRead

Grid = tuple[int, int]
logger = logging.getLogger("repa_fused")


def build_projector(kind: str, in_width: int, out_width: int, hidden: int = 2048) -> nn.Module:
    """``"linear"``: LayerNorm(C) -> Linear(C, D) (SimpleTuner); ``"mlp"``: REPA's Linear(C, P) -> SiLU ->
    Linear(P, P) -> SiLU -> Linear(P, D). Maps (..., C) to (..., D)."""
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(in_width), nn.Linear(in_width, out_width))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                             nn.Linear(hidden, out_width))
    raise ValueError(f"projector must be 'linear' or 'mlp', got {kind!r}")


def _world(group=None) -> int:
    """Ranks in ``group`` (the default group when None); 1 without an initialised process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def _coalesced(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective`` on one flat buffer of ``tensors`` (one message, not one per tensor), then copy back."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    collective(flat)
    for tensor, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(value)


class AlignmentRegularizer:
    """Shared machinery of :class:`RepaRegularizer` and :class:`URepaRegularizer` (see the module doc).

    Attributes: ``config``, ``model`` (the bare model the hooks sit on), ``projector`` (nn.Module, float32,
    owned here), ``capture``, ``schedule``, ``encoder`` (None until first needed when not given),
    ``feature_cache`` (or None), ``enabled`` (True), ``max_train_steps`` (settable before the first loss).
    """

    KIND = ""            # capture kind: "dit" | "unet"
    NAME = ""            # for messages
    LOG_PREFIX = ""      # SimpleTuner's log names: crepa_* / urepa_*
    SCORE_LOGS = False   # also log the similarity as SimpleTuner's CREPA does (alignment_score, similarity_self)
    enabled = True

    def __init__(self, config: Union[RepaConfig, URepaConfig], model: nn.Module, *, encoder=None,
                 max_train_steps: Optional[int] = None):
        _check_irepa(config)
        self.config = config
        self.schedule = CoefficientSchedule.from_config(config, max_train_steps)
        self.encoder = encoder
        self.feature_cache = _open_cache(config, encoder) if config.feature_cache else None
        width = _target_width(config, encoder, self.feature_cache)
        self.capture = attach_capture(model, self.KIND, self._block_index())
        self.model = self.capture.model
        param = next(self.model.parameters(), None)
        # float32 like SimpleTuner: the projector is trained from scratch, whatever the model's dtype.
        self.projector = (irepa.ConvProjector(self.capture.hidden_width, width, config.irepa_projector_kernel_size)
                          if config.irepa_enabled else
                          build_projector(config.projector, self.capture.hidden_width, width, config.projector_dim)).to(
            device=param.device if param is not None else None, dtype=torch.float32)
        self._pixel_stats = DeferredRead()  # (min, max) of the last pixels, checked at the next call on CUDA
        self._replicated = False            # the projector was broadcast from rank 0 (first loss)
        self._unsynced = False              # a backward may have put local gradients on the projector
        # Every optimizer's step checks that sync_gradients ran; through a weak reference, so the hook never
        # keeps a dropped regularizer (and its model) alive.
        ref = weakref.ref(self)
        self._step_hook = register_optimizer_step_pre_hook(
            lambda optimizer, args, kwargs: ref() is not None and ref()._before_optimizer_step(optimizer))
        weakref.finalize(self, self._step_hook.remove)
        self._removed = False
        logger.info("%s", self.describe())

    def _block_index(self) -> Optional[int]:
        return None

    # -- what the trainer wires up -------------------------------------------------------------------------

    def parameters(self) -> Iterator[nn.Parameter]:
        """The projector's parameters: give them to the optimizer beside the model's."""
        return self.projector.parameters()

    def to(self, device) -> "AlignmentRegularizer":
        """Move the projector (float32 stays) to ``device``, e.g. ``accelerator.device``; returns self."""
        self.projector.to(device)
        return self

    @property
    def max_train_steps(self) -> Optional[int]:
        """The horizon of a decay whose ``*_decay_steps`` is 0; set it before the first loss."""
        return self.schedule.max_train_steps

    @max_train_steps.setter
    def max_train_steps(self, value: Optional[int]) -> None:
        self.schedule.max_train_steps = value

    def sync_gradients(self, group=None) -> None:
        """Average the projector's gradients over the ranks of ``group`` (default: all); no-op in one process.

        Call it after the backward and before gradient clipping and ``optimizer.step()``, once per optimizer
        step: with gradient accumulation, where the step happens (``if accelerator.sync_gradients:``).
        Calling it on every micro-step is also correct (averaging is linear), only slower. A parameter
        without a gradient on this rank counts as a zero gradient. In a multi-rank run, an optimizer step
        over the projector's parameters without it after a ``reg.loss`` raises instead of letting the ranks'
        projectors drift apart.
        """
        self._unsynced = False
        world = _world(group)
        if world == 1:
            return
        params = [p for p in self.projector.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _coalesced([p.grad for p in params], lambda flat: (torch.distributed.all_reduce(flat, group=group),
                                                           flat.div_(world)))

    def _before_optimizer_step(self, optimizer) -> None:
        if not self._unsynced or _world() == 1:
            return
        mine = {id(p) for p in self.projector.parameters()}
        if any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
            raise RuntimeError(f"optimizer.step() over the {self.NAME} projector before reg.sync_gradients(): "
                               "its gradients are this rank's alone, so the ranks' projectors would drift "
                               "apart. Call reg.sync_gradients() after the backward, before clipping and the "
                               "step (with accumulation: inside `if accelerator.sync_gradients:`)")

    # -- the loss ---------------------------------------------------------------------------------------

    def loss(self, *, step: int, pixels: Optional[torch.Tensor] = None, latents: Optional[torch.Tensor] = None,
             vae: Optional[nn.Module] = None, features: Optional[torch.Tensor] = None,
             features_grid: Optional[Sequence[int]] = None,
             keys: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(λ(step) · alignment loss, logs) for the last model forward.

        ``step``: the global optimizer step (the same on every rank; count it across epochs and resumes,
        never a loader's index). Exactly one source of the clean image's features: ``pixels`` (B, 3, H, W)
        in [-1, 1] (the encoder's ``pixel_range``); ``latents`` (B, C, h, w) with ``vae`` (AutoencoderKL, or
        AutoencoderTiny when ``*_use_tae``), decoded to pixels; ``features`` (B, N, D) encoder patch tokens
        you computed, or read from the ``*_feature_cache`` in your DataLoader's workers (``features_grid``
        (H, W) when N is not a square; pinned ones are copied without blocking); ``keys`` (B names) looked up
        in the ``*_feature_cache`` here, in the step.
        """
        if self._removed:
            raise RuntimeError(f"this {self.NAME} regularizer was removed")
        self._check_sources(pixels, latents, vae, features, features_grid, keys)
        self._check_pixel_stats(self._pixel_stats.take())  # the previous call's pixels (CUDA: read now)
        tokens, h_grid = self.capture.pop()  # always: the stored graph must not outlive this step
        self._check_device(tokens.device)
        if not self._replicated:
            self._replicate()
        if torch.is_grad_enabled():
            self._unsynced = True
        weight = self.schedule.weight(step)
        if weight == 0.0:
            return self._skipped(step, tokens.device)
        y, y_grid = self._features(tokens, pixels, latents, vae, features, features_grid, keys)
        if self.config.irepa_enabled:  # z-score on the encoder's grid, before any grid alignment
            y = irepa.spatial_normalize(y, self.config.irepa_spatial_norm_alpha)
        x = tokens.to(torch.float32)
        h = self.projector(x, h_grid) if self.config.irepa_enabled else self.projector(x)
        terms = self._terms(h, h_grid, y, y_grid)
        similarity = -terms["alignment_loss"].detach()
        gate = None
        if self.schedule.tracks_similarity:
            # The mean over ranks: every rank then folds the same value into the same EMA and cuts together.
            shared = similarity.clone()
            if _world() > 1:
                torch.distributed.all_reduce(shared)
                shared.div_(_world())
            gate = self.schedule.observe(shared)
        scale = torch.full((), weight, device=h.device) if gate is None else weight * gate
        loss = terms.pop("total") * scale
        p = self.LOG_PREFIX
        logs = {f"{p}_loss": loss.detach(), **{f"{p}_{k}": v.detach() for k, v in terms.items()},
                f"{p}_similarity": similarity}
        if self.SCORE_LOGS:
            logs[f"{p}_alignment_score"] = logs[f"{p}_similarity_self"] = similarity
        return loss, self._finish_logs(logs, step, scale, h.device)

    def _terms(self, h, h_grid, y, y_grid) -> dict[str, torch.Tensor]:
        """{"total": unweighted loss, "alignment_loss": ..., (U-REPA) "manifold_loss": ...}."""
        raise NotImplementedError

    def _skipped(self, step: int, device) -> tuple[torch.Tensor, dict]:
        # Zero, yet reaching every trainable projector parameter: each step's backward leaves the same
        # (zero) gradients on every rank, and the step's graph has the same shape whatever λ is.
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
            if self.SCORE_LOGS:
                logs[f"{p}_alignment_score_ema"] = self.schedule.similarity_ema
        return logs

    def _check_device(self, device: torch.device) -> None:
        where = next(self.projector.parameters()).device
        if where != device:
            raise RuntimeError(f"the captured tokens are on {device} but the {self.NAME} projector is on {where}: "
                               f"call reg.to({str(device)!r}) (e.g. reg.to(accelerator.device)) after building "
                               "the regularizer, before the optimizer's first step")

    def _replicate(self) -> None:
        """Make every rank start from rank 0's projector (its random init may differ per rank without a
        common seed); after a resume all ranks loaded the same weights and this changes nothing."""
        self._replicated = True
        if _world() > 1:
            with torch.no_grad():
                _coalesced([p.data for p in self.projector.parameters()],
                           lambda flat: torch.distributed.broadcast(flat, src=0))

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

    def _watch_pixels(self, pixels: torch.Tensor) -> None:
        """Check every batch's range (NaN included) without a host sync: the (min, max) is computed on the
        device and read at the next call on CUDA, at once on CPU."""
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point() or pixels.numel() == 0:
            return  # the encoder reports the wrong type or shape
        self._pixel_stats.put(torch.stack([pixels.amin(), pixels.amax()]).float())
        if pixels.device.type != "cuda":
            self._check_pixel_stats(self._pixel_stats.take())

    def _check_pixel_stats(self, stats: Optional[torch.Tensor]) -> None:
        if stats is None:
            return
        from .encoders import _RANGE_SLACK

        lo, hi = stats.tolist()
        want_lo, want_hi = getattr(self.encoder, "pixel_range", (-1.0, 1.0))
        slack = _RANGE_SLACK * (want_hi - want_lo) / 2
        if lo != lo or hi != hi:
            raise ValueError("pixels passed to reg.loss contain NaN (the last batch on CUDA, checked a call later "
                             "so that no step waits for the device)")
        if lo < want_lo - slack or hi > want_hi + slack:
            raise ValueError(f"pixels passed to reg.loss are in [{lo:.3g}, {hi:.3g}] but the encoder expects "
                             f"[{want_lo:g}, {want_hi:g}]: convert them (x / 127.5 - 1 for uint8-range, x * 2 - 1 "
                             "for [0, 1]), or load the encoder with the pixel_range your data has")

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
            with torch.no_grad():  # the encoder checks the pixels' shape
                if latents is not None:
                    pixels = self._decode(latents, vae)
                else:
                    self._watch_pixels(pixels)
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
        """``{"kind", "projector": projector weights, "schedule": {similarity EMA, cutoff flag}}``: all a
        resume needs beside the model and the optimizer (for ``register_for_checkpointing`` or torch.save)."""
        return {"kind": self.LOG_PREFIX, "projector": self.projector.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (strict: every projector tensor, same shapes)."""
        if state.get("kind") != self.LOG_PREFIX:
            found = "no regularizer" if state.get("kind", "") is None else f"a {state.get('kind')!r} regularizer"
            raise ValueError(f"this state is from {found}, not {self.LOG_PREFIX!r}")
        missing = {"projector", "schedule"} - set(state)
        if missing:
            raise KeyError(f"{self.NAME} state is missing {sorted(missing)} (saved by a version that kept the "
                           "projector inside the model? load that model checkpoint non-strictly once, then save "
                           "reg.state_dict())")
        try:
            self.projector.load_state_dict(state["projector"])
        except RuntimeError as error:
            raise RuntimeError(f"the saved projector does not fit this {self._projector_kind()} projector "
                             f"({self.capture.hidden_width}->{self.projector[-1].out_features}); was it saved with "
                             f"other irepa_enabled / irepa_projector_kernel_size / {self.config.PREFIX}projector "
                             f"settings? {error}") from None
        self.schedule.load_state_dict(state["schedule"])

    def remove(self) -> None:
        """Detach the hooks (and the optimizer check); the projector stays usable as ``reg.projector``."""
        self.capture.remove()
        self._step_hook.remove()
        self._removed = True

    def describe(self) -> str:
        """One line: what was built (logged at INFO by build_regularizer)."""
        cfg, enc = self.config, self.encoder
        if self.feature_cache is not None:
            source = f"feature cache {cfg.feature_cache}"
        elif enc is not None:
            source = f"encoder {getattr(enc, 'name', type(enc).__name__)} (given)"
        else:
            source = f"encoder {cfg.model} at {cfg.encoder_image_size} px, {cfg.encoder_aspect} (loaded on first use)"
        device = next(self.projector.parameters()).device
        return (f"{self.NAME}: {type(self.model).__name__}.{self.capture.block_name} "
                f"(width {self.capture.hidden_width}, token grid from each forward) -> {self._projector_kind()} projector "
                f"{self.capture.hidden_width}->{self.projector[-1].out_features} (float32, {device}); {source}; "
                f"λ={cfg.lambda_} {cfg.scheduler}; backend auto of {ops.available_backends(device)}")

    def _projector_kind(self) -> str:
        cfg = self.config
        return f"iREPA conv k={cfg.irepa_projector_kernel_size}" if cfg.irepa_enabled else cfg.projector

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.capture.block_name} of {type(self.model).__name__}, "
                f"λ={self.config.lambda_}, projector={self._projector_kind()} "
                f"{self.capture.hidden_width}->{self.projector[-1].out_features})")


class RepaRegularizer(AlignmentRegularizer):
    """REPA on a DiT block: λ · −mean cos(projector(h), y) on the smaller of the two token grids."""

    KIND, NAME, LOG_PREFIX, SCORE_LOGS = "dit", "REPA", "crepa", True

    def _block_index(self) -> int:
        return self.config.block_index

    def _terms(self, h, h_grid, y, y_grid):
        if not self.config.spatial_align and (h.shape[1] != y.shape[1]
                                              or (y_grid is not None and y_grid != tuple(h_grid))):
            # SimpleTuner's crepa_spatial_align=false: different grids compare by their mean token.
            h, y, h_grid, y_grid = h.mean(1, keepdim=True), y.mean(1, keepdim=True), (1, 1), (1, 1)
        alignment = ops.cosine_alignment_loss(h, y, h_grid=h_grid, y_grid=y_grid, align="min")
        return {"total": alignment, "alignment_loss": alignment}


class URepaRegularizer(AlignmentRegularizer):
    """U-REPA on a UNet mid block: λ · (alignment + manifold_weight · manifold) on the ``urepa_align`` grid."""

    KIND, NAME, LOG_PREFIX = "unet", "U-REPA", "urepa"

    def _terms(self, h, h_grid, y, y_grid):
        total, alignment, manifold = ops.urepa_loss(
            h, y, manifold_weight=self.config.manifold_weight, h_grid=h_grid, y_grid=y_grid, align=self.config.align,
            pairs=self.config.manifold_pairs)
        return {"total": total, "alignment_loss": alignment, "manifold_loss": manifold}


class DisabledRegularizer:
    """What :func:`build_regularizer` returns when neither ``crepa_enabled`` nor ``urepa_enabled`` is set:
    the training loop calls it unchanged. ``loss`` is a zero (on the inputs' device) with empty logs; no
    parameters, hooks, encoder or collectives."""

    enabled = False
    projector = capture = encoder = feature_cache = None

    def __init__(self, config: Config, max_train_steps: Optional[int] = None):
        self.config = config
        self.max_train_steps = max_train_steps

    def loss(self, *, step: int, **sources) -> tuple[torch.Tensor, dict]:
        device = next((v.device for v in sources.values() if isinstance(v, torch.Tensor)), None)
        return torch.zeros((), device=device), {}

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def to(self, device) -> "DisabledRegularizer":
        return self

    def sync_gradients(self, group=None) -> None:
        return None

    def state_dict(self) -> dict:
        return {"kind": None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") is not None:
            raise ValueError(f"this state is from a {state['kind']!r} regularizer, but neither crepa_enabled nor "
                             "urepa_enabled is set in this run's config")

    def remove(self) -> None:
        return None

    def describe(self) -> str:
        return "no representation alignment: neither crepa_enabled nor urepa_enabled is set (reg.loss is 0)"

    def __repr__(self) -> str:
        return "DisabledRegularizer()"


def build_regularizer(config: Union[dict, str, os.PathLike, argparse.Namespace, Config], model: nn.Module, *,
                      encoder=None, max_train_steps: Optional[int] = None
                      ) -> Union[AlignmentRegularizer, DisabledRegularizer]:
    """The regularizer the config enables, hooked onto ``model``; logs one INFO line saying what was built.

    ``config``: a dict, a JSON/TOML path, an argparse Namespace (e.g. a trainer's ``args`` with
    :func:`~repa_fused.config.add_config_arguments`' flags) or a Config. ``crepa_enabled`` ->
    :class:`RepaRegularizer` (DiTs), ``urepa_enabled`` -> :class:`URepaRegularizer` (UNets), neither ->
    :class:`DisabledRegularizer` (loss 0, no parameters: the loop needs no ``if``). ``model``: bare, or
    already wrapped in DDP / torch.compile. ``encoder``: a loaded ``VisionEncoder`` (else loaded from
    ``*_model`` on first use; never with a feature cache). ``max_train_steps``: the horizon of a decay whose
    ``*_decay_steps`` is 0; may be set later as ``reg.max_train_steps``, before the first loss.
    Errors (raised here): bad keys or values, both enabled, the wrong model type, a block index out of
    range, a warmup that ends after the decay, a feature cache made with another encoder, image size or
    preprocessing.
    """
    cfg = load_config(config)
    if cfg.repa.enabled and cfg.urepa.enabled:
        raise ValueError("crepa_enabled and urepa_enabled are both true: enable crepa_* (REPA) for a "
                         "diffusion transformer or urepa_* (U-REPA) for a UNet, one per model")
    if cfg.repa.enabled:
        return RepaRegularizer(cfg.repa, model, encoder=encoder, max_train_steps=max_train_steps)
    if cfg.urepa.enabled:
        return URepaRegularizer(cfg.urepa, model, encoder=encoder, max_train_steps=max_train_steps)
    if cfg.repa.irepa_enabled:  # the irepa_* keys are unprefixed: a user may think they switch something on
        warnings.warn("irepa_enabled is set but neither crepa_enabled nor urepa_enabled is: iREPA applies to the "
                      "enabled regularizer, and none is; the regularizer is a no-op", UserWarning, stacklevel=2)
    disabled = DisabledRegularizer(cfg, max_train_steps)
    logger.info("%s", disabled.describe())
    return disabled


def _check_irepa(cfg) -> None:
    """iREPA replaces the projector and z-scores the target per token grid: keys that contradict it are errors."""
    if not cfg.irepa_enabled:
        return
    p = cfg.PREFIX
    if cfg.projector != "linear":
        raise ValueError(f"irepa_enabled makes the projector iREPA's Conv2d, so {p}projector={cfg.projector!r} "
                         f"cannot apply: leave {p}projector unset, or turn irepa_enabled off")
    if not getattr(cfg, "spatial_align", True):
        raise ValueError(f"irepa_enabled with {p}spatial_align=false: the mean token of an iREPA target is "
                         f"(1 − α)·mean / std, zero for α = 1, so the pooled comparison would align with rounding "
                         f"noise; keep {p}spatial_align=true with iREPA")


# -- encoder width and the feature cache ---------------------------------------------------------------------


def _target_width(cfg, encoder, cache) -> int:
    """D, the encoder's token width, known before the encoder is loaded (or without it, with a cache): from its
    config alone (``encoder_spec``; no download for the DINOv2 names)."""
    if encoder is not None:
        return int(encoder.hidden_size)
    if cache is not None and cache.metadata.get("hidden_size") is not None:
        return int(cache.metadata["hidden_size"])
    return encoder_spec(cache.metadata["encoder"] if cache is not None else cfg.model).hidden_size


def _open_cache(cfg, encoder):
    """The FeatureCache at ``*_feature_cache``, checked against the encoder the config (or caller) names: its
    ``feature_record`` (predicted from the checkpoint's config files when not loaded) must be the cache's."""
    from . import cache as cache_module

    cache = cache_module.FeatureCache(cfg.feature_cache)
    meta, p = cache.metadata, cfg.PREFIX
    if encoder is not None:
        wanted = feature_record(encoder)
        sources = dict.fromkeys(("encoder", "image_size"), "the encoder passed")
    else:
        try:
            spec = encoder_spec(cfg.model, cfg.encoder_image_size, aspect=cfg.encoder_aspect)
        except OSError as error:
            raise OSError(f"{p}model={cfg.model!r}: its config files are needed to check the feature cache "
                          f"{cfg.feature_cache!r} and cannot be read ({error}); pass the encoder's local directory "
                          f"as {p}model, or the loaded encoder as build_regularizer(..., encoder=...)") from error
        wanted = {**feature_record(spec), "encoder": cfg.model}  # named as the config names it
        sources = {"encoder": f"{p}model", "image_size": f"{p}encoder_image_size"}
    problems = [f"{key.replace('_', ' ')} {meta.get(key)!r} (wanted: {wanted[key]!r}"
                + (f", from {sources[key]})" if key in sources else ")") for key in record_differences(meta, wanted)]
    if problems:
        raise ValueError(f"feature cache {cfg.feature_cache!r} was made with " + "; ".join(problems)
                         + ": rebuild it with repa-fused cache-features or change the config to match")
    return cache
