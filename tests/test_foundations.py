"""Unit tests of the foundations: core, data, models, training, measure, lab."""
import json
import os
import random

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
import torch.utils.data as tud

from dlopt_labs import core, data, models, training, measure, lab


# core -------------------------------------------------------------------------------------------

def test_seed_everything_reproduces_every_generator():
    core.seed_everything(7); a = (torch.rand(4), np.random.rand(3), random.random())
    core.seed_everything(7); b = (torch.rand(4), np.random.rand(3), random.random())
    core.seed_everything(8); c = torch.rand(4)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_seed_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        core.seed_everything(bad)


def test_dataloader_workers_are_seeded():
    ds = tud.TensorDataset(torch.arange(8.))
    class Noisy(tud.Dataset):
        def __len__(self): return 4
        def __getitem__(self, i): return np.random.rand()
    def draw(seed):
        dl = tud.DataLoader(Noisy(), batch_size=2, num_workers=2, worker_init_fn=core.seed_worker, generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(dl))
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_device_and_fingerprint():
    assert core.get_device().type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="use 'cpu'"): core.get_device("cuda")
    fp = core.env_fingerprint()
    json.dumps(fp)
    assert fp["versions"]["torch"] == torch.__version__ and fp["torch_threads"] == torch.get_num_threads()
    assert fp["cpu"]["model"] and isinstance(fp["cpu"]["flags"], list)


# data -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,n,classes", [("digits", 1797, 10), ("breast_cancer", 569, 2), ("wine", 178, 3), ("shapes", 2000, 4)])
def test_registered_sets_load_and_verify(name, n, classes):
    ds = data.load(name)
    assert len(ds) == n and len(ds.classes) == classes and ds.meta["verified"]
    assert ds.X.dtype == np.float32


def test_every_registered_set_has_card_and_manifest():
    man = data.manifest()
    for name in data.names():
        e = man[name]
        assert {"origin", "licence", "n_samples", "sha256", "card"} <= set(e)
        assert (data.datasets_dir() / e["card"]).exists()


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(data.DataError, match=r"unknown data set 'digts'.*Did you mean 'digits'"):
        data.load("digts")


def test_checksum_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    src = data.datasets_dir()
    man = json.loads((src / "manifest.json").read_text())
    man["wine"]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    monkeypatch.setenv("DLOPT_DATASETS", str(tmp_path))
    with pytest.raises(data.DataError, match="checksum mismatch for 'wine'.*make setup"):
        data.load("wine")
    assert data.load("wine", verify=False).meta["verified"] is False


def test_missing_manifest_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("DLOPT_DATASETS", str(tmp_path))
    with pytest.raises(data.DataError, match="no manifest.json"):
        data.load("digits")


def test_shapes_masks_and_determinism():
    X, y, M = data.make_shapes(64, size=24, seed=3)
    X2, y2, M2 = data.make_shapes(64, size=24, seed=3)
    assert np.array_equal(X, X2) and np.array_equal(M, M2) and np.array_equal(y, y2)
    assert np.bincount(y).tolist() == [16] * 4
    inside = (X * M).sum((1, 2)) / M.sum((1, 2)); outside = (X * ~M).sum((1, 2)) / (~M).sum((1, 2))
    assert (inside > outside + 0.3).all(), "the object is brighter than the noise around it"
    assert data.load("shapes", n=100, size=16).meta["verified"] is False   # non-reference configs are not checked


def test_split_is_stratified_seeded_and_disjoint():
    ds = data.load("digits")
    s1, s2, s3 = data.split(ds, seed=0), data.split(ds, seed=0), data.split(ds, seed=1)
    assert np.array_equal(s1.y_val, s2.y_val) and not np.array_equal(s1.y_val, s3.y_val)
    assert sum(s1.sizes().values()) == len(ds)
    for part in (s1.y_train, s1.y_val, s1.y_test):
        share = np.bincount(part, minlength=10) / len(part)
        assert np.abs(share - np.bincount(ds.y) / len(ds)).max() < 0.02
    rows = {r.tobytes() for r in s1.X_train}
    assert not any(r.tobytes() in rows for r in s1.X_test[:50]) or len(rows) < len(s1.X_train)   # digits has a few duplicates
    with pytest.raises(ValueError, match="val and test must be fractions"):
        data.split(ds, val=0.6, test=0.5)


def test_tabular_standardised_on_train_only():
    s = data.split(data.load("breast_cancer"))
    assert np.allclose(s.X_train.mean(0), 0, atol=1e-4) and np.allclose(s.X_train.std(0), 1, atol=1e-3)
    assert not np.allclose(s.X_test.mean(0), 0, atol=1e-4)


def test_loaders_shapes_and_seeded_shuffle():
    s = data.split(data.load("digits"))
    a = next(iter(data.loaders(s, 16, seed=0, images=True)["train"]))[1]
    b = next(iter(data.loaders(s, 16, seed=0, images=True)["train"]))[1]
    assert torch.equal(a, b)
    x, _ = next(iter(data.loaders(s, 16, images=True)["val"]))
    assert x.shape == (64, 1, 8, 8)


# models -----------------------------------------------------------------------------------------

def test_models_build_and_validate():
    assert models.MLP(64, 10, batchnorm=True, dropout=0.2)(torch.randn(3, 64)).shape == (3, 10)
    assert models.SmallCNN(n_classes=4)(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="dropout"): models.MLP(4, 2, dropout=1.5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"): models.SmallCNN()(torch.randn(2, 64))


# training ---------------------------------------------------------------------------------------

def _tiny():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 10, generator=g); y = (X[:, 0] > 0).long()
    return tud.DataLoader(tud.TensorDataset(X, y), 32, shuffle=True, generator=torch.Generator().manual_seed(0)), tud.DataLoader(tud.TensorDataset(X, y), 128)


def test_fit_learns_and_returns_history():
    tr, va = _tiny(); torch.manual_seed(0)
    net = models.MLP(10, 2, hidden=(16,))
    h = training.fit(net, tr, va, epochs=5, lr=1e-2, progress=False, device="cpu")
    assert isinstance(h, pd.DataFrame) and list(h.epoch) == [1, 2, 3, 4, 5]
    assert {"train_loss", "val_loss", "val_acc", "lr", "time_s"} <= set(h.columns)
    assert h.train_loss.iloc[-1] < h.train_loss.iloc[0] and h.val_acc.iloc[-1] > 0.9


def test_fit_is_reproducible_with_the_same_seed():
    def run():
        tr, va = _tiny(); torch.manual_seed(1); net = models.MLP(10, 2, hidden=(16,))
        return training.fit(net, tr, va, epochs=2, progress=False, device="cpu").drop(columns="time_s")
    pd.testing.assert_frame_equal(run(), run())


def test_fit_seed_makes_a_call_independent_of_history():
    tr, _ = _tiny()
    def once():
        torch.manual_seed(0); net = models.MLP(10, 2, hidden=(8,))
        training.fit(net, tr, epochs=1, seed=3, progress=False, device="cpu")
        return net[1].weight.detach().clone()
    a = once(); next(iter(tr)); torch.rand(5)          # disturb the generators
    assert torch.equal(a, once())


def test_early_stopping_stops_and_restores_best():
    tr, va = _tiny(); torch.manual_seed(0)
    net = models.MLP(10, 2, hidden=(16,))
    es = training.EarlyStopping("val_loss", patience=2)
    h = training.fit(net, tr, va, epochs=200, lr=0.5, opt="sgd", callbacks=[es], progress=False, device="cpu")
    assert len(h) < 200 and len(h) == es.best_epoch + 2
    assert training.evaluate(net, va)["loss"] == pytest.approx(es.best, rel=1e-5)


def test_early_stopping_without_validation_is_explained():
    tr, _ = _tiny()
    with pytest.raises(KeyError, match="pass val_dl"):
        training.fit(models.MLP(10, 2), tr, epochs=2, callbacks=[training.EarlyStopping()], progress=False)


def test_accumulation_equals_large_batch():
    X = torch.randn(64, 8); y = torch.randint(0, 3, (64,))
    def one(bs, k):
        torch.manual_seed(0); m = nn.Linear(8, 3)
        training.fit(m, tud.DataLoader(tud.TensorDataset(X, y), bs), epochs=1, lr=0.1, opt="sgd", accum_steps=k, progress=False, device="cpu")
        return m.weight.detach()
    torch.testing.assert_close(one(64, 1), one(16, 4))
    assert not torch.allclose(one(64, 1), one(16, 1))


def test_bf16_clipping_and_schedules_run():
    tr, va = _tiny(); torch.manual_seed(0)
    h = training.fit(models.MLP(10, 2), tr, va, epochs=2, amp="bf16", clip=1.0, scheduler="onecycle", lr=1e-2, progress=False, device="cpu")
    assert np.isfinite(h.train_loss).all() and h.lr.iloc[-1] < 1e-2
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        training.fit(models.MLP(10, 2), tr, epochs=1, amp="fp16", progress=False, device="cpu")
    with pytest.raises(ValueError, match="unknown optimizer"):
        training.fit(models.MLP(10, 2), tr, epochs=1, opt="lion", progress=False)


def test_progress_bar_switch(monkeypatch, capsys):
    monkeypatch.setenv("DLOPT_PROGRESS", "0")
    assert training.progress_enabled() is False and training.progress_enabled(True) is True
    tr, _ = _tiny()
    training.fit(models.MLP(10, 2), tr, epochs=1, device="cpu")
    assert capsys.readouterr().out.startswith("fit: 1 epochs")


# measure ----------------------------------------------------------------------------------------

def test_time_it_percentiles_and_threads_restored():
    before = torch.get_num_threads()
    t = measure.time_it(lambda: torch.randn(64, 64) @ torch.randn(64, 64), warmup=1, repeats=15, n_threads=1)
    assert t.threads == 1 and torch.get_num_threads() == before and len(t.times) == 15
    assert t.pct(0) <= t.p50 <= t.p95 <= t.p99 <= t.pct(100)
    s = t.summary("us"); assert s["p50_us"] == pytest.approx(t.p50 * 1e6)


def test_time_it_orders_work_by_size():
    a, b = torch.randn(64, 64), torch.randn(512, 512)
    small = measure.time_it(lambda: a @ a, repeats=10, n_threads=1).median
    big = measure.time_it(lambda: b @ b, repeats=10, n_threads=1).median
    assert big > 20 * small      # 512x more multiply-adds


def test_peak_memory_grows_with_allocation_and_isolates_runs():
    small = measure.peak_memory(lambda: torch.ones(2**20).sum())            # 4 MiB
    big = measure.peak_memory(lambda: torch.ones(32 * 2**20).sum())         # 128 MiB
    again = measure.peak_memory(lambda: torch.ones(2**20).sum())
    assert 100 < big < 200 and small < 20 and again < 20, (small, big, again)


def test_peak_memory_reports_the_failure():
    def boom(): raise ZeroDivisionError("x")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        measure.peak_memory(boom)


def test_sizes_params_flops():
    lin = nn.Linear(100, 10)
    assert measure.count_params(lin) == 1010
    with torch.no_grad(): lin.weight[:5] = 0
    assert measure.count_params(lin, nonzero=True) == 1010 - 500
    assert measure.model_size_bytes(lin) == measure.model_size_bytes(lin.state_dict()) > 1010 * 4
    assert measure.count_flops(lin, torch.randn(8, 100)) == 2 * 8 * 100 * 10
    # backward adds the weight gradient (as much as the forward); the input needs no gradient here
    assert measure.count_flops(lin, torch.randn(8, 100), backward=True) == 2 * 2 * 8 * 100 * 10
    assert measure.count_flops(lin, torch.randn(8, 100, requires_grad=True), backward=True) == 3 * 2 * 8 * 100 * 10


# lab --------------------------------------------------------------------------------------------

def test_rules_are_code_that_can_come_out_either_way():
    ev = dict(speedup_lo=1.3, speedup_hi=1.5, noise_lo=0.95, noise_hi=1.05)
    rule = dict(holds="speedup_lo > 1.1 * noise_hi", fails="speedup_hi < 1.1 * noise_lo", otherwise="inconclusive")
    assert lab.judge(ev, **rule) == "holds"
    assert lab.judge(dict(ev, speedup_lo=0.9, speedup_hi=1.0), **rule) == "fails"
    assert lab.judge(dict(ev, speedup_lo=1.0, speedup_hi=1.3), **rule) == "inconclusive"
    assert lab.judge(dict(a=[1, 2, 3]), holds="all(x > 0 for x in a)", fails="any(x < 0 for x in a)") == "holds"
    with pytest.raises(ValueError, match="both for"): lab.judge(dict(a=1), holds="a > 0", fails="a >= 1")
    with pytest.raises(ValueError, match="the evidence has"): lab.judge(dict(a=1), holds="b > 0", fails="a < 0")
    with pytest.raises(ValueError, match="not a Python expression"): lab.judge(dict(a=1), holds="a >", fails="a < 0")
    with pytest.raises(ValueError, match="otherwise must be"): lab.judge(dict(a=1), holds="a > 0", fails="a < 0", otherwise="maybe")
    with pytest.raises(ValueError, match="the evidence has"): lab.judge(dict(a=1), holds="__import__('os')", fails="a < 0")
    rec = lab.Record(1, "smoke", 0, {}, path="/nonexistent/x.json")
    # a rule fixed by construction is refused: no plausible measurement makes it fail
    with pytest.raises(ValueError, match="would_fail"):
        rec.claim("k", "源", dict(x=1.0), claim="c", holds="x == x", fails="x != x", would_hold={}, would_fail=dict(x=2.0))
    with pytest.raises(ValueError, match="does not have"):
        rec.claim("k", "源", dict(x=1.0), claim="c", holds="x > 0", fails="x < 0", would_hold={}, would_fail=dict(y=-1.0))


def test_rule_text_values_and_cards():
    assert lab.rule_value("abs(x) > 1", dict(x=-2.0)) and not lab.rule_value("x > 1", dict(x=0.5))
    assert set(lab.RULE_FUNCTIONS) >= {"abs", "min", "max", "all", "any", "len", "sum"}
    assert lab.OTHERWISE == ("depends", "inconclusive") and set(lab.OTHERWISE) < set(lab.VERDICTS)
    assert lab.rule_text("a > 1", "a < 1", "depends") == "holds if a > 1; fails if a < 1; else depends"
    assert lab.format_value([1.23456, 2, {"k": 0.5}] * 3).count("1.235") == 3, "nothing is cut from a long list"
    claim = dict(key="k", claim="c <x>", source="源", verdict="inconclusive", holds="x > 1", fails="x < 0",
                 otherwise="inconclusive", evidence=dict(x=0.5), would_hold=dict(x=2), would_fail=dict(x=-1))
    html = lab.claims_html([claim])
    assert lab.VERDICT_COLOURS["inconclusive"] in html and "c &lt;x&gt;" in html and "x &gt; 1" in html


def test_settings_modes():
    s = lab.settings("smoke", dict(A=1, B=[1]), dict(A=10, B=[1, 2]), A=None, B=[5])
    assert s.A == 1 and s.B == [5] and s.MODE == "smoke"
    with pytest.raises(ValueError, match="MODE must be one of"): lab.settings("fast", {}, {})
    with pytest.raises(ValueError, match="same names"): lab.settings("full", dict(A=1), dict(B=1))


def test_record_roundtrip_and_atomic_save(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    rec = lab.Record(1, "smoke", 0, dict(X=np.int64(3)), path=path, title="t")
    rec.section("a"); rec.log(acc=np.float32(0.5), table=pd.DataFrame(dict(a=[1, 2])), inf=float("inf"))
    rec.claim("k", "源", dict(x=1.0), claim="claim", holds="x > 0", fails="x < 0", would_hold={}, would_fail=dict(x=-1.0))
    rec.save()
    d = json.loads(path.read_text())
    assert lab.check_record(d, ["k"]) == [] and d["metrics"]["table"] == [{"a": 1}, {"a": 2}] and d["metrics"]["inf"] is None
    # a save that fails half-way leaves the old record intact and no temporary file
    rec.log(later=1)
    monkeypatch.setattr(lab.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError): rec.save()
    assert json.loads(path.read_text()) == d and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_check_record_finds_problems():
    assert "missing key 'claims'" in lab.check_record({})
    rec = lab.Record(1, "smoke", 0, {}, path="/nonexistent/x.json").to_dict()
    problems = lab.check_record(rec, ["a"])
    assert "no metrics" in problems and "claim 'a' has no verdict" in problems


def test_exercise_check_reports_instead_of_raising(capsys):
    @lab.exercise(3, "add")
    def check(fn): assert fn(1, 2) == 3, "1 + 2 should be 3"
    def todo(a, b): raise NotImplementedError("exercise 3: write add")
    assert check(lambda a, b: a + b).status == "passed"
    r = check(lambda a, b: a - b); assert r.status == "failed" and "1 + 2 should be 3" in r.message
    assert check(todo).status == "not done"
    assert check(lambda a: a).status == "failed"            # a wrong signature is a failure, not a crash
    out = capsys.readouterr().out
    assert "exercise 3 (add): not done yet" in out and "exercise 3 (add): passed" in out


def test_try_it_controls_follow_defaults_and_drive_the_function():
    calls = []
    def f(x=2, scale=0.5, mode="a", flag=False): calls.append((x, scale, mode, flag)); return x * scale, mode, flag
    w = lab.try_it(f, dict(x=2, scale=0.5, mode="a", flag=False), dict(x=(0, 10, 1), scale=(0.0, 1.0, 0.1), mode=["a", "b"]))
    assert {k: c.value for k, c in w.controls.items()} == dict(x=2, scale=0.5, mode="a", flag=False)
    assert type(w.controls["x"]).__name__ == "IntSlider" and type(w.controls["flag"]).__name__ == "Checkbox"
    w.controls["x"].value = 7; w.controls["mode"].value = "b"
    assert w.result == f(x=7, scale=0.5, mode="b", flag=False)
    with pytest.raises(ValueError, match="outside its range"): lab.try_it(f, dict(x=20), dict(x=(0, 10, 1)))
    with pytest.raises(ValueError, match=r"\(min, max, step\)"): lab.try_it(f, dict(x=2))


def test_front_matter_is_read_into_the_chapter_record():
    from dlopt_labs.course.chapters import written_chapters, read_chapter
    ch = written_chapters()[15]
    assert ch.number == 15 and ch.heading == "15 · Pruning" and ch.subtitle == "如何提高深度学习模型的压缩效率？"
    assert ch.title == "Pruning" and ch.module == "dlopt_labs.efficient.prune" and ch.exercises >= 2
    assert read_chapter(core.course_root() / "nbs" / "foundations" / "00_core.ipynb") is None


def test_timing_summary_percentiles():
    from dlopt_labs.measure import Timing
    t = Timing([0.001 * k for k in range(1, 101)], threads=1)
    s = t.summary("ms")
    assert s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01) and s["repeats"] == 100 and s["threads"] == 1
    assert t.median == pytest.approx(0.0505) and t.p95 < t.p99
