"""Chapter 12: every diagnostic on every planted bug and on the fixed script, and which ones fire.

The expected matrix is the chapter's design: each bug is found by the check written for it (and, where the bug
breaks learning, by the checks that watch learning); the clean script passes every check. Smoke settings, as the
chapter's smoke run uses them."""
import pytest
import torch

from dlopt_labs.data import load, split
from dlopt_labs.debug import diagnose as D

EXPECTED = {
    "none": set(),
    "softmax_before_loss": {"overfit_one_batch"},
    "no_zero_grad": {"overfit_one_batch", "zero_grad_check"},
    "labels_shuffled": {"learns"},
    "eval_mode": {"mode_check"},
    "lr_too_high": {"nan_hooks", "overfit_one_batch", "learns"},
    "bad_init": {"init_loss"},
    "wrong_backward": {"gradcheck"},
    "batch_mixing": {"batch_independence", "overfit_one_batch", "learns"},
    # the one bug that raises: every check that runs the loss fires with the error
    "target_shape": {"shape_check", "overfit_one_batch", "nan_hooks", "mode_check", "zero_grad_check", "learns"},
}


@pytest.fixture(scope="module")
def data():
    return split(load("digits"), seed=0)


def test_the_expected_matrix_names_every_bug_and_every_diagnostic():
    assert set(EXPECTED) == {"none", *D.BUGS}
    assert set().union(*EXPECTED.values()) <= set(D.DIAGNOSTICS)


@pytest.mark.parametrize("bug", list(EXPECTED))
def test_each_diagnostic_fires_exactly_where_expected(data, bug):
    script = D.Script(data, () if bug == "none" else (bug,), seed=0)
    table = D.diagnose(script, overfit_steps=150, epochs=2)
    fired = set(table.diagnostic[table.fired])
    assert fired == EXPECTED[bug], table.to_string()


def test_only_the_shape_bug_raises_when_the_script_runs(data):
    raised = []
    for bug in D.BUGS:
        try:
            D.Script(data, (bug,), seed=0).run(1)
        except Exception:
            raised.append(bug)
    assert raised == ["target_shape"]


def test_gradcheck_passes_the_right_squareplus_and_matches_autograd():
    """The hand-written backward of the correct layer equals autograd's derivative of the same formula."""
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    D.SquarePlus()(x).sum().backward()
    ours = x.grad.clone(); x.grad = None
    ((x + torch.sqrt(x * x + 4)) / 2).sum().backward()
    torch.testing.assert_close(ours, x.grad)
    assert torch.autograd.gradcheck(D.SquarePlus(), (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))


def test_the_network_and_gradcheck_on_their_own(data):
    """DebugNet's output is (N, classes); gradcheck_layers passes the right layer and fires on the wrong one."""
    net = D.DebugNet(in_features=64, classes=10, device="cpu")
    assert net(torch.randn(5, 64)).shape == (5, 10)
    assert not D.gradcheck_layers(D.Script(data, seed=0))["fired"]
    assert D.gradcheck_layers(D.Script(data, ("wrong_backward",), seed=0))["fired"]


def test_nan_hooks_name_a_module_of_the_network(data):
    detail = D.nan_hooks(D.Script(data, ("lr_too_high",), seed=0))["detail"]
    names = {name for name, _ in D.Script(data, seed=0).make_model().named_modules() if name}
    assert detail.startswith("first non-finite output: ") and detail.split(": ")[1].split(" at step")[0] in names
