"""The λ schedule: values at chosen steps per mode, warmup, cutoffs, the similarity EMA, resume."""

import math

import pytest
import torch

from repa_fused.training.config import load_config
from repa_fused.training.schedule import CoefficientSchedule, DeferredRead


def sched(**kw):
    kw.setdefault("max_train_steps", 1000)
    return CoefficientSchedule(kw.pop("lambda_", 1.0), **kw)


@pytest.mark.parametrize("mode, step, expected", [
    ("constant", 0, 1.0), ("constant", 1000, 1.0), ("constant", 5000, 1.0),
    ("linear", 0, 1.0), ("linear", 50, 0.6), ("linear", 100, 0.2), ("linear", 400, 0.2),
    ("cosine", 0, 1.0), ("cosine", 50, 0.6), ("cosine", 25, 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2),
    ("cosine", 100, 0.2),
    ("polynomial", 0, 1.0), ("polynomial", 50, 0.2 + 0.8 * 0.25), ("polynomial", 100, 0.2),
])
def test_modes(mode, step, expected):
    s = sched(scheduler=mode, decay_steps=100, lambda_end=0.2, power=2.0)
    assert s.weight(step) == pytest.approx(expected)


def test_warmup_ramps_from_zero_then_decays():
    s = sched(scheduler="linear", warmup_steps=100, decay_steps=200, lambda_end=0.0)
    assert [s.weight(t) for t in (0, 50, 100, 150, 200, 300)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0])
    s = sched(lambda_=0.5, warmup_steps=10)
    assert [s.weight(t) for t in (0, 1, 10, 11)] == pytest.approx([0, 0.05, 0.5, 0.5])


def test_decay_steps_zero_means_max_train_steps():
    s = sched(scheduler="linear", max_train_steps=100)
    assert [s.weight(t) for t in (0, 50, 100)] == pytest.approx([1, 0.5, 0])
    late = CoefficientSchedule(1.0, scheduler="cosine")  # the horizon may come after building...
    with pytest.raises(ValueError, match="crepa_decay_steps=0 means 'decay until max_train_steps'.*"
                                         "set reg.max_train_steps"):
        late.weight(0)  # ...but not after the first weight that needs it
    late.max_train_steps = 100
    assert late.weight(50) == pytest.approx(0.5)
    assert CoefficientSchedule(1.0).weight(10 ** 6) == 1.0  # constant needs no horizon


@pytest.mark.parametrize("kw, source", [
    (dict(warmup_steps=20, decay_steps=10), "crepa_decay_steps=10"),
    (dict(warmup_steps=10, decay_steps=10), "crepa_decay_steps=10"),
    (dict(warmup_steps=20, max_train_steps=15), "max_train_steps=15"),
])
def test_warmup_ending_after_the_decay_is_an_error(kw, source):
    kw.setdefault("max_train_steps", None)
    with pytest.raises(ValueError, match=f"crepa_warmup_steps={kw['warmup_steps']} ≥ {source}: .*cliff"):
        CoefficientSchedule(1.0, scheduler="linear", **kw)
    late = CoefficientSchedule(1.0, scheduler="linear", warmup_steps=20)
    with pytest.raises(ValueError, match="cliff"):
        late.max_train_steps = 20
    CoefficientSchedule(1.0, warmup_steps=20, decay_steps=10)  # constant: the decay never runs


def test_zero_lambda_and_zero_power_edge():
    s = sched(lambda_=0.0)
    assert s.weight(0) == 0.0 and s.weight(10) == 0.0


def test_step_cutoff():
    s = sched(cutoff_step=50)
    assert [s.weight(t) for t in (0, 49, 50, 100)] == [1, 1, 0, 0]
    assert sched(cutoff_step=0).weight(10 ** 6) == 1.0  # 0 = no cutoff


def test_bad_step_and_arguments():
    s = sched()
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="step must be an int ≥ 0"):
            s.weight(bad)
    with pytest.raises(ValueError, match="urepa_scheduler must be one of"):
        CoefficientSchedule(1.0, scheduler="step", prefix="urepa_")
    with pytest.raises(ValueError, match="threshold_mode must be one of"):
        CoefficientSchedule(1.0, threshold_mode="sometimes")
    with pytest.raises(ValueError, match="max_train_steps must be an int"):
        CoefficientSchedule(1.0, max_train_steps=-3)
    with pytest.raises(ValueError, match="max_train_steps must be an int"):
        s.max_train_steps = 2.5


def run(s, sims, start=0):
    """Per step: observe the similarity, return (host weight, effective weight)."""
    out = []
    for i, sim in enumerate(sims, start):
        w = s.weight(i)
        gate = s.observe(torch.tensor(sim)) if w else None
        out.append((w, w * (1.0 if gate is None else gate.item())))
    return out


def test_similarity_permanent():
    s = sched(similarity_threshold=0.9, similarity_ema_decay=0.0)
    eff = [e for _, e in run(s, [0.5, 0.8, 0.95, 0.5, 0.5])]
    assert eff == [1, 1, 0, 0, 0]  # the crossing step itself is already cut off (as SimpleTuner)
    assert s.weight(3) == 0.0  # the host knows (CPU: at once) and skips the work
    assert bool(s.similarity_cutoff)


def test_similarity_recoverable():
    s = sched(similarity_threshold=0.9, similarity_ema_decay=0.0, threshold_mode="recoverable")
    res = run(s, [0.5, 0.95, 0.5, 0.97])
    assert [e for _, e in res] == [1, 0, 1, 0]
    assert [w for w, _ in res] == [1, 1, 1, 1]  # recoverable keeps measuring the similarity


def test_similarity_ema_and_threshold_zero_honoured():
    s = sched(similarity_threshold=0.95, similarity_ema_decay=0.5)
    s.observe(torch.tensor(0.5))
    assert s.similarity_ema.item() == pytest.approx(0.5)
    s.observe(torch.tensor(0.9))
    assert s.similarity_ema.item() == pytest.approx(0.7)
    s = sched(similarity_threshold=0.0, similarity_ema_decay=0.0)
    assert s.observe(torch.tensor(-0.1)).item() == 1.0 and s.observe(torch.tensor(0.0)).item() == 0.0


def test_no_threshold_no_tracking():
    s = sched()
    assert s.observe(torch.tensor(0.99)) is None and s.similarity_ema is None


@pytest.mark.parametrize("mode", ["permanent", "recoverable"])
def test_resume_through_state_dict(mode):
    # EMA (decay 0.5, step 0 skipped by warmup): .3 .35 .425 | .4875 .69 (cut) .395 .2975
    sims = [0.2, 0.3, 0.4, 0.5, 0.55, 0.9, 0.1, 0.2]
    kw = dict(scheduler="cosine", warmup_steps=2, decay_steps=8, similarity_threshold=0.6,
              similarity_ema_decay=0.5, threshold_mode=mode)
    full = run(sched(**kw), sims)
    first = sched(**kw)
    head = run(first, sims[:4])
    state = first.state_dict()
    assert set(state) == {"similarity_ema", "cutoff_triggered"}
    resumed = sched(**kw)
    resumed.load_state_dict(state)
    tail = run(resumed, sims[4:], start=4)
    assert [v for pair in head + tail for v in pair] == pytest.approx([v for pair in full for v in pair])
    assert [e for _, e in full][5:] == ([0, 0, 0] if mode == "permanent" else [0, *[w for w, _ in full][6:]])
    with pytest.raises(KeyError, match="missing"):
        resumed.load_state_dict({})


def test_from_config_uses_prefixed_keys():
    cfg = load_config({"urepa_scheduler": "linear", "urepa_decay_steps": 10, "urepa_lambda": 0.4,
                       "urepa_similarity_threshold": 0.5}).urepa
    s = CoefficientSchedule.from_config(cfg)
    assert s.weight(5) == pytest.approx(0.2) and s.tracks_similarity
    with pytest.raises(ValueError, match="urepa_decay_steps=0"):
        CoefficientSchedule.from_config(load_config({"urepa_scheduler": "linear"}).urepa).weight(0)


def test_deferred_read_returns_what_was_put_once():
    read = DeferredRead()
    assert read.take() is None
    flag = torch.tensor(True)
    read.put(flag)
    flag.fill_(False)  # the copy was taken at put time
    assert bool(read.take()) and read.take() is None
