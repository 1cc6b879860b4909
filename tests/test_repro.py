"""Chapter 24: bit-for-bit repeats, the run record and its diff, the workers' generators."""
import json
import math

import numpy as np
import pytest
import torch

from dlopt_labs.data import load, split
from dlopt_labs.debug import repro as R


@pytest.fixture(scope="module")
def data():
    return split(load("wine"), seed=1)          # a data set the chapter does not train on


def test_same_seed_and_threads_give_the_same_bits_and_another_seed_does_not(data):
    a, b = R.train_weights(data, 3, 1, 2), R.train_weights(data, 3, 1, 2)
    assert R.weights_digest(a) == R.weights_digest(b) and R.max_abs_diff(a, b) == 0.0
    c = R.train_weights(data, 4, 1, 2)
    assert R.weights_digest(c) != R.weights_digest(a) and R.max_abs_diff(a, c) > 0


def test_the_digest_sees_one_bit():
    state = {"w": torch.ones(3, 3), "b": torch.zeros(3)}
    flipped = {k: v.clone() for k, v in state.items()}
    flipped["w"].view(torch.int32)[1, 1] ^= 1            # the lowest bit of one float
    assert R.weights_digest(state) != R.weights_digest(flipped)
    assert R.weights_digest(state) == R.weights_digest({k: v.clone() for k, v in state.items()})


def test_run_records_diff_by_key(tmp_path, data):
    w = R.train_weights(data, 0, 1, 1)
    first = R.write_run(R.run_record(dict(seed=0, lr=0.05), dict(acc=0.5), w), tmp_path / "a.json")
    second = R.run_record(dict(seed=0, lr=0.1), dict(acc=0.5), w)
    diff = R.diff_runs(first, second)
    assert set(diff.key) - {"written"} == {"config.lr"}
    env = json.loads(first.read_text())["environment"]
    assert env["versions"]["torch"] and "git" in json.dumps(env)      # versions and the revision are recorded
    assert list(R.diff_runs(first, first).key) == []


def test_a_generator_made_in_init_repeats_across_workers_and_reseeding_fixes_it():
    X, y = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32), np.zeros(128, dtype=int)
    def noise(init):
        loader = torch.utils.data.DataLoader(R.NoisyImages(X, y, seed=0), batch_size=32, num_workers=2,
                                             worker_init_fn=init, generator=torch.Generator().manual_seed(0))
        return R.noise_of(loader, X)
    assert R.repeated_fraction(noise(None)) > 0.9
    first, again = noise(R.reseed_worker), noise(R.reseed_worker)
    assert R.repeated_fraction(first) == 0.0 and np.array_equal(first, again)


def test_digest_and_diff_on_awkward_values(tmp_path):
    """bf16 weights hash; a NaN weight is reported as a difference; a record equals itself on disk and in memory."""
    bf = {"w": torch.ones(2, 2, dtype=torch.bfloat16)}
    assert len(R.weights_digest(bf)) == 16
    nan = {"w": torch.tensor([0.0, float("nan")])}
    assert math.isnan(R.max_abs_diff(nan, {"w": torch.zeros(2)}))
    record = dict(config=dict(seed=np.int64(3), sizes=(1, 2)), metrics=dict(acc=float("nan")))
    path = R.write_run(record, tmp_path / "r.json")
    assert list(R.diff_runs(record, path).key) == []
