"""The coefficient λ(step) of a regularizer (SimpleTuner's crepa_/urepa_ schedule keys).

    warmup   step < W:   λ₀ · step / W                           (W = warmup_steps; ramps from 0)
    constant             λ₀
    decay                p = min((step − W) / max(S − W, 1), 1)   (S = decay_steps, or max_train_steps if 0)
      linear             λ₀ + (λ_end − λ₀) · p
      cosine             λ_end + (λ₀ − λ_end) · (1 + cos πp) / 2
      polynomial         λ_end + (λ₀ − λ_end) · (1 − p)^power
    cutoff               0 from cutoff_step on (when > 0); 0 while the EMA of the similarity is ≥ threshold
                         ("recoverable"), or from the first step it is ("permanent")

The EMA starts at the first similarity observed, then ema ← d·ema + (1 − d)·similarity, and is updated
before the step's cutoff is decided (as SimpleTuner). It lives on the device, so the threshold never
forces a host sync: the gate it gives is a tensor. The host learns of a permanent cutoff through a
non-blocking copy, a step or so later, and from then on the regularizer skips its work entirely.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import SCHEDULERS, THRESHOLD_MODES


class CoefficientSchedule:
    """λ at a step plus the similarity-threshold state; ``state_dict()`` resumes it exactly."""

    def __init__(self, lambda_: float, *, scheduler: str = "constant", warmup_steps: int = 0,
                 decay_steps: int = 0, lambda_end: float = 0.0, power: float = 1.0, cutoff_step: int = 0,
                 similarity_threshold: Optional[float] = None, similarity_ema_decay: float = 0.99,
                 threshold_mode: str = "permanent", max_train_steps: Optional[int] = None,
                 prefix: str = "crepa_"):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"{prefix}scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"{prefix}threshold_mode must be one of {list(THRESHOLD_MODES)}, "
                             f"got {threshold_mode!r}")
        if max_train_steps is not None and (isinstance(max_train_steps, bool) or not isinstance(max_train_steps, int)
                                            or max_train_steps < 0):
            raise ValueError(f"max_train_steps must be an int ≥ 0 or None, got {max_train_steps!r}")
        if decay_steps == 0 and scheduler != "constant" and max_train_steps is None:
            raise ValueError(f"{prefix}decay_steps=0 means 'decay until max_train_steps', which was not given: "
                             f"pass max_train_steps or set {prefix}decay_steps")
        self.base = float(lambda_)
        self.scheduler = scheduler
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps if decay_steps > 0 else max_train_steps
        self.lambda_end = float(lambda_end)
        self.power = float(power)
        self.cutoff_step = cutoff_step
        self.threshold = similarity_threshold
        self.ema_decay = float(similarity_ema_decay)
        self.permanent = threshold_mode == "permanent"
        self._ema: Optional[torch.Tensor] = None        # EMA of the similarity, float32 scalar
        self._cut: Optional[torch.Tensor] = None        # similarity cutoff in force, bool scalar
        self._host_cut = False                          # what the host knows of _cut (permanent mode)
        self._peek: Optional[tuple[torch.Tensor, torch.cuda.Event]] = None

    @classmethod
    def from_config(cls, cfg, max_train_steps: Optional[int] = None) -> "CoefficientSchedule":
        """From a RepaConfig / URepaConfig."""
        return cls(cfg.lambda_, scheduler=cfg.scheduler, warmup_steps=cfg.warmup_steps,
                   decay_steps=cfg.decay_steps, lambda_end=cfg.lambda_end, power=cfg.power,
                   cutoff_step=cfg.cutoff_step, similarity_threshold=cfg.similarity_threshold,
                   similarity_ema_decay=cfg.similarity_ema_decay, threshold_mode=cfg.threshold_mode,
                   max_train_steps=max_train_steps, prefix=cfg.PREFIX)

    @property
    def tracks_similarity(self) -> bool:
        return self.threshold is not None

    def scheduled(self, step: int) -> float:
        """λ at ``step`` from warmup and decay alone (no cutoff)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int ≥ 0, got {step!r}")
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.base * step / self.warmup_steps
        if self.scheduler == "constant":
            return self.base
        p = min((step - self.warmup_steps) / max(self.decay_steps - self.warmup_steps, 1), 1.0)
        if self.scheduler == "linear":
            return self.base + (self.lambda_end - self.base) * p
        if self.scheduler == "cosine":
            return self.lambda_end + (self.base - self.lambda_end) * (1 + math.cos(math.pi * p)) / 2
        return self.lambda_end + (self.base - self.lambda_end) * (1 - p) ** self.power

    def step_cutoff(self, step: int) -> bool:
        return self.cutoff_step > 0 and step >= self.cutoff_step

    def weight(self, step: int) -> float:
        """λ at ``step`` as far as the host knows: 0 means the regularizer's work can be skipped.

        A similarity cutoff not yet seen by the host is applied on the device by :meth:`observe`.
        """
        value = self.scheduled(step)
        if self.step_cutoff(step) or (self.permanent and self._host_knows_cutoff()):
            return 0.0
        return value

    def _host_knows_cutoff(self) -> bool:
        """Whether a permanent similarity cutoff has reached the host (reads the latest finished copy of the
        device flag; never waits)."""
        if self._cut is None or self._host_cut:
            return self._host_cut
        if self._cut.device.type == "cpu":
            self._host_cut = bool(self._cut)
        elif self._peek is not None and self._peek[1].query():
            self._host_cut = bool(self._peek[0])
        return self._host_cut

    def observe(self, similarity: torch.Tensor) -> Optional[torch.Tensor]:
        """Fold this step's similarity (0-d tensor) into the EMA; the gate (1.0 or 0.0, a tensor) λ is
        multiplied by on this step, or None when no threshold is set."""
        if not self.tracks_similarity:
            return None
        sim = similarity.detach().float()
        if self._ema is None:
            self._ema = sim.clone()
        else:
            self._ema = torch.lerp(self._ema.to(sim.device), sim, 1.0 - self.ema_decay)
        over = self._ema >= self.threshold
        if self.permanent and self._cut is not None:
            over = over | self._cut.to(sim.device)
        self._cut = over
        if over.device.type == "cuda":
            buf = self._peek[0] if self._peek is not None else torch.empty((), dtype=torch.bool, pin_memory=True)
            buf.copy_(over, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._peek = (buf, event)
        return (~over).float()

    @property
    def similarity_ema(self) -> Optional[torch.Tensor]:
        return self._ema

    @property
    def similarity_cutoff(self) -> Optional[torch.Tensor]:
        """The similarity cutoff in force, a bool tensor (None before any observation)."""
        return self._cut

    def state_dict(self) -> dict:
        """Host values (a sync, fine at checkpoint time): the similarity EMA and the cutoff flag."""
        return {"similarity_ema": None if self._ema is None else float(self._ema),
                "cutoff_triggered": False if self._cut is None else bool(self._cut)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"similarity_ema", "cutoff_triggered"} - set(state)
        if missing:
            raise KeyError(f"schedule state is missing {sorted(missing)}")
        ema, cut = state["similarity_ema"], bool(state["cutoff_triggered"])
        self._ema = None if ema is None else torch.tensor(float(ema), dtype=torch.float32)
        self._cut = torch.tensor(cut)
        self._host_cut = cut
        self._peek = None
