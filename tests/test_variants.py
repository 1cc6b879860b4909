"""Tests of `measure.variants`: the original / optimised / ratio table that optimisation chapters report."""
import copy

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from dlopt_labs import measure
from dlopt_labs.measure import variants, split_timings, model_size_bytes, TIMING_COLUMNS, RATIO_COLUMNS
from dlopt_labs.models import MLP

FAST = dict(repeats=3, warmup=1, n_threads=1)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    wide, narrow = MLP(12, 4, hidden=(48, 24)), MLP(12, 4, hidden=(24, 12))
    x, y = torch.randn(40, 12), torch.randint(0, 4, (40,))
    return wide, narrow, x, DataLoader(TensorDataset(x, y), batch_size=16)


def _flops(model, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model(x)
    return fc.get_total_flops()


def test_table_matches_hand_computed_values(setup):
    wide, narrow, x, dl = setup
    t = variants(dict(wide=wide, narrow=narrow), x[:8], dl, **FAST)
    assert list(t.index) == ["wide", "narrow"] and t.index.name == "model"
    for name, m, hidden in (("wide", wide, (48, 24)), ("narrow", narrow, (24, 12))):
        dims = (12, *hidden, 4)
        params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
        assert t.loc[name, "params"] == params == t.loc[name, "nonzero"]
        assert t.loc[name, "size_bytes"] == model_size_bytes(m)
        assert t.loc[name, "flops"] == _flops(m, x[:8]) == 2 * 8 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
        with torch.no_grad(): acc = float((m(x).argmax(1) == dl.dataset.tensors[1]).float().mean())
        assert t.loc[name, "acc"] == pytest.approx(acc)
        assert t.loc[name, "p50_ms"] <= t.loc[name, "p95_ms"] <= t.loc[name, "p99_ms"]
    for col in RATIO_COLUMNS:
        assert t.loc["wide", f"{col}_ratio"] == 1
        assert t.loc["narrow", f"{col}_ratio"] == pytest.approx(t.loc["narrow", col] / t.loc["wide", col])


def test_ratio_direction_and_named_baseline(setup):
    wide, narrow, x, dl = setup
    zeroed = copy.deepcopy(wide)
    with torch.no_grad(): zeroed[1].weight[:, :6] = 0
    t = variants(dict(wide=wide, narrow=narrow, zeroed=zeroed), x, **FAST)
    assert "acc" not in t and "acc_ratio" not in t, "no DataLoader, no accuracy columns"
    assert t.loc["narrow", "params_ratio"] < 1 and t.loc["narrow", "flops_ratio"] < 1 and t.loc["narrow", "size_bytes_ratio"] < 1
    assert t.loc["zeroed", "params_ratio"] == 1 and t.loc["zeroed", "nonzero"] == t.loc["wide", "params"] - 48 * 6
    t2 = variants(dict(wide=wide, narrow=narrow), x, baseline="narrow", **FAST)
    assert t2.loc["narrow", "params_ratio"] == 1 and t2.loc["wide", "params_ratio"] > 1


def test_latency_ratio_direction():
    torch.manual_seed(0)
    big, small = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512)), nn.Linear(512, 8)
    t = variants(dict(big=big, small=small), torch.randn(128, 512), repeats=5, warmup=2, n_threads=1)
    assert t.loc["small", "p50_ms_ratio"] < 1 < 1 / t.loc["small", "p50_ms_ratio"]


def test_modes_restored_and_no_grad_kept(setup):
    wide, narrow, x, _ = setup
    wide.train(); narrow.eval(); narrow[1].train()
    variants(dict(wide=wide, narrow=narrow), x, **FAST)
    assert all(m.training for m in wide.modules())
    assert not narrow.training and narrow[1].training and not narrow[2].training
    assert all(p.grad is None for p in wide.parameters())


def test_input_follows_model_device(setup, monkeypatch):
    wide, _, x, _ = setup
    t = variants(dict(cpu=wide), x, **FAST)          # CPU model, CPU input
    assert t.loc["cpu", "params_ratio"] == 1
    seen = []
    real = measure._device
    monkeypatch.setattr(measure, "_device", lambda m: seen.append(m) or real(m))
    variants(dict(cpu=wide), x, **FAST)
    assert seen == [wide], "the input's device is read from the model"
    assert real(wide) == next(wide.parameters()).device and real(nn.ReLU()) == torch.device("cpu")
    # the input may live elsewhere (here: another dtype stands in for another device): it is moved with .to
    moved = []
    class Spy(torch.Tensor):
        def to(self, *a, **kw): moved.append(a); return super().to(*a, **kw)
    variants(dict(cpu=wide), x.as_subclass(Spy), **FAST)
    assert moved and moved[0] == (torch.device("cpu"),)


def test_split_timings(setup):
    wide, narrow, x, dl = setup
    t = variants(dict(wide=wide, narrow=narrow), x, dl, **FAST)
    fixed, timed = split_timings(t)
    assert list(timed.columns) == list(TIMING_COLUMNS)
    assert set(fixed.columns) | set(timed.columns) == set(t.columns) and not set(fixed.columns) & set(TIMING_COLUMNS)
    assert isinstance(fixed, pd.DataFrame) and list(fixed.index) == ["wide", "narrow"]


@pytest.mark.parametrize("kw, match", [
    (dict(models={}), "non-empty dict"),
    (dict(models=[nn.Linear(2, 2)]), "non-empty dict"),
    (dict(models=dict(a="not a model")), "nn.Module"),
    (dict(baseline="missing"), r"baseline 'missing' is not among the models \['a'\]"),
    (dict(repeats=0), "repeats must be >= 1"),
    (dict(warmup=-1), "warmup must be >= 0"),
])
def test_bad_inputs_raise_clear_errors(kw, match):
    args = dict(models=dict(a=nn.Linear(3, 2)), x=torch.randn(2, 3)) | kw
    with pytest.raises(ValueError, match=match): variants(**args)
