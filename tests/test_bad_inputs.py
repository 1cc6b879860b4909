"""Bad input, one table: what a learner or an instructor may get wrong, and the one line each gets back, naming the
problem and the fix. Usage errors exit with status 2; nothing is left half-written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dlopt_labs.core import course_root
from dlopt_labs.course.chapters import written_chapters

CLI = str(Path(sys.executable).parent / "dlopt-labs")
PARAMS15 = "MODE, SEED, RESULTS, EPOCHS, FINETUNE_EPOCHS, SPARSITIES, ROUNDS"
NO_CH = "there is no chapter {n}: the course has chapters 1 to 30 (see `dlopt-labs list`)"
E = "dlopt-labs: error: "

# (name, command line, exit status, the last line of stderr); {tmp} is the test's own folder
CLI_CASES = [
    ("unknown chapter", "run 99", 2, E + NO_CH.format(n=99)),
    ("chapter out of range for new", "new 31", 2, E + NO_CH.format(n=31)),
    ("chapter already written", "new 15", 2,
     E + f"chapter 15 (Pruning) is already written: {written_chapters()[15].path}; edit that notebook instead"),
    ("bad parameter name", "run 15 -p NOPE=1", 2,
     E + f"chapter 15 has no parameter 'NOPE'; its parameters are: {PARAMS15}"),
    ("bad parameter type", "run 15 -p SEED=three", 2,
     E + "parameter SEED of chapter 15 takes a value of type int (default 0), got 'three'"),
    ("bad parameter value", "run 15 -p MODE=fast", 2, E + "MODE must be one of ('smoke', 'full'), got 'fast'"),
    ("parameter without =", "run 15 -p garbage", 2, E + "parameter 'garbage' is not of the form name=value"),
    ("parameter for every chapter", "run all -p SEED=1", 2,
     E + "-p applies to one chapter; run chapters one at a time to set parameters"),
    ("no workers", "run all --workers 0", 2, E + "--workers must be >= 1, got 0"),
    ("zero cell timeout", "run 15 --timeout 0", 2, E + "--timeout must be >= 1 second, got 0"),
    ("unknown mode", "run 15 --mode fast", 2,
     "dlopt-labs run: error: argument --mode: invalid choice: 'fast' (choose from 'smoke', 'full')"),
    ("unknown command", "frobnicate", 2,
     "dlopt-labs: error: argument cmd: invalid choice: 'frobnicate' (choose from 'list', 'new', 'run', 'student', "
     "'grade', 'site', 'syllabus')"),
    ("bundle into a folder that is not empty", "student {tmp}/full 15", 2,
     E + "{tmp}/full is not empty: choose a new folder for the bundle, so nothing of yours is overwritten"),
    ("bundle of an unknown chapter", "student {tmp}/new 99", 2, E + NO_CH.format(n=99)),
    ("grade an unknown chapter", "grade {tmp}/s15.ipynb --chapter 99", 2, E + NO_CH.format(n=99)),
    ("unknown sandbox limit", "grade {tmp}/s15.ipynb --limit foo=1", 2,
     E + "--limit 'foo=1': expected NAME=VALUE with NAME one of wall_s, cpu_s, memory_mib, processes, file_mib"),
    ("zero sandbox limit", "grade {tmp}/s15.ipynb --limit memory_mib=0", 2,
     E + "sandbox limit memory_mib must be a whole number >= 1, got 0"),
    ("sandbox limit not a number", "grade {tmp}/s15.ipynb --limit wall_s=ten", 2,
     E + "--limit wall_s: 'ten' is not a whole number"),
    ("zero grading timeout", "grade {tmp}/s15.ipynb --timeout 0", 2, E + "--timeout and --workers must be >= 1"),
    ("records folder missing", "syllabus --records {tmp}/none", 2,
     E + "--records {tmp}/none: no such folder; pass the --out folder of `dlopt-labs run`, or leave it out for _runs/"),
    ("runs folder missing", "site --runs {tmp}/none", 2,
     E + "--runs {tmp}/none: no such folder; pass the --out folder of `dlopt-labs run all`, or leave --runs out"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "full").mkdir(); (d / "full" / "mine.txt").write_text("mine")
    from dlopt_labs.course.teach import student_notebook
    nbformat.write(student_notebook(15), d / "s15.ipynb")
    return d


def _snapshot(d):
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, argv, status, line", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line(tmp, capsys, name, argv, status, line):
    """The command's own entry point, in this process (the installed script is tested below and in test_cli.py)."""
    from dlopt_labs.course.cli import main
    before = _snapshot(tmp)
    try: code = main(argv.format(tmp=tmp).split())
    except SystemExit as e: code = e.code                    # argparse's own usage errors
    err = capsys.readouterr().err
    assert code == status, err[-1000:]
    assert err.strip().splitlines()[-1] == line.format(tmp=tmp)
    assert _snapshot(tmp) == before, "a refused command wrote something"


def test_the_installed_command_exits_2_on_a_usage_error():
    r = subprocess.run([CLI, "run", "99"], capture_output=True, text=True, timeout=100)
    assert r.returncode == 2 and r.stderr.strip() == E + NO_CH.format(n=99)


def test_output_folder_with_a_missing_parent_is_created(tmp_path):
    out = tmp_path / "handout" / "week1"
    r = subprocess.run([CLI, "student", str(out), "15"], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0 and (out / "15_prune.ipynb").exists(), r.stderr
    assert sorted(p.name for p in (tmp_path / "handout").iterdir()) == ["week1"], "no staging folder left beside it"


@pytest.fixture
def corrupted(tmp_path):
    """A copy of datasets/ whose manifest says another checksum for digits."""
    d = tmp_path / "datasets"
    shutil.copytree(course_root() / "datasets", d)
    m = json.loads((d / "manifest.json").read_text())
    m["digits"]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_chapter_failing_mid_run_on_a_corrupted_data_set(corrupted, tmp_path):
    out = tmp_path / "runs" / "deep"                         # its parent is missing too: created
    r = subprocess.run([CLI, "run", "15", "--mode", "smoke", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, DLOPT_DATASETS=str(corrupted), OMP_NUM_THREADS="1"))
    assert r.returncode == 1
    err = next(l for l in r.stdout.splitlines() if l.startswith("  error: "))
    assert err.startswith("  error: cell ") and ": DataError: checksum mismatch for 'digits': the arrays hash to " in err
    assert err.endswith("Reinstall the pinned packages with `make setup`, or, if the change is intended, update "
                        "datasets/manifest.json.")
    assert sorted(p.name for p in out.iterdir()) == ["ch15-smoke.failed.ipynb"], "no record or notebook half-written"


def _raises(fn, *args, **kw):
    try: fn(*args, **kw)
    except Exception as e: return type(e).__name__, str(e)
    raise AssertionError(f"{fn.__name__} accepted {args} {kw}")


def test_library_calls(corrupted, monkeypatch):
    from dlopt_labs import data
    from dlopt_labs.course.runner import parse_params, run_chapter
    from dlopt_labs.course.teach import strip_solutions
    assert _raises(data.load, "digitz") == (
        "DataError", f"unknown data set 'digitz'; known: {', '.join(data.names())}. Did you mean 'digits'?")
    assert _raises(data.register, "digits", lambda: None) == (
        "DataError", "a data set named 'digits' is already registered; pass overwrite=True to replace it")
    ds = data.load("wine")
    assert _raises(data.split, ds, val=0.6, test=0.5) == (
        "ValueError", "val and test must be fractions in (0, 1) with val + test < 1, got val=0.6, test=0.5")
    assert _raises(run_chapter, 15, mode="fast") == ("ChapterError", "mode must be one of ('smoke', 'full'), got 'fast'")
    assert _raises(parse_params, ["SPARSITIES=0.5"], {"SPARSITIES": ([0.5, 0.9], "")}, 15) == (
        "ChapterError", "parameter SPARSITIES of chapter 15 takes a value of type list (default [0.5, 0.9]), got '0.5'")
    assert _raises(strip_solutions, "### BEGIN SOLUTION\nx = 1", "exercise 1") == (
        "ValueError", "exercise 1: ### BEGIN SOLUTION without ### END SOLUTION")
    monkeypatch.setenv("DLOPT_DATASETS", str(corrupted))
    assert _raises(data.load, "digits")[1].startswith("checksum mismatch for 'digits': the arrays hash to ")
    (corrupted / "manifest.json").write_text("{ broken")
    assert _raises(data.load, "digits") == (
        "DataError", f"{corrupted}/manifest.json is corrupted (JSONDecodeError at 1:3): restore it with "
        "`git checkout datasets/manifest.json`, or copy it from a fresh student bundle")


def test_grader_rows(tmp, tmp_path):
    """Submissions the grader cannot grade get a row each, with the reason, before any kernel starts."""
    from dlopt_labs.course.teach import grade_one
    (tmp_path / "script.ipynb").write_text("print('hello')\n")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), tmp_path / "bare.ipynb")
    cases = [
        (tmp_path / "missing.ipynb", 15, "no such file"),
        (tmp_path, 15, "not a file"),
        (tmp_path / "script.ipynb", 15,
         "not a notebook (invalid JSON or nbformat): NotJSONError: Notebook does not appear to be JSON: \"print('hello')\\n\""),
        (tmp_path / "bare.ipynb", None, "the notebook has no chapter front matter; pass --chapter N"),
    ]
    if 29 in written_chapters():
        cases.append((written_chapters()[29].path, 15, "wrong chapter: this is chapter 29, the assignment is chapter 15"))
    for path, chapter, message in cases:
        rows = grade_one(path, chapter)
        assert [(r.status, r.points, r.message) for r in rows] == [("could not run", 0, message)], path


def test_chapter16_refuses_bad_settings():
    """Chapter 16's functions that take a learner's settings: one line naming the problem and the fix."""
    from dlopt_labs.speed import optim as O
    from dlopt_labs.data import load, split, loaders
    import torch
    dls = loaders(split(load("digits"), seed=0), batch_size=32)
    model = torch.nn.Linear(64, 10)
    assert _raises(O.make_optim, "adagrad", model.parameters(), 0.1) == (
        "ValueError", "unknown optimizer 'adagrad'; choose one of ['sgd', 'momentum', 'rmsprop', 'adam', 'adamw']")
    assert _raises(O.make_optim, "adam", model.parameters(), -1e-3) == (
        "ValueError", "lr must be a positive finite number, got -0.001")
    assert _raises(O.Optim, model.parameters(), "adam", betas=(0.9, 1.0)) == (
        "ValueError", "each of betas must be a number in [0, 1), got 1.0")
    assert _raises(O.Optim, model.parameters(), "sgd", betas=(0.9, 0.99)) == (
        "ValueError", "rule 'sgd' takes ['momentum'], not ['betas']")
    assert _raises(O.train_to_target, model, dls["train"], dls["val"], target=95) == (
        "ValueError", "target is a validation accuracy in (0, 1], got 95")
    assert _raises(O.train_to_target, model, dls["train"], dls["val"], schedule="linear") == (
        "ValueError", "unknown schedule 'linear'; choose one of ['constant', 'step', 'cosine', 'onecycle']")
    assert _raises(O.lr_range_test, model, dls["train"], start=1.0, end=1e-3) == (
        "ValueError", "the range needs 0 < start < end, got start=1.0, end=0.001")
    assert _raises(O.one_cycle, 10, 0.1, pct_start=0.1) == (
        "ValueError", "pct_start=0.1 of 10 steps leaves a phase under 2 steps; "
        "give pct_start in (0, 1) with 1 < pct_start * total_steps < total_steps - 1")
    assert _raises(O.cosine, 0, 0.1) == ("ValueError", "total_steps must be a whole number >= 1, got 0")
    assert _raises(O.lr_range_test, model, dls["train"], smooth=1.0) == (
        "ValueError", "smooth is a moving average's decay and must be in [0, 1), got 1.0")
    assert _raises(O.train_to_target, model, dls["train"], dls["val"], max_epochs=2.5) == (
        "ValueError", "max_epochs must be a whole number >= 1, got 2.5")
    assert _raises(O.suggest_lr, O.lr_range_test(model, dls["train"], steps=20), rule="valley") == (
        "ValueError", "rule must be 'min/10' or 'steepest', got 'valley'")


def test_chapter17_refuses_bad_settings():
    """Chapter 17's functions that take a learner's settings: one line naming the problem and the fix."""
    from dlopt_labs.speed import memory as M
    import torch
    model = M.deep_mlp(3, 8)
    x, y = torch.randn(10, 8), torch.randint(10, (10,))
    assert _raises(M.segments_of, model, 9) == (
        "ValueError", "n must be between 1 and the 7 layers of the model, got 9")
    assert _raises(M.accumulated_grads, model, x, y, 3) == (
        "ValueError", "k must be a whole number >= 1 that divides the batch of 10, got k=3")
    assert _raises(M.fit_memory_line, [16, 16, 32], [1.0, 1.1, 2.0]) == (
        "ValueError", "give one peak per measured batch, over 3 or more distinct batch sizes; "
        "got 3 peaks for 3 batches of 2 sizes")
    assert _raises(M.set_allocator, "arena") == ("ValueError", "mode must be 'pool' or 'fresh', got 'arena'")
    assert _raises(M.try_memory, model, 8, batch=10, micro_batches=3) == (
        "ValueError", "micro_batches must divide the batch: 10 % 3 != 0")


def test_chapter12_refuses_bad_settings():
    """Chapter 12's functions that take a learner's settings: one line naming the problem and the fix."""
    from dlopt_labs.debug import diagnose as D
    from dlopt_labs.data import load, split
    data = split(load("digits"), seed=0)
    assert _raises(D.Script, data, ("typo",)) == (
        "ValueError", f"unknown bugs ['typo']; choose from {list(D.BUGS)}")
    assert _raises(D.Script, data, batch_size=1) == (
        "ValueError", "batch_size must be >= 2 (BatchNorm needs two samples), got 1")
    assert _raises(D.try_diagnose, data, "none", "lint") == (
        "ValueError", f"unknown diagnostic 'lint'; choose one of {list(D.DIAGNOSTICS)}")


def test_chapter24_refuses_bad_settings():
    """Chapter 24's functions that take a learner's settings: one line naming the problem and the fix."""
    from dlopt_labs.debug import repro as R
    from dlopt_labs.data import load, split
    import numpy as np
    import torch
    data = split(load("digits"), seed=0)
    assert _raises(R.train_weights, data, -1) == ("ValueError", "seed must be a non-negative integer, got -1")
    assert _raises(R.max_abs_diff, {"a": torch.zeros(1)}, {"b": torch.zeros(1)}) == (
        "ValueError", "the state dicts name different tensors: ['a', 'b']")
    assert _raises(R.seeds_to_detect, 0.01, 0.0) == ("ValueError", "std must be >= 0 and effect > 0, got std=0.01, effect=0.0")
    X = np.zeros((8, 2), dtype=np.float32)
    shuffled = torch.utils.data.DataLoader(R.NoisyImages(X, np.zeros(8, dtype=int)), batch_size=4, shuffle=True)
    assert _raises(R.noise_of, shuffled, X) == ("ValueError", "noise_of needs a loader without shuffling (shuffle=False)")


def test_chapter02_refuses_bad_settings():
    """Chapter 02's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    import torch
    from dlopt_labs.generalise import regularise as G
    from dlopt_labs.data import load, split
    data = split(load("digits"), seed=0, max_train=100)
    assert _raises(G.augment_images, torch.zeros(2, 10)) == (
        "ValueError", "augment_images needs flattened square images, got 10 features per row")
    assert _raises(G.train_mlp, data.X_train, data.y_train, patience=3) == (
        "ValueError", "early stopping (patience) needs a validation set: pass monitor={'val': (X, y)}")
    assert _raises(G.train_mlp, data.X_train, data.y_train[:5]) == (
        "ValueError", "X and y must have the same, non-zero number of rows, got 100 and 5")
    assert _raises(G.pca_fit, np.zeros((10, 4)), 5) == (
        "ValueError", "k must be between 1 and min(n_samples, n_features) = 4, got 5")
    assert _raises(G.grid_candidates, dict(lr=[])) == (
        "ValueError", "the grid needs at least one value per name, got {'lr': []}")
    assert _raises(G.try_generalise, data, 5000) == ("ValueError", "n_train must be between 10 and 100, got 5000")


def test_chapter04_refuses_bad_settings():
    """Chapter 04's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    import torch
    from dlopt_labs.generalise import robust as R
    from dlopt_labs.models import MLP
    model, x, y = MLP(4, 3).eval(), torch.rand(5, 4), torch.zeros(5, dtype=torch.long)
    assert _raises(R.fgsm, model, x, y, -0.1) == ("ValueError", "eps must be >= 0, got -0.1")
    assert _raises(R.pgd, model, x, y, 0.1, steps=0) == (
        "ValueError", "eps must be >= 0 and steps >= 1, got eps=0.1, steps=0")
    assert _raises(R.attack_loss, model(x), y, "hinge") == ("ValueError", "loss must be 'ce' or 'margin', got 'hinge'")
    assert _raises(R.train_robust, np.zeros((4, 4)), np.zeros(4, dtype=int), method="mixup") == (
        "ValueError", "method must be 'plain', 'noise' or 'adversarial', got 'mixup'")
    assert _raises(R.try_robust, {"plain": model}, x, y, "robust") == (
        "ValueError", "unknown model 'robust'; choose from ['plain']")


def test_chapter05_refuses_bad_settings():
    """Chapter 05's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    from dlopt_labs.generalise import transfer as T
    from dlopt_labs.data import load, split
    data = split(load("digits"), seed=0)
    assert _raises(T.digits_tasks, data, (0, 1, 2), (2, 3)) == (
        "ValueError", "source and target classes must not overlap, both have [2]")
    assert _raises(T.k_shot, np.zeros((6, 2)), np.array([0, 0, 0, 1, 1, 1]), 4) == (
        "ValueError", "k must be between 1 and the smallest class's size 3, got 4")
    assert _raises(T.fit_probe, np.zeros((4, 2)), np.array([0, 1, 0, 1]), C=0) == ("ValueError", "C must be > 0, got 0")
    source = T.make_net(64, 5)
    assert _raises(T.transfer, source, data.X_train[:10], data.y_train[:10] % 5, "distill") == (
        "ValueError", "unknown strategy 'distill'; choose from ['scratch', 'linear probe', 'fine-tune', 'probe then fine-tune']")
    assert _raises(T.tune_last_layers, source, data.X_train[:10], data.y_train[:10] % 5, 4) == (
        "ValueError", "n_trainable must be between 1 and 3, got 4")


def test_chapter14_refuses_bad_settings():
    """Chapter 14's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    import torch
    from dlopt_labs.generalise import contrastive as C
    emb, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    assert _raises(C.pick_triplets, emb, labels, "hard") == (
        "ValueError", "mining must be 'random' or 'semi-hard', got 'hard'")
    assert _raises(C.precision_at_1, emb, labels, metric="manhattan") == (
        "ValueError", "metric must be 'euclidean' or 'cosine', got 'manhattan'")
    assert _raises(C.shift_domain, np.zeros((2, 10))) == (
        "ValueError", "shift_domain needs flattened square images, got 10 features per row")
    assert _raises(C.train_adapted, np.zeros((4, 4)), np.array([0, 1, 0, 1]), coral=1.0) == (
        "ValueError", "coral > 0 aligns with the target domain: pass its unlabelled rows as X_target")
    assert _raises(C.coral_loss, torch.zeros(5, 3), torch.zeros(5, 4)) == (
        "ValueError", "need two feature batches of >= 2 rows and equal width, got (5, 3), (5, 4)")
    assert _raises(C.triplet_loss, torch.zeros(5, 3), torch.zeros(1, 3), torch.zeros(5, 3)) == (
        "ValueError", "triplets must be three (n, d) tensors of one shape, got (5, 3), (1, 3), (5, 3)")
    assert _raises(C.train_embedder, np.zeros((6, 4)), np.array([0, 0, 1, 1, 2, 2]), per_class=1) == (
        "ValueError", "triplets need two classes and per_class >= 2 (a positive besides the anchor), "
        "got 3 classes, per_class=1")
    assert _raises(C.few_shot_accuracy, emb, labels, 2) == (
        "ValueError", "shots must be between 1 and the smallest class's size - 1 (1), got 2: every class needs a query")
    assert _raises(C.precision_at_1, emb, labels[:4]) == (
        "ValueError", "need one label per embedding and at least two rows, got 6 and 4")


def test_chapter03_refuses_bad_settings(tmp_path):
    """Chapter 03's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    from dlopt_labs import measure
    from dlopt_labs.explain import agnostic as A
    score = lambda X, y: 0.0
    assert _raises(A.permutation_importance, score, np.zeros((5, 3)), np.zeros(4)) == (
        "ValueError", "X has 5 rows but y has 4 labels: pass one label per row")
    assert _raises(A.permutation_importance, score, np.zeros(5), np.zeros(5)) == (
        "ValueError", "X must be a 2-D table (rows, features), got shape (5,)")
    f = lambda X: X.sum(1)
    assert _raises(A.kernel_shap, f, np.zeros((2, 3)), np.zeros((4, 3))) == (
        "ValueError", "x must be one row of shape (M,), got (2, 3): explain rows one at a time")
    assert _raises(A.kernel_shap, f, np.zeros(3), np.zeros(3)) == (
        "ValueError", "background must be (rows, 3) like x, got (3,); pass training rows (or a sample of them), "
        "not a single row")
    assert _raises(A.kernel_shap, f, np.zeros(1), np.zeros((4, 1))) == (
        "ValueError", "KernelSHAP needs at least 2 features, got 1")
    assert _raises(A.lime_explain, f, np.zeros(3), np.array([1.0, 0.0, 1.0])) == (
        "ValueError", "scale must be positive for every feature: pass the training standard deviations")
    assert _raises(A.tabular_net, 4, 2, activation="swish") == (
        "ValueError", "activation must be one of ['elu', 'gelu', 'relu', 'sigmoid', 'silu', 'tanh'], got 'swish'; "
        "add a new one to ACTIVATIONS first")
    assert _raises(measure.mean_interval, [0.1], "lead") == (
        "ValueError", "an interval needs at least 2 seeds, got 1: raise SEEDS")
    assert _raises(A.read_scalars, tmp_path / "nothing") == (
        "FileNotFoundError", f"no TensorBoard log folder at {tmp_path / 'nothing'}: train with TensorBoardLog first")
    assert _raises(A.model_fn, None, "odds") == ("ValueError", "output must be 'probability' or 'logit', got 'odds'")
    assert _raises(A.model_fn, A.tabular_net(4, 2), "logit", -1) == (
        "ValueError", "target must be a class index from 0 to 1, got -1")
    assert _raises(A.kernel_shap, lambda X: np.c_[X[:, 0], X[:, 1]], np.zeros(3), np.zeros((4, 3))) == (
        "ValueError", "f must return one number per row, shape (4,), got (4, 2): explain one output, "
        "e.g. lambda X: model.predict_proba(X)[:, 1]")
    assert _raises(A.lime_explain, f, np.zeros((1, 3)), 1.0) == (
        "ValueError", "x must be one row of shape (M,), got (1, 3): explain rows one at a time")
    assert _raises(A.lime_explain, f, np.zeros(3), np.ones(2)) == (
        "ValueError", "scale must be one number or one per feature (3), got (2,)")
    assert _raises(A.train_net, np.zeros((4, 2)), np.array([0.0, 1.0, 0.0, 1.0])) == (
        "ValueError", "y must hold integer class labels 0, 1, ..., got float64 values: use y.astype(int)")


def test_chapter10_refuses_bad_settings():
    """Chapter 10's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    import torch
    from dlopt_labs.explain import saliency as S
    from dlopt_labs.models import SmallCNN
    model, x = SmallCNN(1, 4, widths=(4,)).eval(), torch.rand(3, 1, 8, 8)
    assert _raises(S.saliency, model, torch.rand(1, 8, 8), 0) == (
        "ValueError", "x must be a batch of images (N, C, H, W), got (1, 8, 8): add a batch axis")
    assert _raises(S.integrated_gradients, model, x, [0, 1]) == (
        "ValueError", "give one target per image (3) or one for all, got 2")
    assert _raises(S.integrated_gradients, model, x, 0, steps=0) == ("ValueError", "steps must be >= 1, got 0")
    assert _raises(S.path_points, 10, "trapezoid") == (
        "ValueError", "method must be 'gausslegendre' or one of ['riemann_left', 'riemann_middle', 'riemann_right'], "
        "got 'trapezoid'")
    assert _raises(S.occlusion, model, x, 0, window=9) == (
        "ValueError", "need 1 <= window <= 8 and stride >= 1, got 9 and 2")
    assert _raises(S.mass_in_mask, torch.rand(3, 1, 4, 4), np.zeros((3, 8, 8), bool)) == (
        "ValueError", "attributions (3, 4, 4) and masks (3, 8, 8) must match per pixel: upsample a Grad-CAM map "
        "first (grad_cam(..., size=(H, W)))")
    other = SmallCNN(1, 4, widths=(4,))
    assert _raises(S.grad_cam, model, other.features[0], x, 0) == (
        "ValueError", "the layer was not called in the forward pass: pass a module of this model")
    assert _raises(S.saliency, other, x, 0) == (
        "ValueError", "the model is in training mode (BatchNorm would use and update batch statistics): "
        "call model.eval() first")
    assert _raises(S.integrated_gradients, model, x, 7) == (
        "ValueError", "targets must be class indices from 0 to 3, got 7 to 7")
    assert _raises(S.integrated_gradients, model, x, 0, torch.zeros(2, 1, 8, 8)) == (
        "ValueError", "baseline must be a number or broadcast to the images (3, 1, 8, 8), got (2, 1, 8, 8)")
    assert _raises(S.combine, [torch.rand(3, 1, 8, 8)], "median") == (
        "ValueError", "rule must be 'mean' or 'product', got 'median'")
    assert _raises(S.try_saliency, model, model.features[2], x, np.zeros((3, 8, 8), bool), 0, "saliency", 8,
                   "zeros") == ("ValueError", "baseline must be 'black', 'mean' or 'noise', got 'zeros'")


def test_chapter22_refuses_bad_settings():
    """Chapter 22's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    from dlopt_labs.explain import glassbox as G
    assert _raises(G.fit_tree, np.zeros((4, 2)), np.array([0, 1, 0])) == (
        "ValueError", "X must be (rows, features) with one label per row, got (4, 2) and (3,)")
    assert _raises(G.fit_tree, np.zeros((4, 2)), np.array([0.0, 1.0, 0.0, 1.0])) == (
        "ValueError", "y must hold integer class labels 0, 1, ...: use y.astype(int)")
    assert _raises(G.fit_tree, np.zeros((4, 2)), np.array([0, 1, 0, 1]), 2, 0) == (
        "ValueError", "need max_depth >= 0 and min_samples_leaf >= 1, got 2, 0")
    assert _raises(G.fit_sparse_logistic, np.zeros((4, 2)), np.array([0, 1, 2, 1])) == (
        "ValueError", "y must be 0/1 labels, got values [0, 1, 2]")
    assert _raises(G.fit_sparse_logistic, np.zeros((4, 2)), np.array([0, 1, 0, 1]), 0.0) == (
        "ValueError", "C must be > 0, got 0.0")
    assert _raises(G.fit_tree, np.array([[0.0], [np.nan]]), np.array([0, 1])) == (
        "ValueError", "X must have rows and no NaN or inf: impute or drop missing values first")
    tree = G.fit_tree(np.arange(8.0).reshape(4, 2), np.array([0, 0, 1, 1]), 2)
    assert _raises(G.predict_tree, tree, np.zeros((2, 3))) == (
        "ValueError", "the tree was grown on 2 features, got rows of shape (2, 3)")
    assert _raises(G.fit_sparse_logistic, np.zeros((4, 2)), np.array([0, 1, 0])) == (
        "ValueError", "X must be (rows, features) with one label per row, got (4, 2) and (3,)")
    assert _raises(G.fidelity, np.zeros(3), np.zeros(4)) == (
        "ValueError", "compare predictions of the same rows, got shapes (3,) and (4,)")


def test_chapter30_refuses_bad_settings(tmp_path):
    """Chapter 30's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    import torch
    from torch import nn
    from dlopt_labs.explain import evaluate as E
    from dlopt_labs.lab import Record
    from dlopt_labs.models import SmallCNN
    model, x = SmallCNN(1, 4, widths=(4,)).eval(), torch.rand(3, 1, 8, 8)
    assert _raises(E.all_maps, model, "features.9", x, 0) == (
        "ValueError", "the model has no module named 'features.9': name one of its conv or ReLU layers, the last "
        "ones being ['features.0', 'features.2'] (see model.named_modules())")
    functional = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 4)).eval()
    assert _raises(E.guided_backprop, functional, x, 0) == (
        "ValueError", "the model has no nn.ReLU module to guide (a functional F.relu cannot be hooked): use "
        "nn.ReLU modules")
    inplace = SmallCNN(1, 4, widths=(4,)).eval()
    inplace.features[2].inplace = True
    assert _raises(E.guided_backprop, inplace, x, 0) == (
        "ValueError", "the model has an in-place ReLU, which a backward hook refuses: set inplace=False on its "
        "nn.ReLU modules")
    assert _raises(E.rank_similarity, torch.rand(3, 1, 8, 8), torch.rand(3, 1, 4, 4)) == (
        "ValueError", "the maps must have the same pixels, got (3, 64) and (3, 16): upsample a Grad-CAM map to "
        "the image size first")
    for order in (torch.zeros(3, 10, dtype=torch.long), torch.zeros(3, 64, dtype=torch.long),
                  E.random_order(3, 64).float()):        # too short; not a permutation; not integers
        assert _raises(E.perturbation_curves, model, x, 0, order) == (
            "ValueError", f"order must list every pixel of every image once, integers of shape (3, 64), got "
            f"{order.dtype} {tuple(order.shape)}: use pixel_order(attributions)")
    assert _raises(E.perturbation_curves, model, x, 0, E.random_order(3, 64), 0) == (
        "ValueError", "steps must be >= 1, got 0")
    assert _raises(E.pointing_game, torch.rand(3, 1, 8, 8), np.zeros((3, 8, 8), bool), -1) == (
        "ValueError", "tolerance is a whole number of pixels, >= 0, got -1")
    assert _raises(E.pointing_game, torch.rand(3, 1, 8, 8), np.zeros((3, 8, 8), bool), 1.5) == (
        "ValueError", "tolerance is a whole number of pixels, >= 0, got 1.5")
    assert _raises(E.infidelity, model, x, 0, torch.rand(3, 2, 8, 8), E.square_removal(4)) == (
        "ValueError", "attributions (3, 2, 8, 8) must be shaped like the images (3, 1, 8, 8): expand a one-channel "
        "map with .expand_as(x)")
    assert _raises(E.infidelity, model, x, 0, torch.rand(3, 1, 8, 8), E.square_removal(9)) == (
        "ValueError", "side must be between 1 and 8, got 9")
    assert _raises(E.bootstrap_mean, [0.5]) == (
        "ValueError", "need scores of shape (images,) or (draws, images) with at least 2 images, and n_boot >= 20; "
        "got (1, 1) and 2000")
    assert _raises(E.bootstrap_mean, [0.5, float("nan")]) == (
        "ValueError", "the scores hold NaN (a constant map has no rank similarity): drop those images or give them a "
        "value first")
    assert _raises(E.blurred, x, 3.0) == (
        "ValueError", "sigma 3.0 is too large for images of (8, 8) pixels: use sigma < 2.5")
    rec = Record(30, "smoke", 0, {}, path=tmp_path / "r.json")
    maps = {"a": torch.rand(3, 1, 8, 8), "b": torch.rand(3, 1, 8, 8)}
    assert _raises(E.ReaderRatings, x, maps, rec, images=[0, 5]) == (
        "ValueError", "images must be whole numbers from 0 to 2, got [5]")
    assert _raises(E.ReaderRatings, x, maps, rec, images=[0.5]) == (
        "ValueError", "images must be whole numbers from 0 to 2, got [0.5]")
    panel = E.ReaderRatings(x, maps, rec, images=[0, 1])
    assert _raises(panel.rate, 0, "a", 6) == (
        "ValueError", "a rating is a whole number from 1 to 5 (0 takes it back), got 6")
    assert _raises(panel.rate, 2, "a", 3) == ("ValueError", "image 2 is not on the panel, which shows [0, 1]")
    assert _raises(panel.rate, 0, "c", 3) == ("ValueError", "method must be one of ['a', 'b'], got 'c'")
    assert not (tmp_path / "r.json").exists()                   # nothing written by a refused rating
    assert _raises(E.try_evaluation, model, "features.2", x, np.zeros((3, 8, 8), bool), 0, "saliency", "grey") == (
        "ValueError", "fill must be one of ('black', 'mean', 'blur'), got 'grey'")
    assert _raises(E.try_evaluation, model, "features.2", x, np.zeros((3, 8, 8), bool), 1.5) == (
        "ValueError", "image must be a whole number between 0 and 2, got 1.5")
    assert _raises(E.try_evaluation, model, "features.2", x, np.zeros((3, 8, 8), bool), 0, "lime") == (
        "ValueError", "method must be one of ['saliency', 'gradient x input', 'integrated gradients', 'grad-cam', "
        "'occlusion', 'guided backprop', 'edges (control)'], got 'lime'")


def test_chapter11_refuses_bad_settings(tmp_path):
    """Chapter 11's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    import torch
    from torch import nn
    from dlopt_labs.explain import visualise as V
    assert _raises(V.summary_stats, [1, 2, 3], [1, 2]) == (
        "ValueError", "x and y must be two 1-D arrays of the same length (at least 3), got shapes (3,) and (2,)")
    assert _raises(V.same_stats_morph, [1, 2, 3], [3, 1, 2], "heart") == (
        "ValueError", "shape must be one of ('circle', 'x', 'lines', 'star'), got 'heart'")
    assert _raises(V.same_stats_morph, [1, 2, 3], [3, 1, 2], "x", 0) == (
        "ValueError", "need steps >= 1 and scale > 0, got 0 and 0.3")
    net = nn.Sequential(nn.Linear(2, 2))
    assert _raises(V.decision_grid, net, np.zeros((5, 3))) == (
        "ValueError", "X must hold 2-D points, shape (n, 2), got (5, 3): a contour needs two features (project "
        "first, e.g. with PCA)")
    assert _raises(V.decision_grid, net, np.zeros((5, 2)), 1) == ("ValueError", "resolution must be >= 2, got 1")
    assert _raises(V.bootstrap_band, np.zeros((1, 4))) == (
        "ValueError", "values must be (runs, steps) with at least 2 runs, got (1, 4)")
    assert _raises(V.band_coverage, 1) == ("ValueError", "n must be >= 2 runs, got 1")
    assert _raises(V.save_animation, [], np.zeros((2, 2)), [0, 1], tmp_path / "a.gif") == (
        "ValueError", "no frames to animate: pass the list training_frames returned")
    assert not (tmp_path / "a.gif").exists()
    assert _raises(V.try_boundary, 0) == (
        "ValueError", "need width >= 1, epochs >= 1 and 0 <= noise <= 2, got 0, 30, 0.25")
    assert _raises(V.summary_stats, [1, 2, np.nan], [1, 2, 3]) == (
        "ValueError", "x and y must be finite: drop or fill the NaN and infinite values first")
    assert _raises(V.same_stats_morph, [1, 1, 1], [3, 1, 2], "x") == (
        "ValueError", "x and y must each vary: a constant has no correlation with anything")
    assert _raises(V.bootstrap_band, np.zeros((3, 4)), 1000, 0, 0.95) == (
        "ValueError", "level is a percentage between 1 and 100, e.g. 95, got 0.95")
    assert _raises(V.band_coverage, 3, 100, 5) == (
        "ValueError", "n_boot must be >= 20 for a percentile interval, got 5")
    assert _raises(V.band_coverage, 3, 0) == ("ValueError", "trials must be >= 1, got 0")
    frames = [(0, (np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))))]
    assert _raises(V.save_animation, frames, np.zeros((2, 2)), [0, 1], tmp_path / "b.gif", 0) == (
        "ValueError", "fps must be > 0, got 0")
    assert not (tmp_path / "b.gif").exists()


def test_chapter23_refuses_bad_settings():
    """Chapter 23's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    import torch
    from torch import nn
    from dlopt_labs.explain import embed as E
    X = np.random.default_rng(0).normal(size=(20, 4))
    assert _raises(E.pca, X, 5) == ("ValueError", "k must be between 1 and min(n, d) = 4, got 5")
    assert _raises(E.pca, np.r_[X, [[np.nan] * 4]], 2) == (
        "ValueError", "X holds NaN or infinite values: drop or fill them first")
    assert _raises(E.joint_probabilities, X, 30.0) == (
        "ValueError", "perplexity must be between 1 and the number of points - 1 (19), got 30.0: lower it or embed "
        "more points")
    assert _raises(E.tsne, X, 5.0, 100) == (
        "ValueError", "iterations must be >= 250 (the early exaggeration phase), got 100")
    assert _raises(E.tsne, X, 5.0, 300, np.zeros((20, 3))) == (
        "ValueError", "init must be 'pca', 'random' or an array of shape (20, 2), got (20, 3)")
    assert _raises(E.trustworthiness, X, X[:, :2], 10) == (
        "ValueError", "k must be >= 1 and below half the points (10), got 10")
    assert _raises(E.trustworthiness, X, X[:10, :2], 3) == (
        "ValueError", "X and Y must hold the same points, got 20 and 10 rows")
    assert _raises(E.knn_accuracy, X, np.zeros(5)) == (
        "ValueError", "labels must have one entry per point, got 5 for 20")
    assert _raises(E.pca, np.zeros(5), 1) == (
        "ValueError", "X must be a 2-D array (points, features) with at least 3 points, got shape (5,)")
    net = nn.Sequential(nn.Linear(4, 2))
    assert _raises(E.hidden_activations, net, nn.Linear(4, 2), torch.zeros(3, 4)) == (
        "ValueError", "layer must be a module of model (e.g. model[2]), not a copy or another model's")
    assert _raises(E.cluster_geometry, X, np.repeat([0, 1], 10)) == (
        "ValueError", "need at least 3 clusters to compare sizes and distances, got 2")
    assert _raises(E.channel_selectivity, torch.zeros(2, 3, 4, 4), torch.zeros(3, 4, 4)) == (
        "ValueError", "need maps (n, C, h, w) and masks (n, H, W) for the same n images, got (2, 3, 4, 4) and "
        "(3, 4, 4)")
    assert _raises(E.knn_accuracy, X, np.zeros(20), 20) == (
        "ValueError", "k must be >= 1 and below the number of points (20), got 20")
    assert _raises(E.channel_selectivity, torch.zeros(2, 3, 4, 4), torch.full((2, 4, 4), 255.0)) == (
        "ValueError", "masks must hold shares of object in [0, 1] (1: object, 0: background)")
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    assert _raises(E.hidden_activations, twice, shared, torch.zeros(3, 4)) == (
        "ValueError", "layer ran 2 times per forward pass: pick a module that runs once (a shared module's "
        "outputs cannot be told apart)")
    assert _raises(E.try_tsne, 30.0, 0, 20) == (
        "ValueError", "need 50 <= points <= 1797 and iterations >= 250, got 20 and 500")


def test_chapter09_refuses_bad_settings():
    """Chapter 09's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    from sklearn.svm import SVC
    from dlopt_labs.reliable import validate as V
    y = np.array([0, 0, 0, 0, 1])
    assert _raises(V.stratified_fold_ids, y, 3) == (
        "ValueError", "stratified 3-fold needs k >= 2 and at least k rows of every class; the smallest class has 1: "
        "lower k, or merge rare classes")
    assert _raises(V.kfold_ids, 3, 5) == ("ValueError", "k-fold needs 2 <= k <= rows, got k=5 for 3 rows: lower k")
    assert _raises(V.stratified_fold_ids, np.zeros((4, 2)), 2) == (
        "ValueError", "y must be a non-empty 1-D array of labels, one per row, got shape (4, 2): flatten it "
        "(y.ravel()) or take one column")
    assert _raises(V.roc_auc, [0, 0, 0], [0.1, 0.2, 0.3]) == (
        "ValueError", "y holds one class only: ROC and PR curves need positives and negatives")
    assert _raises(V.average_precision, [0, 1, 2], [0.1, 0.2, 0.3]) == (
        "ValueError", "y must be binary 0/1 (1 = positive): map your labels first")
    assert _raises(V.roc_auc, [0, 1], [0.1]) == ("ValueError", "one score per label: y has shape (2,), score (1,)")
    X = np.random.default_rng(0).normal(size=(10, 3))
    assert _raises(V.NetClassifier().fit, X[:, 0], np.arange(10) % 2) == (
        "ValueError", "NetClassifier needs a finite 2-D array (rows, features), got shape (10,) or non-finite "
        "values: reshape, or impute missing values first")
    assert _raises(V.NetClassifier().fit, X, np.arange(9) % 2) == (
        "ValueError", "X has 10 rows and y 9 labels: pass one label per row")
    assert _raises(V.cross_validate, SVC(), X, np.arange(10) % 2, []) == (
        "ValueError", "cross_validate needs a classifier with predict_proba, got SVC: wrap it (for an SVC, pass "
        "probability=True)")
    leaky = [(np.arange(8), np.arange(6, 10))]
    assert _raises(V.cross_validate, V.NetClassifier(steps=1), X, np.arange(10) % 2, leaky) == (
        "ValueError", "fold 0: rows are in its training and test parts both: a leak")
    assert _raises(V.TopF(5).fit, X, np.arange(10) % 2) == ("ValueError", "TopF keeps 1 to 3 features, got k=5")
    assert _raises(V.isolation_forest, np.r_[X, [[np.nan] * 3]]) == (
        "ValueError", "an isolation forest needs a finite 2-D array (rows, features) of at least 2 rows, got shape "
        "(11, 3) or non-finite values: reshape, or drop the rows with NaN")
    assert _raises(V.kmeans, X, 11) == ("ValueError", "k-means needs 1 <= k <= rows, got k=11 for 10 rows")
    assert _raises(V.tune, V.NetClassifier(), [], X, np.arange(10) % 2, []) == (
        "ValueError", "tune needs at least one candidate setting")
    assert _raises(V.try_leak, 10, 20) == (
        "ValueError", "need 1 <= selected <= features and samples >= 20, got selected=20, features=10, samples=100")
    assert _raises(V.kmeans, np.zeros((6, 2)), 2) == (
        "ValueError", "k-means++ needs at least k=2 distinct points, got 1: lower k")
    assert _raises(V.roc_auc, [0, 1, 1], [0.1, np.nan, 0.3]) == (
        "ValueError", "scores hold NaN or infinite values: fix the model's outputs or drop those rows")


def test_chapter21_refuses_bad_settings():
    """Chapter 21's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import numpy as np
    from dlopt_labs.data import load, split
    from dlopt_labs.reliable import continual as C
    assert _raises(C.split_tasks, np.arange(10), 3) == (
        "ValueError", "10 classes cannot be cut into tasks of 3: pick a divisor")
    assert _raises(C.task_metrics, np.zeros((2, 3))) == (
        "ValueError", "an accuracy matrix is square, tasks x tasks, at least 2 x 2, got (2, 3)")
    assert _raises(C.Reservoir, 0) == ("ValueError", "a replay buffer needs capacity >= 1, got 0")
    assert _raises(C.EWC, -1.0) == ("ValueError", "the EWC strength must be >= 0, got -1.0")
    s = split(load("digits"), seed=0)
    assert _raises(C.run_continual, s, "rehearsal") == (
        "ValueError", "method must be one of ('fine-tune', 'replay', 'EWC', 'joint'), got 'rehearsal'")
    assert _raises(C.run_continual, s, "replay", 0) == (
        "ValueError", "epochs must be >= 1 (1: each row seen once, online), got 0")
    assert _raises(C.downsample, np.zeros((3, 50))) == (
        "ValueError", "need square images whose side is a multiple of 8, got 50 pixels")
    assert _raises(C.Reservoir(5).sample, 2) == (
        "ValueError", "the replay buffer is empty: add rows before sampling from it")
    assert _raises(C.detection_rate, [0, 0], [0.1, 0.2]) == (
        "ValueError", "need ordinary and new inputs both, and 0 < false_alarms < 1")


def test_chapter06_refuses_bad_settings(tmp_path):
    """Chapter 06's functions that take a learner's model, data or settings: one line naming the problem and the fix."""
    import torch
    from torch import nn
    from dlopt_labs.efficient import inference as I
    assert _raises(I.quantize_rows, torch.ones(5)) == (
        "ValueError", "quantize_rows takes a 2-D float tensor (rows x features), got (5,); reshape it first, "
        "e.g. t.reshape(-1, t.shape[-1]).float()")
    assert _raises(I.quantize_rows, torch.ones(2, 3), 9) == (
        "ValueError", "bits must be an integer from 2 to 8 (int8 codes), got 9")
    assert _raises(I.quantize_dynamic_int8, nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU())) == (
        "ValueError", "the model has no Linear layer to quantise (this dynamic int8 converts nn.Linear); "
        "its Linear layers: [], skipped: []")
    assert _raises(I.quantize_dynamic_int8, nn.Sequential(nn.Linear(2, 2)), skip=("fc",)) == (
        "ValueError", "skip names ['fc'] are not Linear layers of the model; its Linear layers: ['0']")
    assert _raises(I.Int8Linear.from_float, nn.Conv1d(2, 2, 1)) == (
        "TypeError", "Int8Linear.from_float takes an nn.Linear, got Conv1d; use quantize_dynamic_int8(model) to "
        "convert every Linear of a model")
    net = nn.Linear(3, 2)
    assert _raises(I.export_onnx, net, torch.ones(2, 3), tmp_path / "m.pt") == (
        "ValueError", f"an ONNX file name ends in .onnx, got '{tmp_path / 'm.pt'}'; e.g. 'model.onnx'")
    assert _raises(I.export_onnx, net, torch.ones(2, 3), tmp_path / "no" / "m.onnx") == (
        "ValueError", f"folder '{tmp_path / 'no'}' does not exist; create it first or choose another path")
    assert _raises(I.OrtModel, tmp_path / "missing.onnx") == (
        "ValueError", f"no ONNX file at '{tmp_path / 'missing.onnx'}'; write one with export_onnx(model, x, path)")
    assert _raises(I.accuracy_of, net, torch.ones(4, 3), torch.ones(3)) == (
        "ValueError", "X and y need the same nonzero number of rows, got 4 and 3")
    assert _raises(I.latency_percentiles, {}) == (
        "ValueError", "fns must be a non-empty dict of name -> callable with no arguments")
    assert _raises(I.Int8Linear.from_float(nn.Linear(4, 2)), torch.ones(3, 5)) == (
        "ValueError", "this layer takes 4 features per row, got input of shape (3, 5); check the model's input size")
    assert _raises(I.OrtModel, tmp_path / "missing.onnx", 0) == (
        "ValueError", "n_threads must be an integer >= 1 or None (torch's count), got 0")
    assert list(tmp_path.iterdir()) == []                         # nothing written by a refused call


def test_chapter26_refuses_bad_settings():
    """Chapter 26's functions that take a learner's settings: one line naming the problem and the fix."""
    from torch import nn
    from dlopt_labs.efficient import arch as A
    assert _raises(A.make_net, "mobile") == (
        "ValueError", "kind must be one of ['standard', 'separable', 'inverted residual'], got 'mobile'")
    assert _raises(A.make_net, "separable", 0) == (
        "ValueError", "width_mult must be in (0, 4], got 0; MobileNet uses 0.25 to 1.4")
    assert _raises(A.make_net, "standard", 1.0, (16,)) == (
        "ValueError", "need depth >= 1 and a stem plus at least one stage, got 2 and (16,)")
    assert _raises(A.layer_table, nn.Conv2d(1, 2, 3), (1, 0, 5)) == (
        "ValueError", "input_shape is one input's shape without the batch, e.g. (1, 32, 32); got (1, 0, 5)")
    assert _raises(A.layer_table, "net", (1, 8, 8)) == ("TypeError", "layer_table takes an nn.Module, got str")
    assert _raises(A.try_arch, "separable", 1.0, 4) == (
        "ValueError", "resolution >= 8 and batch >= 1, got 4 and 1")
    assert _raises(A.try_arch, "separable", 1.0, 224, 8) == (
        "ValueError", "batch x resolution^2 = 401,408 would take minutes on a CPU; keep it at most 262,144 "
        "(e.g. batch 64 at 64 x 64, or batch 1 at 512 x 512)")
    assert _raises(A.mobilenet_v2, 0) == ("ValueError", "width_mult must be in (0, 4], got 0; MobileNet uses 0.25 to 1.4")
    assert _raises(A.layer_table, nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(4)), (1, 6, 6)) == (
        "ValueError", "layer_table counts Conv2d, Linear and BatchNorm2d layers; the model also has weights in "
        "['LayerNorm']: write their formulas, or count them with count_params and count_flops")


def test_chapter19_refuses_bad_settings():
    """Chapter 19's functions that take a learner's data or settings: one line naming the problem and the fix."""
    import torch
    from dlopt_labs.efficient import distill as D
    from dlopt_labs.models import MLP
    assert _raises(D.soft_targets, torch.zeros(2, 3), 0) == (
        "ValueError", "the temperature T must be > 0, got 0; Hinton et al. use 2 to 20")
    assert _raises(D.distill_loss, torch.zeros(2, 3), torch.zeros(2, 4)) == (
        "ValueError", "student and teacher logits must have the same 2-D shape (rows x classes), got (2, 3) and (2, 4)")
    assert _raises(D.distill_loss, torch.zeros(2, 3), torch.zeros(2, 3), None, 4.0, 1.5) == (
        "ValueError", "alpha weighs the soft term against the labels: between 0 and 1, got 1.5")
    assert _raises(D.train_student, MLP(4, 2), torch.zeros(5, 4), torch.zeros(4, dtype=torch.long)) == (
        "ValueError", "X, y and teacher_logits need one row per training example")
    assert _raises(D.train_student, MLP(4, 2), torch.zeros(5, 4), torch.zeros(5, dtype=torch.long), epochs=0) == (
        "ValueError", "epochs and batch must be >= 1 and lr > 0, got 0, 64 and 0.003")
    assert _raises(D.SharedMLP, depth=0) == (
        "ValueError", "d_in, n_classes, width and depth must be >= 1, got 64, 10, 128, 0")
    assert _raises(D.try_distill, hidden=0) == (
        "ValueError", "hidden and epochs must be >= 1 and seed >= 0, got 0, 200, 0")
    assert _raises(D.try_distill, n_train=5) == ("ValueError", "n_train must be between 10 and 1000 digits, got 5")


def test_chapter25_refuses_bad_settings():
    """Chapter 25's functions that take a learner's layers, tensors or settings: one line naming the problem and
    the fix."""
    import torch
    from dlopt_labs.efficient import pipeline as P
    lin = torch.nn.Linear(6, 4)
    assert _raises(P.svd_factorize, lin, 5) == (
        "ValueError", "rank must be an integer from 1 to min(outputs, inputs) = 4, got 5")
    assert _raises(P.svd_factorize, torch.nn.Sequential(lin), 2) == (
        "TypeError", "svd_factorize takes an nn.Linear, got Sequential; use factorize_model(model, rank) for a whole model")
    assert _raises(P.factorize_model, torch.nn.Sequential(lin), 2, skip="head") == (
        "ValueError", "skip names ['head'] are not Linear layers of the model: ['0']")
    assert _raises(P.fake_quant, torch.zeros(3), 0.0) == (
        "ValueError", "scale must be positive and finite everywhere; clamp it, e.g. scale.clamp(min=1e-12)")
    assert _raises(P.fake_quant, torch.zeros(3), 0.1, 0, 7, 7) == (
        "ValueError", "qmin and qmax must be integers with qmin < qmax, got 7 and 7")
    assert _raises(P.fake_quant, torch.zeros(3, dtype=torch.int8), 0.1) == (
        "ValueError", "fake_quant takes a float tensor, got torch.int8; convert it first, e.g. x.float()")
    assert _raises(P.prepare_qat, torch.nn.Sequential(lin), 1) == (
        "ValueError", "bits must be an integer from 2 to 8, got 1")
    assert _raises(P.prepare_qat, torch.nn.Sequential(torch.nn.ReLU()), 4) == (
        "ValueError", "the model has no Linear layer to quantise; these functions convert nn.Linear (and QATLinear) layers")
    assert _raises(P.deploy_int, torch.nn.Sequential(lin)) == (
        "ValueError", "bits must be an integer from 2 to 8 for float layers, got None")
    assert _raises(P.pack_codes, torch.full((3,), 9, dtype=torch.int8), 4) == (
        "ValueError", "codes must be int8 values from -8 to 7 for 4 bits")
    assert _raises(P.pack_codes, torch.zeros(3, dtype=torch.int8), 3) == (
        "ValueError", "bits must be 2, 4 or 8 (a whole number of codes per byte), got 3")
    assert _raises(P.pareto_front, __import__("pandas").DataFrame(dict(a=[1])), "bytes", "acc") == (
        "ValueError", "the table has no column ['bytes', 'acc']; its columns: ['a']")
    assert _raises(P.unpack_codes, torch.zeros(3, dtype=torch.uint8), 4, (4, 4)) == (
        "ValueError", "packed must be the flat uint8 tensor pack_codes made for shape (4, 4) at 4 bits (8 bytes), got torch.uint8 (3,)")
    assert _raises(P.fake_quant, torch.zeros(3), 0.1, 9, 0, 7) == (
        "ValueError", "zero_point must be a code from qmin to qmax (0 to 7)")
    assert _raises(P.compress, torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)),
                   torch.zeros(5, 7), torch.zeros(5, dtype=torch.long)) == (
        "ValueError", "X must be rows of the teacher's 6 input features, got shape (5, 7)")
    assert _raises(P.svd_factorize, lin, True) == (
        "ValueError", "rank must be an integer from 1 to min(outputs, inputs) = 4, got True")
    assert isinstance(P.prepare_qat(lin, 4), P.QATLinear)         # a bare layer is converted, not refused
    assert isinstance(P.factorize_model(torch.nn.Linear(40, 40), 5), torch.nn.Sequential)
    assert _raises(P.try_compress, hidden=8) == (
        "ValueError", "hidden must be from 16 to 1024 and epochs from 1 to 100, got 8 and 10")


def test_chapter18_refuses_bad_settings():
    """Chapter 18's functions that take a learner's model, requests or settings: one line naming the problem and
    the fix."""
    import torch
    from dlopt_labs.efficient import parallel as P
    model = torch.nn.Linear(4, 2)
    assert _raises(P.BatchingServer, model, 0) == ("ValueError", "max_batch must be an integer >= 1, got 0")
    assert _raises(P.BatchingServer, model, 4, -1.0) == ("ValueError", "max_wait_ms must be from 0 to 1000 ms, got -1.0")
    with P.BatchingServer(model, 4, 0.0) as srv:
        srv.submit(torch.zeros(4)).result(timeout=10)
        assert _raises(srv.submit, torch.zeros(1, 4)) == (
            "ValueError", "every request must have the shape, dtype and device of the first, ((4,), torch.float32, device(type='cpu')); "
            "got ((1, 4), torch.float32, device(type='cpu')) (send one row per request, without a batch dimension)")
        assert _raises(srv.submit, [0.0] * 4) == ("TypeError", "submit takes one input row as a tensor, got list")
    assert _raises(srv.submit, torch.zeros(4)) == ("RuntimeError", "the server is closed; start a new BatchingServer")
    assert _raises(P.offered_load, srv, torch.zeros(3, 4), 0.0) == ("ValueError", "rate and duration must be > 0, got 0.0 and 1.0")
    assert _raises(P.capacity, lambda: srv, torch.zeros(3, 4), 25.0, factor=1.0) == (
        "ValueError", "need slo_ms > 0, factor > 1, 0 < start <= max_rate and refine >= 0, got 25.0, 1.0, 250.0, 100000.0, 2")
    assert _raises(P.LRUCache, 0) == ("ValueError", "capacity must be an integer >= 1 (entries), got 0")
    assert _raises(P.zipf_requests, 10, 5, -1.0) == ("ValueError", "need n_items >= 1, n_requests >= 1 and s >= 0, got 10, 5, -1.0")
    assert _raises(P.content_key, [1, 2]) == ("TypeError", "content_key takes a tensor, got list")
    assert _raises(P.Ensemble, [model]) == ("ValueError", "an ensemble needs at least 2 models, got 1")
    assert _raises(P.Cascade, model, model, 1.5) == ("ValueError", "threshold is a probability: from 0 to 1, got 1.5")
    assert _raises(P.batch_sweep, model, torch.zeros(4), [0]) == ("ValueError", "batches must be a list of integers >= 1, got [0]")
    assert _raises(P.WorkerPool, torch.nn.ReLU(), 1) == (
        "ValueError", "WorkerPool measures models whose first layer is an nn.Linear (rows of features)")
    assert _raises(P.try_serving, rate=0.0) == (
        "ValueError", "need rate from 1 to 50000 per second, duration from 0.05 to 5 s and hidden from 16 to 4096, got 0.0, 0.5 and 1024")


def test_chapter28_refuses_bad_settings(tmp_path):
    """Chapter 28's functions that take a learner's model, files, URLs or settings: one line naming the problem and
    the fix, before any process starts."""
    import numpy as np
    import torch
    from dlopt_labs.deploy import serve as P
    from dlopt_labs.models import MLP
    m = MLP(4, 2, hidden=(3,))
    assert _raises(P.save_served, m, tmp_path / "m.pt", dict(in_features=4, n_classes=2)) == (
        "ValueError", "arch must have exactly the keys ['hidden', 'in_features', 'n_classes'], got ['in_features', 'n_classes']")
    assert _raises(P.save_served, m, tmp_path / "m.pt", dict(in_features=4, n_classes=2, hidden=(5,))) == (
        "ValueError", "the model's weights do not fit MLP(**arch) with arch={'in_features': 4, 'n_classes': 2, 'hidden': [5]}: "
        "pass the arguments the model was built with")
    assert not (tmp_path / "m.pt").exists()                       # nothing half-written
    missing = tmp_path / "none.pt"
    assert _raises(P.load_served, missing) == (
        "FileNotFoundError", f"no model file at {missing}: write one with save_served(model, path, arch)")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    assert _raises(P.load_served, tmp_path / "other.pt") == (
        "ValueError", f"{tmp_path / 'other.pt'} was not written by save_served: write it with save_served(...)")
    assert _raises(P.make_app, m, 0) == ("ValueError", "in_features must be an integer >= 1, got 0")
    assert _raises(P.make_app, m, 4, max_rows=0) == (
        "ValueError", "need 1 <= max_rows <= 4096 and 256 <= max_body <= 2**30, got 0, 65536")
    assert _raises(P.ServerProcess, missing) == (
        "FileNotFoundError", f"no model file at {missing}: write one with save_served(model, path, arch)")
    path = P.save_served(m, tmp_path / "m.pt", dict(in_features=4, n_classes=2, hidden=(3,)))
    assert _raises(P.ServerProcess, path, workers=0) == ("ValueError", "need 1 <= workers <= 16 and 1 <= threads <= 64, got 0, 1")
    assert _raises(P.ServerProcess, path, max_batch=0) == (
        "ValueError", "need an integer max_batch >= 1 and 0 <= max_wait_ms <= 1000, got 0, 2.0")
    assert _raises(P.ServerProcess, path, max_body=10) == (
        "ValueError", "need 1 <= max_rows <= 4096 and 256 <= max_body <= 2**30, got 64, 10")
    assert _raises(P.ServerProcess(path).ready) == ("RuntimeError", "start() the server first")
    url = "http://127.0.0.1:9"
    assert _raises(P.open_loop, url, torch.zeros(3, 4), 0.0) == (
        "ValueError", "need 0 < rate <= 1e5, 0 < duration <= 600 s and 1 <= connections <= 1024, got 0.0, 1.0, 64")
    assert _raises(P.open_loop, url, torch.zeros(4), 10.0) == ("ValueError", "inputs must be a (rows, features) tensor, got (4,)")
    assert _raises(P.closed_loop, url, [[0.0] * 4], 2) == ("ValueError", "inputs must be a (rows, features) tensor, got list")
    assert _raises(P.closed_loop, url, torch.zeros(3, 4), clients=0) == (
        "ValueError", "need 1 <= clients <= 1024 and 0 < duration <= 600 s, got 0, 10.0")
    assert _raises(P.capacity, url, torch.zeros(3, 4), 50.0, factor=1.0) == (
        "ValueError", "need slo_ms > 0, factor > 1, 0 < start <= max_rate and refine >= 0, got 50.0, 1.0, 100.0, 20000.0, 2")
    assert _raises(P.replicas_needed, 100.0, 0.0, 5.0) == (
        "ValueError", "target_rate, capacity_per_replica and mean_latency_ms must be > 0, got 100.0, 0.0, 5.0 "
        "(a capacity of 0 means the SLO was never met)")
    assert _raises(P.replicas_needed, 100.0, 10.0, 5.0, headroom=1.5) == ("ValueError", "headroom must be in (0, 1], got 1.5")
    assert _raises(P.poisson_arrivals, 0.0, 1.0, np.random.default_rng(0)) == (
        "ValueError", "rate and duration must be > 0, got 0.0 and 1.0")

    def stall_backwards():
        with P.stalls(1, every=0.1, pause=0.5): pass
    assert _raises(stall_backwards) == ("ValueError", "need 0 < pause < every, got pause=0.5, every=0.1")
    assert _raises(P.try_load, rate=0.0) == (
        "ValueError", "need rate from 1 to 20000 per second, duration from 0.1 to 10 s and hidden from 16 to 4096, got 0.0, 1.0 and 1024")


def test_chapter08_refuses_bad_settings(tmp_path):
    """Chapter 08's functions that take a learner's model, folders or settings: one line naming the problem and the
    fix; nothing half-written."""
    import torch
    from dlopt_labs.deploy import package as P
    from dlopt_labs.models import MLP
    m, arch, x = MLP(4, 2, hidden=(3,)), dict(in_features=4, n_classes=2, hidden=(3,)), torch.randn(3, 4)
    fmts = "('eager', 'torch.export', 'onnx', 'torchscript')"
    assert _raises(P.package, m, x, tmp_path / "a", "n", "1.0.0", dict(in_features=4, n_classes=2)) == (
        "ValueError", "arch must have exactly the keys hidden, in_features, n_classes; got ['in_features', 'n_classes']")
    assert _raises(P.package, m, x, tmp_path / "a", "n", "1.0.0", arch, formats=("onnx",)) == (
        "ValueError", f"formats must include 'eager' (the weights) and come from {fmts}; got ('onnx',)")
    assert _raises(P.package, m, torch.randn(3, 5), tmp_path / "a", "n", "1.0.0", arch) == (
        "ValueError", "example must be a (batch, 4) tensor, got (3, 5)")
    assert _raises(P.package, m, x, tmp_path / "a", "n", "1.0.0", arch, key=b"short") == (
        "ValueError", "key must be at least 16 random bytes, e.g. secrets.token_bytes(32)")
    assert _raises(P.package, m, x, tmp_path / "a", "n", "1.0", arch) == (
        "ValueError", "version must be major.minor.patch (semantic versioning), e.g. '1.0.0'; got '1.0'")
    assert _raises(P.package, MLP(4, 2, hidden=(5,)), x, tmp_path / "a", "n", "1.0.0", arch) == (
        "ValueError", "the model's weights do not fit MLP(**arch) with arch={'in_features': 4, 'n_classes': 2, "
        "'hidden': (3,)}: pass the arguments it was built with")
    assert list(tmp_path.iterdir()) == []                        # nothing written by a refused call
    assert _raises(P.verify, tmp_path) == (
        "ArtifactError", f"{tmp_path} has no manifest.json: it is not an artifact written by package()")
    f = P.package(m, x, tmp_path / "a", "n", "1.0.0", arch, formats=("eager",))
    assert _raises(P.load, f, "tflite") == ("ValueError", f"fmt must be one of {fmts}, got 'tflite'")
    assert _raises(P.load, f, "onnx") == ("ArtifactError", "this artifact has no onnx file; it has ['eager']")
    assert _raises(P.cold_start, f, "eager", calls=0) == ("ValueError", "need 1 <= calls <= 100000 and 1 <= threads <= 64, got 0, 1")
    assert _raises(P.placement, 0.0, [1], 100) == (
        "ValueError", "need compute_ms > 0, uplink_mbps > 0, edge_slowdown > 0 and payload_bytes >= 0, got 0.0, 10.0, 10.0, 100")
    assert _raises(P.try_package, hidden=2) == ("ValueError", "need hidden from 8 to 4096 and batch from 1 to 1024, got 2 and 1")
    (f / "manifest.json").write_text("{oops")
    name, msg = _raises(P.verify, f)
    assert name == "ArtifactError" and msg.endswith("the artifact is damaged") and "is not valid JSON" in msg


def test_ch20_monitor_refuses_bad_input():
    import torch
    from dlopt_labs.deploy import monitor as P
    from dlopt_labs.models import MLP
    assert _raises(P.ks_2samp, torch.randn(10, 3), torch.randn(10, 4)) == (
        "ValueError", "ref has 3 features and live has 4: compare the same features")
    assert _raises(P.ks_2samp, torch.randn(10), torch.tensor([1.0, float("nan")])) == (
        "ValueError", "live has NaN or infinite values: count them as a separate signal and drop them before testing "
        "the distribution")
    assert _raises(P.ks_2samp, torch.randn(2, 8, 8), torch.randn(3, 8, 8)) == (
        "ValueError", "ref must have shape (rows,) or (rows, features) with at least one row, got (2, 8, 8): flatten "
        "images to one row each")
    assert _raises(P.ks_2samp, "abc", [1.0]) == ("TypeError", "ref must be numbers (a tensor or an array), got str")
    assert _raises(P.holm, [0.1], alpha=0) == ("ValueError", "alpha must be between 0 and 1, got 0: 0.05 is the usual choice")
    assert _raises(P.psi, torch.randn(10, 2), torch.randn(10, 2)) == (
        "ValueError", "psi compares one score: pass 1-D ref and live (e.g. the confidence)")
    assert _raises(P.shift_inputs, torch.rand(3, 64), "blur", 0.1, torch.Generator()) == (
        "ValueError", "unknown shift 'blur': choose one of none, noise, dim, translate, occlude, prior, relabel")
    assert _raises(P.shift_inputs, torch.rand(3, 63), "translate", 0.5, torch.Generator()) == (
        "ValueError", "translate moves pixels of 8x8 images: x must have shape (rows, 64), got (3, 63)")
    m = MLP(64, 10, hidden=(8,))
    assert _raises(P.simulate, m, torch.rand(50, 64), torch.zeros(50, dtype=torch.long), window=30) == (
        "ValueError", "the pool has 50 rows; a reference and a live window need 60")
    name, msg = _raises(P.monitor, m, torch.rand(20, 63), torch.rand(20, 63))
    assert name == "ValueError" and msg.startswith("the model cannot take a window of shape (20, 63) (")
    assert msg.endswith("): pass the rows the model was trained on, one per request")
    assert _raises(P.canary, m, m, torch.rand(50, 64), torch.zeros(50, dtype=torch.long), share=0) == (
        "ValueError", "share must be between 0 and 1, got 0: e.g. 0.05 for 5% of traffic")
    assert _raises(P.monitor, m, torch.rand(20, 64), torch.rand(20, 64), permutations=50) == (
        "ValueError", "with 50 permutations the MMD p-value is never below alpha / 3 = 0.01667: use at least 59 permutations")
    assert _raises(P.canary, m, m, torch.rand(50, 64), torch.zeros(49, dtype=torch.long)) == (
        "ValueError", "x has 50 rows and y has 49: pass matching inputs and labels")
    assert _raises(P.simulate_traffic, {"healthy": 0.1}) == (
        "ValueError", "p_slow needs 'healthy' and 'incident' shares in [0, 1], got {'healthy': 0.1}")
    assert _raises(P.try_monitor, "blur") == (
        "ValueError", "unknown shift 'blur': choose one of none, noise, dim, translate, occlude, prior, relabel")
    assert _raises(P.draw_window, torch.zeros(10, dtype=torch.long), 5, "prior", 1.0, torch.Generator(), hard=(3,)) == (
        "ValueError", "no row of the pool has a class in hard=(3,)")


def test_ch07_design_refuses_bad_input(tmp_path):
    import torch
    from torch import nn
    from dlopt_labs.deploy import design as P
    reg = P.default_registry()
    assert _raises(reg.register("cnn", "backbone"), nn.Identity) == (
        "RegistryError", "'cnn' is already registered, by dlopt_labs.deploy.design.ConvBackbone; "
        "torch.nn.modules.linear.Identity would replace it silently: choose another name, or unregister the first on purpose")
    assert _raises(reg.register, "x", "neck") == ("RegistryError", "kind must be one of ('backbone', 'head'), got 'neck'")
    assert _raises(reg.build, {"name": "cnn", "chanels": 8}, "backbone", in_features=64) == (
        "RegistryError", "cnn: unknown argument 'chanels'; it takes ['channels', 'in_features']. Did you mean 'channels'?")
    assert _raises(reg.build, {"name": "mlp", "width": "128"}, "backbone", in_features=64) == (
        "RegistryError", "mlp: argument 'width' must be int, got '128' (str)")
    assert _raises(reg.build, {"name": "resnt"}, "backbone", in_features=64) == (
        "RegistryError", "no backbone named 'resnt'; registered: ['attention', 'cnn', 'gru', 'mlp']. (register it before "
        "building: default_registry() registers the chapter's components, load_plugins() those of installed plugins)")
    assert _raises(reg.build, {"name": "linear"}, "head") == (
        "RegistryError", "linear: missing argument(s) ['in_features', 'n_classes']: add them to the config")
    assert _raises(P.build_model, reg, {"backbone": {"name": "cnn"}}) == (
        "RegistryError", "a model config has exactly the keys 'backbone' and 'head', got {'backbone': {'name': 'cnn'}}")

    def named(in_features: int, name: str = "x"):
        return nn.Identity()
    name, msg = _raises(reg.register("named", "backbone"), named)
    assert name == "RegistryError" and msg.endswith("which a config uses for the component's registered name: rename that argument")
    assert _raises(P.onnx_check, nn.Linear(3, 2), torch.rand(5, 3), tmp_path) == (
        "ValueError", "x has 5 rows, fewer than the largest batch 64")
    assert _raises(P.try_design, "resnet") == (
        "ValueError", "choose a backbone from ['attention', 'cnn', 'gru', 'mlp'] and a head from ['cosine', 'hidden', 'linear'], "
        "got 'resnet' and 'linear'")
    assert _raises(P.train_autoencoder, True, None, hidden=0) == ("ValueError", "need hidden >= 1 and epochs >= 1, got 0 and 30")


def test_ch27_ddp_refuses_bad_input():
    from dlopt_labs.deploy import ddp as P
    assert _raises(P.launch, "evaluate") == (
        "ValueError", "tasks must be one or more of ('grads', 'train', 'step_time') separated by commas, got 'evaluate'")
    assert _raises(P.launch, "train", 0) == ("ValueError", "nproc must be a whole number of processes from 1 to 64, got 0")
    assert _raises(P.launch, "train", 2, epoch=3) == (
        "ValueError", "unknown worker options ['epoch']: choose from ['backend', 'batch', 'batches', 'collective_timeout', "
        "'epochs', 'fail_rank', 'fail_step', 'hang_rank', 'lr', 'rounds', 'seed', 'set_epoch', 'step_width', 'steps', "
        "'threads', 'width']")
    assert _raises(P.torchrun_command, "train", "/out", nnodes=2) == (
        "ValueError", "with nnodes=2, endpoint must be node 0's host:port (e.g. 10.0.0.1:29500), got ''")
    assert _raises(P.torchrun_command, "train", "/out", nnodes=2, node_rank=2, endpoint="h:1") == (
        "ValueError", "node_rank must be from 0 to nnodes - 1 = 1, got 2")
    assert _raises(P.torchrun_command, "train", "/out", nnodes=0) == ("ValueError", "nnodes must be a whole number >= 1, got 0")
    assert _raises(P.launch, "train", 2, timeout="10") == ("ValueError", "timeout must be a positive number of seconds, got '10'")
    assert _raises(P.train_at_scale, 8, "cubic") == ("ValueError", "rule must be one of ['linear', 'none', 'sqrt'], got 'cubic'")
    assert _raises(P.train_at_scale, 8, warmup=10, epochs=10) == (
        "ValueError", "warmup must be a whole number of epochs from 0 to epochs - 1, got 10")
    assert _raises(P.make_model, 0) == ("ValueError", "width must be a positive whole number of units, got 0")
    assert _raises(P.scaling_table, {8: {"1 process, 1 thread": [1.0, 1.0]}}) == (
        "ValueError", "an interval needs at least 3 rounds, got 2: raise rounds")


def test_ch13_privacy_refuses_bad_input():
    import torch
    from dlopt_labs.debug import privacy as P
    assert _raises(P.make_classifier, 0) == ("ValueError", "width must be a positive whole number of units, got 0")
    assert _raises(P.clip_and_noise, {}, 0.0, 1.0, 10) == (
        "ValueError", "need max_norm > 0, noise_multiplier >= 0 and expected_batch > 0, got 0.0, 1.0 and 10")
    model = P.make_classifier(8)
    assert _raises(P.per_sample_grads, model, torch.rand(4, 64), torch.zeros(3, dtype=torch.long)) == (
        "ValueError", "x has 4 rows and y 3: give one label per row")
    assert _raises(P.dp_sgd, model, torch.rand(4, 64), torch.zeros(4, dtype=torch.long), sample_rate=0.0) == (
        "ValueError", "sample_rate must be in (0, 1], got 0.0")
    assert _raises(P.epsilon, 0.1, 1.0, 10, 0.0) == ("ValueError", "delta must be in (0, 1), got 0.0")
    assert _raises(P.rdp, 1.5, 1.0, 10) == (
        "ValueError", "need 0 <= sample_rate <= 1, noise_multiplier > 0, steps >= 0; got 1.5, 1.0, 10")
    assert _raises(P.noise_for_epsilon, 0.0, 0.1, 10, 1e-5) == ("ValueError", "target epsilon must be positive, got 0.0")
    assert _raises(P.encrypt_weights, {}, b"short") == (
        "ValueError", "key must be 32 random bytes (AES-256): make one with AESGCM.generate_key(bit_length=256) and "
        "keep it outside the file, e.g. in a secrets manager")
    assert _raises(P.decrypt_weights, b"PK\x03\x04 a zip file", bytes(32)) == (
        "ValueError", "not an encrypted weights file (its first bytes are not the format's marker)")
    assert _raises(P.client_split, torch.zeros(10, dtype=torch.long), 0) == (
        "ValueError", "clients must be a whole number from 1 to 5, got 0")
