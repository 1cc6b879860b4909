"""Each chapter's "try it" function driven directly equals what moving its widget gives; same seed, same metrics."""
import json
from pathlib import Path

import pandas as pd
import pytest

import conftest
import torch

from dlopt_labs.core import seed_everything
from dlopt_labs.data import load, split, loaders, tensors
from dlopt_labs.lab import try_it
from dlopt_labs.models import MLP, SmallCNN
from dlopt_labs.training import fit


@pytest.fixture(scope="module")
def digits_model():
    seed_everything(0)
    dls = loaders(split(load("digits")), 64)
    net = MLP(64, 10, hidden=(64, 32)); fit(net, dls["train"], epochs=3, progress=False, device="cpu")
    return net, dls


def test_pruning_widget_equals_direct_call(digits_model):
    from dlopt_labs.efficient.prune import try_pruning
    net, dls = digits_model
    fn = lambda sparsity, scope, finetune_epochs: try_pruning(net, dls, sparsity, scope, finetune_epochs, 0)
    w = try_it(fn, dict(sparsity=0.5, scope="global", finetune_epochs=1), dict(sparsity=(0.0, 0.99, 0.01), scope=["global", "layer"], finetune_epochs=(0, 5, 1)))
    w.controls["sparsity"].value = 0.8; w.controls["scope"].value = "layer"
    direct = try_pruning(net, dls, 0.8, "layer", 1, 0)
    pd.testing.assert_frame_equal(w.result, direct)
    assert direct.loc[1, "sparsity"] == pytest.approx(0.8, abs=1e-3) and direct.loc[1, "dense_kib"] == direct.loc[0, "dense_kib"]


def test_calibration_widget_equals_direct_call():
    from dlopt_labs.reliable.calibrate import try_calibration
    torch.manual_seed(0)
    ds = load("shapes", n=200, size=16)
    x, y = tensors(ds.X, ds.y, ds.image_shape)
    net = SmallCNN(1, 4, widths=(4, 8), dropout=0.2)
    fn = lambda temperature, noise: try_calibration(net, x, y, temperature, noise, 10, 0, plot=False)
    w = try_it(fn, dict(temperature=1.0, noise=0.0), dict(temperature=(0.05, 5.0, 0.05), noise=(0.0, 0.6, 0.05)))
    w.controls["temperature"].value = 2.0; w.controls["noise"].value = 0.2
    pd.testing.assert_frame_equal(w.result, try_calibration(net, x, y, 2.0, 0.2, 10, 0, plot=False))
    with pytest.raises(ValueError, match="temperature must be > 0"): try_calibration(net, x, y, 0.0)


def test_throughput_widget_drives_the_same_configuration():
    from dlopt_labs.speed.throughput import try_throughput
    make = lambda: SmallCNN(1, 4, widths=(4, 8))
    X, Y = torch.randn(32, 1, 16, 16), torch.randint(4, (32,))
    fn = lambda batch_size, amp, n_threads: try_throughput(make, (X, Y), batch_size, amp, False, n_threads, 3)
    w = try_it(fn, dict(batch_size=8, amp="fp32", n_threads=1), dict(batch_size=(1, 32, 1), amp=["fp32", "bf16"], n_threads=(1, 2, 1)))
    w.controls["batch_size"].value = 16; w.controls["amp"].value = "bf16"
    direct = try_throughput(make, (X, Y), 16, "bf16", False, 1, 3)
    cols = ["amp", "channels_last", "batch", "threads"]            # timings differ run to run; the configuration must not
    pd.testing.assert_frame_equal(w.result[cols], direct[cols])
    with pytest.raises(ValueError, match="batch_size must be between"): try_throughput(make, (X, Y), 64)


@pytest.fixture(scope="module")
def reruns(tmp_path_factory, notebook_runs):
    from dlopt_labs.course.runner import run_many
    chapters = sorted(notebook_runs["chapters"])          # every written chapter (or those DLOPT_CHAPTERS selects)
    same = run_many(chapters, "smoke", tmp_path_factory.mktemp("same"), workers=2, progress=False, timeout=120, retries=1)
    other = run_many(chapters, "smoke", tmp_path_factory.mktemp("other"), workers=2, progress=False, params=dict(SEED=1), timeout=120, retries=1)
    return {r.chapter: r for r in same}, {r.chapter: r for r in other}


@pytest.mark.parametrize("n", sorted(conftest.selected_chapters()))
def test_same_seed_gives_the_same_metrics(records, reruns, n):
    """Run twice with one seed: the metrics (timings excluded) are identical; with another seed they change."""
    same, other = reruns
    assert same[n].ok and other[n].ok, (same[n].error, other[n].error)
    again = json.loads(Path(same[n].record).read_text())
    assert again["metrics"] == records[n]["metrics"], "same seed, same threads: the recorded metrics must be identical"
    assert [c["verdict"] for c in again["claims"]][-1] is not None
    changed = json.loads(Path(other[n].record).read_text())
    assert changed["seed"] == 1 and changed["metrics"] != records[n]["metrics"], "another seed must change the metrics"


def test_reader_rating_widget_stores_its_ratings_in_the_record(tmp_path):
    """Clicking the panel's buttons and *save ratings* writes the ratings, by method (not by the blind letter), into
    the record on disk; a second save replaces that reader's earlier rating of the same map; other readers' stay."""
    import matplotlib
    matplotlib.use("Agg")
    from dlopt_labs.explain.evaluate import ReaderRatings, ratings_from_records
    from dlopt_labs.lab import Record
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    maps = {name: torch.rand(3, 1, 8, 8) for name in ("saliency", "grad-cam", "occlusion")}
    rec = Record(30, "smoke", 0, {}, path=tmp_path / "ch30.json")
    rec.log(reader_ratings=[dict(reader="ann", image=0, method="saliency", rating=2)])
    panel = ReaderRatings(x, maps, rec, images=[0, 2], reader="bo", seed=1)
    w = panel.widget()
    labels = [row.children[0].value for row in w.children[1].children]
    assert sorted(labels) == ["A", "B", "C"]                                    # the maps shown under letters
    assert [panel.label(0, m) for m in panel.order[0]] == ["A", "B", "C"]
    w.buttons["grad-cam"].value = 5
    w.buttons["saliency"].value = 1
    w.next_button.click()                                                      # image 2
    assert all(b.value == 0 for b in w.buttons.values())                       # a new image starts unrated
    w.buttons["occlusion"].value = 4
    w.save_button.click()
    stored = json.loads((tmp_path / "ch30.json").read_text())["metrics"]["reader_ratings"]
    assert sorted((r["reader"], r["image"], r["method"], r["rating"]) for r in stored) == [
        ("ann", 0, "saliency", 2), ("bo", 0, "grad-cam", 5), ("bo", 0, "saliency", 1), ("bo", 2, "occlusion", 4)]
    assert "saved" in w.status.value
    w.next_button.click()                                                      # back to image 0: its ratings shown
    assert w.buttons["grad-cam"].value == 5 and w.buttons["occlusion"].value == 0
    w.buttons["grad-cam"].value = 3
    w.buttons["saliency"].value = 0                                            # taken back
    w.save_button.click()
    pooled = ratings_from_records([tmp_path / "ch30.json"])
    assert sorted(map(tuple, pooled[["reader", "image", "method", "rating"]].values.tolist())) == [
        ("ann", 0, "saliency", 2), ("bo", 0, "grad-cam", 3), ("bo", 2, "occlusion", 4)]
    assert set(pooled.record) == {"ch30.json"}
    rec2 = Record(30, "smoke", 0, {}, path=tmp_path / "ch30.json")            # the chapter runs again
    again = ReaderRatings(x, maps, rec2, images=[0, 2], reader="bo", seed=1)
    assert again.ratings == {(0, "grad-cam"): 3, (2, "occlusion"): 4}         # shown again
    rec2.save()                                                                # its last cell: nothing lost
    assert len(json.loads((tmp_path / "ch30.json").read_text())["metrics"]["reader_ratings"]) == 3
    other = ReaderRatings(x, maps, rec2, images=[0, 2], reader="cy", seed=1)
    assert [other.order[i] for i in (0, 2)] != [again.order[i] for i in (0, 2)]  # each reader their own letters


def test_evaluation_widget_equals_direct_call():
    import matplotlib
    matplotlib.use("Agg")
    from dlopt_labs.explain.evaluate import try_evaluation
    from dlopt_labs.data import make_shapes
    X, y, M = make_shapes(n=6, size=16, seed=2)
    torch.manual_seed(0)
    net = SmallCNN(1, 4, widths=(4, 8)).eval()
    x = torch.as_tensor(X)[:, None]
    fn = lambda image, method, fill, steps, tolerance: try_evaluation(net, "features.6", x, M, image, method, fill,
                                                                     steps, tolerance, plot=False)
    w = try_it(fn, dict(image=0, method="saliency", fill="black", steps=8, tolerance=0),
               dict(image=(0, 5, 1), method=["saliency", "grad-cam"], fill=["black", "mean", "blur"], steps=(4, 32, 2),
                    tolerance=(0, 3, 1)))
    w.controls["image"].value = 3; w.controls["method"].value = "grad-cam"; w.controls["fill"].value = "blur"
    direct = try_evaluation(net, "features.6", x, M, 3, "grad-cam", "blur", 8, 0, plot=False)
    pd.testing.assert_frame_equal(w.result, direct)
    assert list(direct.order) == ["grad-cam", "random order"]


def test_boundary_widget_equals_direct_call():
    from dlopt_labs.explain.visualise import try_boundary
    fn = lambda width, epochs, noise, seed: try_boundary(width, epochs, noise, seed, n=120, plot=False)
    w = try_it(fn, dict(width=8, epochs=3, noise=0.25, seed=0),
               dict(width=(1, 64, 1), epochs=(1, 50, 1), noise=(0.0, 1.0, 0.05), seed=(0, 9, 1)))
    w.controls["width"].value = 12; w.controls["noise"].value = 0.4; w.controls["seed"].value = 3
    direct = try_boundary(12, 3, 0.4, 3, n=120, plot=False)
    pd.testing.assert_frame_equal(w.result, direct)
    assert direct.params[0] == 2 * 12 + 12 + 12 * 12 + 12 + 12 * 2 + 2


def test_tsne_widget_equals_direct_call():
    from dlopt_labs.explain.embed import try_tsne
    fn = lambda perplexity, seed, points, iterations: try_tsne(perplexity, seed, points, iterations, plot=False)
    w = try_it(fn, dict(perplexity=30.0, seed=0, points=60, iterations=250),
               dict(perplexity=(2.0, 100.0, 1.0), seed=(0, 9, 1), points=(50, 600, 50), iterations=(250, 1500, 50)))
    w.controls["perplexity"].value = 12.0; w.controls["seed"].value = 2
    direct = try_tsne(12.0, 2, 60, 250, plot=False)
    pd.testing.assert_frame_equal(w.result, direct)
    assert 0.5 < direct.trustworthiness[0] <= 1 and direct.perplexity[0] == 12.0


def test_selection_leak_widget_equals_direct_call():
    from dlopt_labs.reliable.validate import try_leak
    w = try_it(try_leak, dict(features=200, selected=20, samples=60, seed=0),
               dict(features=(20, 5000, 20), selected=(1, 200, 1), samples=(20, 1000, 20), seed=(0, 9, 1)))
    w.controls["features"].value = 400; w.controls["seed"].value = 3
    direct = try_leak(400, 20, 60, 3)
    pd.testing.assert_frame_equal(w.result, direct)
    assert direct.outside[0] > direct.inside[0]          # 400 noise columns, 60 rows: selection finds a pattern


def test_continual_widget_equals_direct_call():
    from dlopt_labs.reliable.continual import METHODS, try_continual
    fn = lambda method, memory, epochs: try_continual(method, memory, 1000.0, epochs, 0, plot=False)
    w = try_it(fn, dict(method="replay", memory=100, epochs=1),
               dict(method=list(METHODS), memory=(10, 1000, 10), epochs=(1, 30, 1)))
    w.controls["memory"].value = 50; w.controls["epochs"].value = 2
    direct = try_continual("replay", 50, 1000.0, 2, 0, plot=False)
    pd.testing.assert_frame_equal(w.result, direct)
    assert direct.bytes_kept[0] == 50 * (64 * 4 + 8)
    assert (direct.average > 0.1).all() and list(direct.scenario) == ["task not told", "task told"]
