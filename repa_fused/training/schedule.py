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
before the step's cutoff is decided (as SimpleTuner). Under data parallelism the regularizer passes the
similarity averaged over the ranks, so every rank holds the same EMA, cutoff and λ. The EMA lives on the
device, so the threshold never forces a host sync: the gate it gives is a tensor. The host learns of a
permanent cutoff at the next call (a copy made without blocking, read then: on every rank at the same step,
so all ranks stop their collective work together), and from then on the regularizer skips its work.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import SCHEDULERS, THRESHOLD_MODES


class DeferredRead:
    """A small device tensor read on the host one call later, without stalling the device queue.

    ``put(t)`` starts a non-blocking copy into pinned memory (CUDA) and records an event; ``take()`` returns
    that copy (waiting on an event recorded a call ago: long finished by then) and forgets it. CPU tensors
    need no copy: ``take()`` right after ``put()`` is free, which is how CPU callers read at once.
    """

    def __init__(self):
        self._value: Optional[torch.Tensor] = None
        self._event = None

    def put(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            self._value, self._event = tensor.clone(), None
            return
        buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        buf.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self._value = buf

    def take(self) -> Optional[torch.Tensor]:
        value, event = self._value, self._event
        self._value = self._event = None
        if event is not None:
            event.synchronize()
        return value


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
        self.prefix = prefix
        self.base = float(lambda_)
        self.scheduler = scheduler
        self.warmup_steps = warmup_steps
        self._decay_key = decay_steps
        self._max_train_steps: Optional[int] = None
        self.lambda_end = float(lambda_end)
        self.power = float(power)
        self.cutoff_step = cutoff_step
        self.threshold = similarity_threshold
        self.ema_decay = float(similarity_ema_decay)
        self.permanent = threshold_mode == "permanent"
        self._ema: Optional[torch.Tensor] = None        # EMA of the similarity, float32 scalar
        self._cut: Optional[torch.Tensor] = None        # similarity cutoff in force, bool scalar
        self._host_cut = False                          # what the host knows of _cut (permanent mode)
        self._peek = DeferredRead()                     # _cut on its way to the host
        self.max_train_steps = max_train_steps

    @classmethod
    def from_config(cls, cfg, max_train_steps: Optional[int] = None) -> "CoefficientSchedule":
        """From a RepaConfig / URepaConfig."""
        return cls(cfg.lambda_, scheduler=cfg.scheduler, warmup_steps=cfg.warmup_steps,
                   decay_steps=cfg.decay_steps, lambda_end=cfg.lambda_end, power=cfg.power,
                   cutoff_step=cfg.cutoff_step, similarity_threshold=cfg.similarity_threshold,
                   similarity_ema_decay=cfg.similarity_ema_decay, threshold_mode=cfg.threshold_mode,
                   max_train_steps=max_train_steps, prefix=cfg.PREFIX)

    @property
    def max_train_steps(self) -> Optional[int]:
        """The run's length: the end of a decay whose ``*_decay_steps`` is 0. Settable after building (diffusers'
        scripts know it only after ``accelerator.prepare``), before the first :meth:`weight` that needs it."""
        return self._max_train_steps

    @max_train_steps.setter
    def max_train_steps(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"max_train_steps must be an int ≥ 0 or None, got {value!r}")
        self._max_train_steps = value
        decay = self.decay_steps
        if self.scheduler != "constant" and decay is not None and 0 < decay <= self.warmup_steps:
            # The decay would end before (or as) the warmup does: λ would jump from the ramp to lambda_end.
            source = f"{self.prefix}decay_steps" if self._decay_key > 0 else "max_train_steps"
            raise ValueError(f"{self.prefix}warmup_steps={self.warmup_steps} ≥ {source}={decay}: the "
                             f"{self.scheduler} decay would end before the warmup does (a cliff in λ); "
                             f"{self.prefix}decay_steps counts from step 0, warmup included")

    @property
    def decay_steps(self) -> Optional[int]:
        """The step at which the decay reaches lambda_end (None: unknown until max_train_steps is set)."""
        return self._decay_key if self._decay_key > 0 else self._max_train_steps

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
        if self.decay_steps is None:
            raise ValueError(f"{self.prefix}decay_steps=0 means 'decay until max_train_steps', which was not "
                             f"given: set reg.max_train_steps (or pass max_train_steps= to build_regularizer) "
                             f"before the first loss, or set {self.prefix}decay_steps")
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
        """Whether a permanent similarity cutoff has reached the host: the flag of the previous
        :meth:`observe`, read now (its copy has long finished), at the same step on every rank."""
        seen = self._peek.take()
        if seen is not None and bool(seen):
            self._host_cut = True
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
        if self.permanent:
            self._peek.put(over)
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
        self._peek = DeferredRead()
