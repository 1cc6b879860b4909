"""Exercises teach: each check passes a correct solution written differently from the chapter's, and fails the
chapter's own functions used as answers and the wrong answers a learner is likely to write."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlopt_labs.speed import throughput as T
from dlopt_labs.efficient import prune as P
from dlopt_labs.reliable import calibrate as C


def status(check, fn): return check(fn).status


# chapter 01, exercise 1: the largest batch within a memory budget ---------------------------------------------------

def _max_batch_lstsq(batches, peaks, budget):          # closed-form least squares, not polyfit
    b, p = np.asarray(batches, float), np.asarray(peaks, float)
    slope = ((b - b.mean()) * (p - p.mean())).sum() / ((b - b.mean()) ** 2).sum()
    fixed = p.mean() - slope * b.mean()
    if slope <= 0 or budget < fixed + slope: raise ValueError("nothing fits")
    return int((budget - fixed) // slope)


def _max_batch_endpoints(batches, peaks, budget):      # a line through the two ends only
    slope = (peaks[-1] - peaks[0]) / (batches[-1] - batches[0]); fixed = peaks[0] - slope * batches[0]
    if slope <= 0 or budget < fixed + slope: raise ValueError("nothing fits")
    return int((budget - fixed) // slope)


def _max_batch_measured_only(batches, peaks, budget):  # only among the measured batch sizes
    fits = [b for b, p in zip(batches, peaks) if p <= budget]
    if not fits: raise ValueError("nothing fits")
    return int(max(fits))


def _max_batch_rounded(batches, peaks, budget):        # round() instead of the largest batch that fits
    slope, fixed = np.polyfit(batches, peaks, 1)
    if slope <= 0 or budget < fixed + slope: raise ValueError("nothing fits")
    return int(round((budget - fixed) / slope))


def test_ch01_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(T.check_max_batch_within, _max_batch_lstsq) == "passed"
    for wrong in (_max_batch_endpoints, _max_batch_measured_only, _max_batch_rounded):
        assert status(T.check_max_batch_within, wrong) == "failed", wrong.__name__


# chapter 01, exercise 2: Amdahl's law ------------------------------------------------------------------------------

def _amdahl_serial_fraction(t1, tn, n, m):              # solves for the serial fraction instead
    if n < 2 or tn > t1: raise ValueError("need n >= 2 and tn <= t1")
    serial = (tn / t1 - 1 / n) / (1 - 1 / n)
    return t1 * serial + t1 * (1 - serial) / m


def test_ch01_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(T.check_predict_step_time, _amdahl_serial_fraction) == "passed"
    linear = lambda t1, tn, n, m: t1 / m                          # perfect scaling
    from_tn = lambda t1, tn, n, m: tn * n / m                     # scales the n-thread time linearly
    no_errors = lambda t1, tn, n, m: t1 * ((1 - (1 - tn / t1) / (1 - 1 / max(n, 2))) + (1 - tn / t1) / (1 - 1 / max(n, 2)) / m)
    for wrong in (linear, from_tn, no_errors):
        assert status(T.check_predict_step_time, wrong) == "failed"
    # the chapter's own functions are no answer
    assert status(T.check_predict_step_time, lambda t1, tn, n, m: T.break_even(t1, tn, n)) == "failed"


# chapter 15, exercise 1: global ranking with a per-layer cap ------------------------------------------------------

def _capped_by_threshold(weights, sparsity, cap):       # bisection on a magnitude threshold, per-layer caps applied
    budget = round(sparsity * sum(w.numel() for w in weights.values()))
    caps = {k: math.floor(cap * w.numel()) for k, w in weights.items()}
    if sum(caps.values()) < budget: raise ValueError("impossible")
    flat = {k: w.abs().flatten().sort().values for k, w in weights.items()}
    def removed(t): return {k: min(int((v < t).sum()), caps[k]) for k, v in flat.items()}
    lo, hi = 0.0, max(float(v[-1]) for v in flat.values()) * 2 + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(removed(mid).values()) >= budget: hi = mid
        else: lo = mid
    take = removed(lo)
    short = budget - sum(take.values())
    # the remaining removals go to the smallest next weights among layers below their caps
    nxt = sorted((float(flat[k][take[k]]), k) for k in weights if take[k] < caps[k])
    for _, k in nxt[:short]: take[k] += 1
    out = {}
    for k, w in weights.items():
        order = w.abs().flatten().argsort(); keep = torch.ones(w.numel(), dtype=torch.bool); keep[order[:take[k]]] = False
        out[k] = keep.view_as(w)
    return out


def test_ch15_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(P.check_capped_global_masks, _capped_by_threshold) == "passed"
    def plain_global(weights, sparsity, cap):               # the chapter's global ranking, cap ignored
        flat = torch.cat([w.abs().flatten() for w in weights.values()])
        return P._per_layer(P._smallest_mask(flat, sparsity), weights)
    def layer_wise(weights, sparsity, cap):                 # the chapter's layer-wise ranking
        return {k: P._smallest_mask(w, sparsity) for k, w in weights.items()}
    for wrong in (plain_global, layer_wise):
        assert status(P.check_capped_global_masks, wrong) == "failed", wrong.__name__


# chapter 15, exercise 2: the break-even sparsity of CSR storage ---------------------------------------------------

def _csr_closed_form(rows, cols, value_bytes=4, index_bytes=8):
    n = rows * cols
    # nnz * (v + i) + (rows + 1) * i < n * v  <=>  nnz < (n * v - (rows + 1) * i) / (v + i)
    bound = (n * value_bytes - (rows + 1) * index_bytes) / (value_bytes + index_bytes)
    if bound <= 0: return None
    nnz = math.ceil(bound) - 1
    return (n - nnz) / n


def test_ch15_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(P.check_csr_break_even, _csr_closed_form) == "passed"
    def no_row_pointers(rows, cols, value_bytes=4, index_bytes=8):
        n = rows * cols
        return next(((n - nnz) / n for nnz in range(n, -1, -1) if nnz * (value_bytes + index_bytes) < n * value_bytes), None)
    def at_or_below(rows, cols, value_bytes=4, index_bytes=8):        # "not larger" instead of "smaller"
        n = rows * cols
        return next(((n - nnz) / n for nnz in range(n, -1, -1)
                     if nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes <= n * value_bytes), None)
    for wrong in (no_row_pointers, at_or_below):
        assert status(P.check_csr_break_even, wrong) == "failed", wrong.__name__


# chapter 29, exercise 1: ECE with equal-mass bins -----------------------------------------------------------------

def _ece_equal_mass_numpy(probs, y, n_bins):
    p, y = np.asarray(probs, float), np.asarray(y)
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    order = np.argsort(conf, kind="stable")
    return sum(len(g) * abs(correct[g].mean() - conf[g].mean()) for g in np.array_split(order, n_bins) if len(g)) / len(y)


def test_ch29_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(C.check_ece_equal_mass, _ece_equal_mass_numpy) == "passed"
    equal_width = lambda probs, y, n_bins: C.ece(probs, y, n_bins)             # the chapter's own ECE
    one_bin_more = lambda probs, y, n_bins: _ece_equal_mass_numpy(probs, y, n_bins + 1)
    def unsorted(probs, y, n_bins):
        p, y = np.asarray(probs, float), np.asarray(y); conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
        return sum(len(g) * abs(correct[g].mean() - conf[g].mean()) for g in np.array_split(np.arange(len(y)), n_bins)) / len(y)
    for wrong in (equal_width, one_bin_more, unsorted):
        assert status(C.check_ece_equal_mass, wrong) == "failed"


# chapter 29, exercise 2: histogram binning -----------------------------------------------------------------------

def _histogram_binning_numpy(conf_val, correct_val, conf_new, n_bins):
    cv, ok, cn = (np.asarray(a, float) for a in (conf_val, correct_val, conf_new))
    bins = lambda c: np.minimum((c * n_bins).astype(int), n_bins - 1)
    b = bins(cv)
    table = np.array([ok[b == i].mean() if (b == i).any() else (i + 0.5) / n_bins for i in range(n_bins)])
    return table[bins(cn)]


def test_ch29_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(C.check_histogram_binning, _histogram_binning_numpy) == "passed"
    def empty_bins_zero(conf_val, correct_val, conf_new, n_bins):
        cv, ok, cn = (np.asarray(a, float) for a in (conf_val, correct_val, conf_new))
        bins = lambda c: np.minimum((c * n_bins).astype(int), n_bins - 1); b = bins(cv)
        return np.array([ok[b == i].mean() if (b == i).any() else 0.0 for i in range(n_bins)])[bins(cn)]
    def open_last_bin(conf_val, correct_val, conf_new, n_bins):      # 1.0 falls into an (n_bins + 1)-th bin
        cv, ok, cn = (np.asarray(a, float) for a in (conf_val, correct_val, conf_new))
        bins = lambda c: (c * n_bins).astype(int); b = bins(cv)
        table = np.array([ok[b == i].mean() if (b == i).any() else (i + 0.5) / n_bins for i in range(n_bins + 1)])
        return table[bins(cn)]
    identity = lambda conf_val, correct_val, conf_new, n_bins: conf_new      # no calibration at all
    for wrong in (empty_bins_zero, open_last_bin, identity):
        assert status(C.check_histogram_binning, wrong) == "failed", getattr(wrong, "__name__", wrong)


# chapter 16, exercise 1: Nesterov momentum ----------------------------------------------------------------------------

from dlopt_labs.speed import optim as O


def _nesterov_lookahead(w, g, v, lr, momentum):         # the "look-ahead" form: the same step, written another way
    v_new = momentum * v + g
    return w - lr * g - lr * momentum * v_new, v_new


def test_ch16_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(O.check_nesterov_step, _nesterov_lookahead) == "passed"
    plain = lambda w, g, v, lr, m: (w - lr * (m * v + g), m * v + g)            # plain momentum
    old_velocity = lambda w, g, v, lr, m: (w - lr * (g + m * v), m * v + g)     # looks ahead with the old velocity
    dampened = lambda w, g, v, lr, m: (w - lr * ((1 - m) * g + m * (m * v + (1 - m) * g)), m * v + (1 - m) * g)
    for wrong in (plain, old_velocity, dampened):
        assert status(O.check_nesterov_step, wrong) == "failed"

    def chapter_optim(w, g, v, lr, m):                   # the chapter's own momentum SGD as an answer
        p = w.clone().requires_grad_(True); opt = O.Optim([p], "sgd", lr=lr, momentum=m)
        opt.state[p]["velocity"] = v.clone(); p.grad = g.clone(); opt.step()
        return p.detach(), opt.state[p]["velocity"]
    assert status(O.check_nesterov_step, chapter_optim) == "failed"


# chapter 16, exercise 2: AMSGrad ---------------------------------------------------------------------------------------

def _amsgrad_unbiased_first(w, g, state, lr, betas, eps):   # bias corrections folded into one step size
    b1, b2 = betas; t = state["t"] + 1
    m = state["mean"] + (1 - b1) * (g - state["mean"])
    s = state["mean_sq"] + (1 - b2) * (g * g - state["mean_sq"])
    s_max = torch.where(s > state["max_mean_sq"], s, state["max_mean_sq"])
    step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    return w - step * m / (s_max.sqrt() + eps * math.sqrt(1 - b2 ** t)), dict(mean=m, mean_sq=s, max_mean_sq=s_max, t=t)


def _adam_as_answer(w, g, state, lr, betas, eps):           # the chapter's Adam: no maximum kept
    p = w.clone().requires_grad_(True); opt = O.Optim([p], "adam", lr=lr, betas=betas, eps=eps)
    opt.state[p].update(t=state["t"], mean=state["mean"].clone(), mean_sq=state["mean_sq"].clone())
    p.grad = g.clone(); opt.step(); st = opt.state[p]
    return p.detach(), dict(mean=st["mean"], mean_sq=st["mean_sq"], max_mean_sq=torch.maximum(state["max_mean_sq"], st["mean_sq"]), t=st["t"])


def _max_of_corrected(w, g, state, lr, betas, eps):          # keeps the maximum of the bias-corrected moment instead
    b1, b2 = betas; t = state["t"] + 1
    m = b1 * state["mean"] + (1 - b1) * g; s = b2 * state["mean_sq"] + (1 - b2) * g * g
    s_hat = torch.maximum(state["max_mean_sq"], s / (1 - b2 ** t))
    return w - lr / (1 - b1 ** t) * m / (s_hat.sqrt() + eps), dict(mean=m, mean_sq=s, max_mean_sq=s_hat, t=t)


def test_ch16_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(O.check_amsgrad_step, _amsgrad_unbiased_first) == "passed"
    for wrong in (_adam_as_answer, _max_of_corrected):
        assert status(O.check_amsgrad_step, wrong) == "failed", wrong.__name__
    no_count = lambda w, g, st, lr, b, e: (_amsgrad_unbiased_first(w, g, st, lr, b, e)[0], {**_amsgrad_unbiased_first(w, g, st, lr, b, e)[1], "t": st["t"]})
    assert status(O.check_amsgrad_step, no_count) == "failed"


def test_ch16_exercises_are_not_passed_by_wrapping_torch_optim():
    """The per-coordinate learning rates of one case are beyond torch.optim: wrapping the reference is no answer."""
    def nesterov_by_torch(w, g, v, lr, m):
        p = w.clone().requires_grad_(True); opt = torch.optim.SGD([p], lr=lr, momentum=m, nesterov=True)
        if v.abs().sum() > 0: opt.state[p]["momentum_buffer"] = v.clone()
        p.grad = g.clone(); opt.step()
        return p.detach(), opt.state[p]["momentum_buffer"]

    def amsgrad_by_torch(w, g, st, lr, betas, eps):
        p = w.clone().requires_grad_(True); opt = torch.optim.Adam([p], lr=lr, betas=betas, eps=eps, amsgrad=True)
        if st["t"]:
            opt.state[p].update(step=torch.tensor(float(st["t"])), exp_avg=st["mean"].clone(),
                                exp_avg_sq=st["mean_sq"].clone(), max_exp_avg_sq=st["max_mean_sq"].clone())
        p.grad = g.clone(); opt.step(); s = opt.state[p]
        return p.detach(), dict(mean=s["exp_avg"], mean_sq=s["exp_avg_sq"], max_mean_sq=s["max_exp_avg_sq"], t=int(s["step"]))

    assert status(O.check_nesterov_step, nesterov_by_torch) == "failed"
    assert status(O.check_amsgrad_step, amsgrad_by_torch) == "failed"


# chapter 17, exercise 1: loss weights for unequal micro-batches -------------------------------------------------------

from dlopt_labs.speed import memory as M


def test_ch17_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from fractions import Fraction
    exact_fractions = lambda sizes: [float(Fraction(s, sum(sizes))) for s in sizes]
    assert status(M.check_accumulation_weights, exact_fractions) == "passed"
    one_over_k = lambda sizes: [1 / len(sizes)] * len(sizes)                       # the chapter's equal-size rule
    by_largest = lambda sizes: [s / max(sizes) for s in sizes]
    unweighted = lambda sizes: [1.0] * len(sizes)
    for wrong in (one_over_k, by_largest, unweighted):
        assert status(M.check_accumulation_weights, wrong) == "failed"


# chapter 17, exercise 2: the activation memory of an MLP --------------------------------------------------------------

def test_ch17_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_layer(batch, widths, activation, nbytes):           # walks the layers instead of a closed form
        keeps_output = activation in {"relu", "tanh", "sigmoid"}
        total = batch * widths[0]
        for w in widths[1:-1]:
            total += batch * w * (1 if keeps_output else 2)
        return total * nbytes
    assert status(M.check_saved_activation_bytes, by_layer) == "passed"
    every_layer = lambda b, ws, a, nb: b * sum(ws) * nb                              # the output counted too
    no_input = lambda b, ws, a, nb: b * sum(ws[1:-1]) * (1 if a in ("relu", "tanh", "sigmoid") else 2) * nb
    always_twice = lambda b, ws, a, nb: b * (ws[0] + 2 * sum(ws[1:-1])) * nb          # ignores which tensor is saved
    for wrong in (every_layer, no_input, always_twice):
        assert status(M.check_saved_activation_bytes, wrong) == "failed"


# chapter 12, exercise 1: the pairs of samples a batched function couples ---------------------------------------------

from dlopt_labs.debug import diagnose as D


def test_ch12_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_loops(jac, tol):
        n = jac.shape[0]
        return [(i, j) for i in range(n) for j in range(n)
                if i != j and bool((jac[i, :, j, :].abs() > tol).any())]
    assert status(D.check_coupled_pairs, by_loops) == "passed"
    with_diagonal = lambda jac, tol: [(i, j) for i in range(jac.shape[0]) for j in range(jac.shape[0])
                                      if (jac[i, :, j, :].abs() > tol).any()]
    transposed = lambda jac, tol: [(j, i) for i, j in by_loops(jac, tol)]
    signed = lambda jac, tol: [(i, j) for i in range(jac.shape[0]) for j in range(jac.shape[0])
                               if i != j and (jac[i, :, j, :] > tol).any()]
    for wrong in (with_diagonal, transposed, signed):
        assert status(D.check_coupled_pairs, wrong) == "failed"


# chapter 12, exercise 2: the expected loss at initialisation ----------------------------------------------------------

def test_ch12_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_quadrature(sigma, classes):
        # E[logsumexp(z) - z_0]: Monte Carlo over the others, Gauss-Hermite over the true logit
        import numpy as np
        if sigma == 0: return math.log(classes)
        nodes, weights = np.polynomial.hermite_e.hermegauss(40)
        g = torch.Generator().manual_seed(7)
        others = torch.logsumexp(sigma * torch.randn(20_000, classes - 1, generator=g, dtype=torch.float64), 1)
        total = 0.0
        for t, w in zip(nodes, weights):
            z0 = sigma * t
            total += w * float((torch.logaddexp(others, torch.tensor(z0, dtype=torch.float64)) - z0).mean())
        return total / math.sqrt(2 * math.pi)
    assert status(D.check_expected_init_loss, by_quadrature) == "passed"
    ln_c = lambda sigma, classes: math.log(classes)                                  # ignores sigma
    plus_var = lambda sigma, classes: math.log(classes) + sigma ** 2                 # a wrong correction
    max_gap = lambda sigma, classes: sigma * math.sqrt(2 * math.log(classes))        # only the max's growth
    for wrong in (ln_c, plus_var, max_gap):
        assert status(D.check_expected_init_loss, wrong) == "failed"


# chapter 24, exercise 1: where two runs part ----------------------------------------------------------------------------

from dlopt_labs.debug import repro as R


def test_ch24_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_loops(a, b):
        for name in sorted(set(a) | set(b)):
            if name not in a or name not in b or np.shape(a[name]) != np.shape(b[name]):
                return (name, None)
            for i, (x, y) in enumerate(zip(np.ravel(a[name]), np.ravel(b[name]))):
                if not (x == y or (np.isnan(x) and np.isnan(y))):
                    return (name, i)
        return None
    assert status(R.check_first_difference, by_loops) == "passed"
    insertion_order = lambda a, b: next(((k, int(np.argmax(np.ravel(a[k]) != np.ravel(b[k]))))
                                         for k in a if k in b and np.shape(a[k]) == np.shape(b[k])
                                         and not np.array_equal(a[k], b[k], equal_nan=True)), None)
    nan_unequal = lambda a, b: next(((k, int(np.argmax(np.ravel(a[k]) != np.ravel(b[k]))))
                                     for k in sorted(a) if k in b and np.shape(a[k]) == np.shape(b[k])
                                     and not np.array_equal(a[k], b[k])), None)
    with_tolerance = lambda a, b: by_loops({k: np.round(v, 6) for k, v in a.items()}, {k: np.round(v, 6) for k, v in b.items()})
    first_only = lambda a, b: by_loops(a, {k: v for k, v in b.items() if k in a})          # misses names only in b
    for wrong in (insertion_order, nan_unequal, with_tolerance, first_only):
        assert status(R.check_first_difference, wrong) == "failed"


# chapter 24, exercise 2: seeds needed for a t-test ---------------------------------------------------------------------

def test_ch24_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from scipy import stats
    def by_bisection(std, effect, alpha, power):           # the power is increasing in n: search, then check
        def achieved(n):
            df, crit, nc = 2 * n - 2, stats.t.ppf(1 - alpha / 2, 2 * n - 2), effect / (std * math.sqrt(2 / n))
            return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
        lo, hi = 2, 4
        while achieved(hi) < power: hi *= 2
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if achieved(mid) < power else (lo, mid)
        return lo
    assert status(R.check_seeds_for_t_test, by_bisection) == "passed"
    normal = lambda std, effect, alpha, power: R.seeds_to_detect(std, effect, stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power))
    normal_plus_one = lambda *args: normal(*args) + 1
    one_sided = lambda std, effect, alpha, power: by_bisection(std, effect, 2 * alpha, power)
    one_more = lambda std, effect, alpha, power: by_bisection(std, effect, alpha, power) + 1
    for wrong in (normal, normal_plus_one, one_sided, one_more):
        assert status(R.check_seeds_for_t_test, wrong) == "failed"


# chapter 02, exercise 1: cutout -------------------------------------------------------------------------------------

from dlopt_labs.generalise import regularise as G2


def _cutout_by_mask(images, tops, lefts, size):
    images = np.asarray(images)
    n, d = images.shape
    side = int(round(math.sqrt(d)))
    rows, cols = np.arange(side)[None, :, None], np.arange(side)[None, None, :]
    t, l = np.asarray(tops)[:, None, None], np.asarray(lefts)[:, None, None]
    inside = (rows >= t) & (rows < t + size) & (cols >= l) & (cols < l + size)
    return np.where(inside, 0.0, images.reshape(n, side, side)).reshape(n, d)


def test_ch02_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(G2.check_cutout, _cutout_by_mask) == "passed"
    def in_place(images, tops, lefts, size):
        side = int(round(math.sqrt(images.shape[1])))
        v = images.reshape(len(images), side, side)
        for i in range(len(images)):
            v[i, max(tops[i], 0):tops[i] + size, max(lefts[i], 0):lefts[i] + size] = 0
        return images
    def negative_wraps(images, tops, lefts, size):  # slices from a negative start wrap around
        out = np.array(images, copy=True); side = int(round(math.sqrt(out.shape[1])))
        v = out.reshape(len(out), side, side)
        for i in range(len(out)):
            v[i, tops[i]:tops[i] + size, lefts[i]:lefts[i] + size] = 0
        return out
    swapped = lambda images, tops, lefts, size: _cutout_by_mask(images, lefts, tops, size)
    one_bigger = lambda images, tops, lefts, size: _cutout_by_mask(images, tops, lefts, size + 1)
    chapter_augment = lambda images, tops, lefts, size: G2.augment_images(
        torch.as_tensor(images, dtype=torch.float32), 0, 0.0, 0.0).numpy()
    for wrong in (in_place, negative_wraps, swapped, one_bigger, chapter_augment):
        assert status(G2.check_cutout, wrong) == "failed"


# chapter 02, exercise 2: stratified folds ----------------------------------------------------------------------------

def test_ch02_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from sklearn.model_selection import KFold, StratifiedKFold
    def by_sklearn(y, k, seed):
        y = np.asarray(y)
        if k < 2 or np.bincount(y).min() < k: raise ValueError("bad k")
        return [test for _, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)]
    assert status(G2.check_stratified_folds, by_sklearn) == "passed"
    def plain_kfold(y, k, seed):
        if k < 2 or k > len(y): raise ValueError("bad k")
        return [test for _, test in KFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)))]
    def unshuffled(y, k, seed):
        return by_sklearn(y, k, 0)
    def no_check(y, k, seed):
        y = np.asarray(y); folds = [[] for _ in range(max(k, 1))]
        for c in np.unique(y):
            for j, r in enumerate(np.random.default_rng(seed).permutation(np.flatnonzero(y == c))):
                folds[j % max(k, 1)].append(r)
        return [np.array(f) for f in folds]
    def dealt_in_order(y, k, seed):                 # a seed-dependent offset, but each class's rows in order
        y = np.asarray(y)
        if k < 2 or np.bincount(y).min() < k: raise ValueError("bad k")
        folds = [[] for _ in range(k)]
        for c in np.unique(y):
            for j, r in enumerate(np.flatnonzero(y == c)):
                folds[(j + seed) % k].append(r)
        return [np.array(f) for f in folds]
    for wrong in (plain_kfold, unshuffled, no_check, dealt_in_order):
        assert status(G2.check_stratified_folds, wrong) == "failed"


# chapter 04, exercise 1: PGD in the L2 norm -------------------------------------------------------------------------

from dlopt_labs.generalise import robust as R4


def _pgd_l2_by_hand(W, b, x, y, radius, step_size, steps):   # the gradient of the cross-entropy written out
    adv = x.clone()
    onehot = F.one_hot(y, W.shape[0]).to(x.dtype)
    for _ in range(steps):
        p = (adv @ W.T + b).softmax(1)
        grad = (p - onehot) @ W
        adv = adv + step_size * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
        delta = adv - x
        n = delta.norm(dim=1, keepdim=True)
        adv = (x + torch.where(n > radius, delta * radius / n.clamp_min(1e-12), delta)).clamp(0, 1)
    return adv


def test_ch04_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(R4.check_pgd_l2, _pgd_l2_by_hand) == "passed"
    def sign_steps(W, b, x, y, radius, step_size, steps):      # an L-infinity step inside an L2 ball
        adv = x.clone()
        for _ in range(steps):
            a = adv.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(a @ W.T + b, y, reduction="sum"), a)
            delta = adv + step_size * g.sign() - x
            n = delta.norm(dim=1, keepdim=True)
            adv = (x + delta * torch.clamp(radius / n, max=1.0)).clamp(0, 1)
        return adv
    def batch_norm_projection(W, b, x, y, radius, step_size, steps):   # one norm for the whole batch
        adv = x.clone()
        for _ in range(steps):
            a = adv.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(a @ W.T + b, y, reduction="sum"), a)
            delta = adv + step_size * g / g.norm(dim=1, keepdim=True) - x
            adv = (x + delta * min(1.0, radius / float(delta.norm()))).clamp(0, 1)
        return adv
    no_clamp = _pgd_l2_no_clamp
    chapter_pgd = lambda W, b, x, y, r, s, k: R4.pgd(lambda v: v @ W.T + b, x, y, r, steps=k, step_size=s)
    for wrong in (sign_steps, batch_norm_projection, no_clamp, chapter_pgd):
        assert status(R4.check_pgd_l2, wrong) == "failed"


def _pgd_l2_no_clamp(W, b, x, y, radius, step_size, steps):
    adv = x.clone()
    onehot = F.one_hot(y, W.shape[0]).to(x.dtype)
    for _ in range(steps):
        grad = ((adv @ W.T + b).softmax(1) - onehot) @ W
        delta = adv + step_size * grad / grad.norm(dim=1, keepdim=True) - x
        n = delta.norm(dim=1, keepdim=True)
        adv = x + delta * torch.clamp(radius / n, max=1.0)
    return adv


# chapter 04, exercise 2: the L-infinity distance to a linear boundary ----------------------------------------------

def test_ch04_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_loops(W, b, x):
        z = x @ W.T + b
        out = []
        for i in range(len(x)):
            p = int(z[i].argmax())
            out.append(min(float((z[i, p] - z[i, j]) / (W[p] - W[j]).abs().sum())
                           for j in range(W.shape[0]) if j != p))
        return torch.tensor(out)
    assert status(R4.check_linf_flip_distance, by_loops) == "passed"
    def l2_norm(W, b, x):
        z = x @ W.T + b; p = z.argmax(1)
        d = (z.gather(1, p[:, None]) - z) / (W[p][:, None] - W[None]).norm(dim=-1).clamp_min(1e-12)
        d[torch.arange(len(x)), p] = math.inf
        return d.min(1).values
    def no_bias(W, b, x):
        return by_loops(W, torch.zeros_like(b), x)
    def largest(W, b, x):
        z = x @ W.T + b; p = z.argmax(1)
        d = (z.gather(1, p[:, None]) - z) / (W[p][:, None] - W[None]).abs().sum(-1).clamp_min(1e-12)
        return d.max(1).values
    def fgsm_margin(W, b, x):                          # one sign step's change of the loss, not a distance
        return ((x @ W.T + b).softmax(1).max(1).values - 0.5).abs()
    for wrong in (l2_norm, no_bias, largest, fgsm_margin):
        assert status(R4.check_linf_flip_distance, wrong) == "failed"


# chapter 05, exercise 1: nearest class mean -------------------------------------------------------------------------

from dlopt_labs.generalise import transfer as T5


def test_ch05_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from sklearn.neighbors import NearestCentroid, KNeighborsClassifier
    def by_sklearn(Zs, ys, Zq):
        return NearestCentroid().fit(Zs, ys).predict(Zq)
    assert status(T5.check_nearest_prototype, by_sklearn) == "passed"
    one_nn = lambda Zs, ys, Zq: KNeighborsClassifier(1).fit(Zs, ys).predict(Zq)
    def cosine(Zs, ys, Zq):
        means = np.stack([Zs[ys == c].mean(0) for c in range(int(ys.max()) + 1)])
        sim = (Zq / np.linalg.norm(Zq, axis=1, keepdims=True)) @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
        return sim.argmax(1)
    def medians(Zs, ys, Zq):
        meds = np.stack([np.median(Zs[ys == c], 0) for c in range(int(ys.max()) + 1)])
        return ((Zq[:, None] - meds[None]) ** 2).sum(-1).argmin(1)
    for wrong in (one_nn, cosine, medians):
        assert status(T5.check_nearest_prototype, wrong) == "failed"


# chapter 05, exercise 2: linear CKA ---------------------------------------------------------------------------------

def test_ch05_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_hsic(X, Y):
        n = len(X); H = np.eye(n) - 1 / n
        K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
        return np.trace(K @ L) / np.sqrt(np.trace(K @ K) * np.trace(L @ L))
    assert status(T5.check_linear_cka, by_hsic) == "passed"
    def uncentred(X, Y):
        return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))
    def not_squared(X, Y):
        X, Y = X - X.mean(0), Y - Y.mean(0)
        return np.linalg.norm(Y.T @ X) / np.sqrt(np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))
    def mean_correlation(X, Y):
        return abs(np.corrcoef(X.mean(1), Y.mean(1))[0, 1])
    for wrong in (uncentred, not_squared, mean_correlation):
        assert status(T5.check_linear_cka, wrong) == "failed"


# chapter 14, exercise 1: the contrastive loss -----------------------------------------------------------------------

from dlopt_labs.generalise import contrastive as C14


def test_ch14_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_torch(d, same, margin):
        d, s = torch.as_tensor(d), torch.as_tensor(same, dtype=torch.float64)
        return float((s * d**2 + (1 - s) * F.relu(margin - d) ** 2).mean())
    assert status(C14.check_contrastive_loss, by_torch) == "passed"
    not_squared = lambda d, same, m: float(np.where(same > 0, d, np.maximum(0, m - d)).mean())
    margin_both = lambda d, same, m: float(np.where(same > 0, np.maximum(0, d - m) ** 2, np.maximum(0, m - d) ** 2).mean())
    summed = lambda d, same, m: float(np.where(same > 0, d**2, np.maximum(0, m - d) ** 2).sum())
    swapped = lambda d, same, m: float(((1 - same) * d**2 + same * np.maximum(0, m - d) ** 2).mean())
    half = lambda d, same, m: float((0.5 * same * d**2 + 0.5 * (1 - same) * np.maximum(0, m - d) ** 2).mean())
    chapter_triplet = lambda d, same, m: float(C14.triplet_loss(torch.zeros(1, 1), torch.zeros(1, 1),
                                                                torch.as_tensor([[float(np.mean(d))]]), m))
    for wrong in (not_squared, margin_both, summed, swapped, half, chapter_triplet):
        assert status(C14.check_contrastive_loss, wrong) == "failed"


# chapter 14, exercise 2: mean average precision ---------------------------------------------------------------------

def test_ch14_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_loops(dist, labels):
        total = 0.0
        for q in range(len(labels)):
            order = sorted((i for i in range(len(labels)) if i != q), key=lambda i: (dist[q, i], i))
            hits, precisions = 0, []
            for rank, i in enumerate(order, 1):
                if labels[i] == labels[q]:
                    hits += 1
                    precisions.append(hits / rank)
            total += sum(precisions) / len(precisions)
        return total / len(labels)
    assert status(C14.check_mean_average_precision, by_loops) == "passed"
    def with_self(dist, labels):
        aps = []
        for q in range(len(labels)):
            ranked = np.argsort(dist[q], kind="stable")
            hits = labels[ranked] == labels[q]
            aps.append((np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)).mean())
        return float(np.mean(aps))
    def p_at_1(dist, labels):
        d = dist + np.diag(np.full(len(labels), np.inf))
        return float((labels[d.argmin(1)] == labels).mean())
    def farthest_first(dist, labels):
        return by_loops(-dist, labels)
    def chapter_precision(dist, labels):            # the chapter's own metric, on points recovered from nothing
        return C14.precision_at_1(torch.as_tensor(dist), labels)
    for wrong in (with_self, p_at_1, farthest_first, chapter_precision):
        assert status(C14.check_mean_average_precision, wrong) == "failed"


# chapter 03, exercise 1: the Shapley interaction index from a table of coalition worths -----------------------------

from dlopt_labs.explain import agnostic as A3


def _interactions_by_orders(v):
    """A different correct route: average over every order of the players of the joint-arrival gain, as the pair's
    discrete second derivative in the context of the players before both (equal to the index's weights)."""
    import itertools
    v = np.asarray(v, float); M = int(np.log2(len(v)))
    out = np.zeros((M, M))
    for i in range(M):
        for j in range(M):
            if i == j: continue
            others = [k for k in range(M) if k not in (i, j)]
            total, count = 0.0, 0
            for order in itertools.permutations(others + [-1]):       # -1 marks where the pair arrives, together
                S = 0
                for k in order:
                    if k == -1: break
                    S |= 1 << k
                total += v[S | 1 << i | 1 << j] - v[S | 1 << i] - v[S | 1 << j] + v[S]; count += 1
            out[i, j] = total / count
    return out


def test_ch03_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(A3.check_shapley_interactions, _interactions_by_orders) == "passed"
    def empty_context(v):                               # only v({i, j}) - v({i}) - v({j}) + v({})
        v = np.asarray(v, float); M = int(np.log2(len(v))); out = np.zeros((M, M))
        for i in range(M):
            for j in range(M):
                if i != j: out[i, j] = v[1 << i | 1 << j] - v[1 << i] - v[1 << j] + v[0]
        return out
    def banzhaf(v):                                     # every context weighted equally
        v = np.asarray(v, float); M = int(np.log2(len(v))); out = np.zeros((M, M))
        for i in range(M):
            for j in range(M):
                if i == j: continue
                gains = [v[m | 1 << i | 1 << j] - v[m | 1 << i] - v[m | 1 << j] + v[m]
                         for m in range(len(v)) if not m & (1 << i | 1 << j)]
                out[i, j] = np.mean(gains)
        return out
    def shapley_weights(v):                             # the Shapley value's weights |S|!(M-|S|-1)!/M! by mistake
        v = np.asarray(v, float); M = int(np.log2(len(v))); out = np.zeros((M, M))
        for i in range(M):
            for j in range(M):
                if i == j: continue
                for m in range(len(v)):
                    if m & (1 << i | 1 << j): continue
                    s = bin(m).count("1")
                    w = math.factorial(s) * math.factorial(M - s - 1) / math.factorial(M)
                    out[i, j] += w * (v[m | 1 << i | 1 << j] - v[m | 1 << i] - v[m | 1 << j] + v[m])
        return out
    def kernel_shap_outer(v):                           # the chapter's KernelSHAP on the game, as an outer product
        v = np.asarray(v, float); M = int(np.log2(len(v)))
        f = lambda X: v[(np.rint(X).astype(int) << np.arange(M)).sum(1)]
        phi = A3.kernel_shap(f, np.ones(M), np.zeros((1, M)), n_samples=2**M)["values"]
        out = np.outer(phi, phi); np.fill_diagonal(out, 0); return out
    for wrong in (empty_context, banzhaf, shapley_weights, kernel_shap_outer):
        assert status(A3.check_shapley_interactions, wrong) == "failed"


# chapter 03, exercise 2: drop-column importance ---------------------------------------------------------------------

def test_ch03_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    def by_delete(X_train, y_train, X_test, y_test):
        base = LogisticRegression(max_iter=5000)
        def nll(Xa, Xb):
            m = clone(base).fit(Xa, y_train)
            return log_loss(y_test, m.predict_proba(Xb))
        full = nll(X_train, X_test)
        return [nll(np.delete(X_train, j, 1), np.delete(X_test, j, 1)) - full for j in range(X_train.shape[1])]
    assert status(A3.check_drop_column_importance, by_delete) == "passed"

    def permuted(X_train, y_train, X_test, y_test):     # the chapter's permutation importance on the same model
        m = LogisticRegression(max_iter=5000).fit(X_train, y_train)
        score = lambda X, y: -log_loss(y, m.predict_proba(X))
        return A3.permutation_importance(score, X_test, y_test, 5, 0)["importances_mean"]
    def on_training_rows(X_train, y_train, X_test, y_test):
        return by_delete(X_train, y_train, X_train, y_train)
    def accuracy_drop(X_train, y_train, X_test, y_test):
        def acc(cols):
            m = LogisticRegression(max_iter=5000).fit(X_train[:, cols], y_train)
            return m.score(X_test[:, cols], y_test)
        allc = list(range(X_train.shape[1]))
        return [acc(allc) - acc([c for c in allc if c != j]) for j in allc]
    def zeroed_not_refitted(X_train, y_train, X_test, y_test):   # the column set to 0, the model kept
        m = LogisticRegression(max_iter=5000).fit(X_train, y_train)
        full = log_loss(y_test, m.predict_proba(X_test))
        out = []
        for j in range(X_train.shape[1]):
            Z = X_test.copy(); Z[:, j] = 0
            out.append(log_loss(y_test, m.predict_proba(Z)) - full)
        return out
    for wrong in (permuted, on_training_rows, accuracy_drop, zeroed_not_refitted):
        assert status(A3.check_drop_column_importance, wrong) == "failed"


# chapter 10, exercise 1: Grad-CAM++ ----------------------------------------------------------------------------------

from dlopt_labs.explain import saliency as S10


def test_ch10_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_torch(acts, grads):
        A, G = torch.as_tensor(acts), torch.as_tensor(grads)
        den = 2 * G**2 + A.sum((1, 2), keepdim=True) * G**3
        alpha = torch.where(den != 0, G**2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(G))
        w = (alpha * G.clamp(min=0)).sum((1, 2))
        return torch.relu(torch.einsum("k,khw->hw", w, A)).numpy()
    assert status(S10.check_grad_cam_pp, by_torch) == "passed"
    def plain_grad_cam(acts, grads):                    # the chapter's Grad-CAM weights
        return np.maximum(np.tensordot(grads.mean((1, 2)), acts, axes=1), 0)
    def no_relu_on_grads(acts, grads):
        den = 2 * grads**2 + acts.sum((1, 2), keepdims=True) * grads**3
        alpha = np.divide(grads**2, den, out=np.zeros_like(grads), where=den != 0)
        return np.maximum(np.tensordot((alpha * grads).sum((1, 2)), acts, axes=1), 0)
    def nan_at_zero(acts, grads):                       # 0/0 left as NaN
        with np.errstate(all="ignore"):
            alpha = grads**2 / (2 * grads**2 + acts.sum((1, 2), keepdims=True) * grads**3)
        return np.maximum(np.tensordot((alpha * np.maximum(grads, 0)).sum((1, 2)), acts, axes=1), 0)
    def no_final_relu(acts, grads):
        den = 2 * grads**2 + acts.sum((1, 2), keepdims=True) * grads**3
        alpha = np.divide(grads**2, den, out=np.zeros_like(grads), where=den != 0)
        return np.tensordot((alpha * np.maximum(grads, 0)).sum((1, 2)) - 1.0, acts, axes=1)
    for wrong in (plain_grad_cam, no_relu_on_grads, nan_at_zero, no_final_relu):
        assert status(S10.check_grad_cam_pp, wrong) == "failed"


# chapter 10, exercise 2: relevance rank accuracy ---------------------------------------------------------------------

def test_ch10_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_lexsort(attributions, masks):               # value descending, then pixel index ascending
        A, M = attributions.reshape(len(attributions), -1), masks.reshape(len(masks), -1)
        out = []
        for a, m in zip(A, M):
            k = int(m.sum())
            order = np.lexsort((np.arange(len(a)), -a))[:k]
            out.append(m[order].sum() / k)
        return out
    assert status(S10.check_rank_accuracy, by_lexsort) == "passed"
    def ties_counted_whole(attributions, masks):       # every pixel tied at the K-th value counted in
        A, M = attributions.reshape(len(attributions), -1), masks.reshape(len(masks), -1)
        return [m[a >= np.sort(a)[::-1][int(m.sum()) - 1]].sum() / m.sum() for a, m in zip(A, M)]
    def by_magnitude(attributions, masks):
        A, M = np.abs(attributions).reshape(len(attributions), -1), masks.reshape(len(masks), -1)
        return [m[np.argsort(-a)[: int(m.sum())]].mean() for a, m in zip(A, M)]
    def chapter_mass(attributions, masks):             # the chapter's mass on the object
        return S10.mass_in_mask(torch.as_tensor(attributions), masks).numpy()
    def fixed_k(attributions, masks):                   # the top 5 pixels whatever the object's size
        A, M = attributions.reshape(len(attributions), -1), masks.reshape(len(masks), -1)
        return [m[np.argsort(-a)[:5]].mean() for a, m in zip(A, M)]
    for wrong in (by_magnitude, chapter_mass, fixed_k, ties_counted_whole):
        assert status(S10.check_rank_accuracy, wrong) == "failed"


# chapter 22, exercise 1: an entropy split ----------------------------------------------------------------------------

from dlopt_labs.explain import glassbox as G22


def test_ch22_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from sklearn.tree import DecisionTreeClassifier
    def by_loop(x, y):                                  # threshold by threshold, entropies from counts
        def H(c):
            p = np.asarray(c, float) / np.sum(c); p = p[p > 0]
            return -(p * np.log2(p)).sum()
        vals = np.unique(x); best = (None, -np.inf)
        for t in (vals[:-1] + vals[1:]) / 2:
            l, r = y[x <= t], y[x > t]
            g = H(np.bincount(y)) - (len(l) * H(np.bincount(l)) + len(r) * H(np.bincount(r))) / len(y)
            ratio = g / H([len(l), len(r)])
            if ratio > best[1] + 1e-12: best = (t, ratio)
        return best
    assert status(G22.check_gain_ratio_split, by_loop) == "passed"
    def information_gain(x, y):                         # ID3's criterion: scikit-learn's entropy stump
        t = DecisionTreeClassifier(criterion="log_loss", max_depth=1).fit(x[:, None], y).tree_
        n = t.n_node_samples
        return t.threshold[0], t.impurity[0] - (n[1] * t.impurity[1] + n[2] * t.impurity[2]) / n[0]
    def gini_split(x, y):                               # the chapter's tree, its threshold
        tree = G22.fit_tree(x[:, None], y, 1)
        return tree["threshold"], by_loop(x, y)[1]
    def natural_log(x, y):                              # the ratio is unit-free: its value survives, but
        t, r = by_loop(x, y)                            # a threshold at a data value does not
        return np.max(x[x <= t]), r
    for wrong in (information_gain, gini_split, natural_log):
        assert status(G22.check_gain_ratio_split, wrong) == "failed"


# chapter 22, exercise 2: average decision path length ----------------------------------------------------------------

def test_ch22_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def recursive(left, right, n):
        def walk(node, depth):
            if left[node] == -1: return depth * n[node]
            return walk(left[node], depth + 1) + walk(right[node], depth + 1)
        return walk(0, 0) / n[0]
    assert status(G22.check_path_length, recursive) == "passed"
    def unweighted(left, right, n):                     # every leaf counted once, not by its rows
        depth, leaves = {0: 0}, []
        for node in range(len(left)):
            if left[node] == -1: leaves.append(depth[node])
            else: depth[left[node]] = depth[right[node]] = depth[node] + 1
        return float(np.mean(leaves))
    def max_depth(left, right, n):
        depth = {0: 0}
        for node in range(len(left)):
            if left[node] != -1: depth[left[node]] = depth[right[node]] = depth[node] + 1
        return float(max(depth.values()))
    def log2_leaves(left, right, n):                    # the depth of a balanced tree with as many leaves
        return float(np.log2(np.sum(np.asarray(left) == -1)))
    for wrong in (unweighted, max_depth, log2_leaves):
        assert status(G22.check_path_length, wrong) == "failed"


# chapter 30, exercise 1: filling removed pixels from their neighbours -------------------------------------------------

from dlopt_labs.explain import evaluate as E30


def test_ch30_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def gauss_seidel(image, removed):                  # sweeps until nothing moves, instead of a direct solve
        out = np.where(removed, image.mean(), image).astype(float)
        H, W = image.shape
        for _ in range(20000):
            moved = 0.0
            for i, j in zip(*np.nonzero(removed)):
                nb = [out[a, c] for a, c in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)) if 0 <= a < H and 0 <= c < W]
                new = sum(nb) / len(nb)
                moved, out[i, j] = max(moved, abs(new - out[i, j])), new
            if moved < 1e-14:
                break
        return out
    assert status(E30.check_neighbour_fill, gauss_seidel) == "passed"
    def solve(image, removed, neighbours, outside_zero=False):
        H, W = image.shape
        idx = {p: k for k, p in enumerate(zip(*np.nonzero(removed)))}
        A, b = np.zeros((len(idx), len(idx))), np.zeros(len(idx))
        for (i, j), k in idx.items():
            for di, dj in neighbours:
                a, c = i + di, j + dj
                if not (0 <= a < H and 0 <= c < W):
                    A[k, k] += outside_zero
                    continue
                A[k, k] += 1
                if (a, c) in idx: A[k, idx[(a, c)]] -= 1
                else: b[k] += image[a, c]
        out, v = image.astype(float).copy(), np.linalg.solve(A, b)
        for (i, j), k in idx.items(): out[i, j] = v[k]
        return out
    four = ((-1, 0), (1, 0), (0, -1), (0, 1))
    eight = four + ((-1, -1), (-1, 1), (1, -1), (1, 1))
    def eight_neighbours(image, removed): return solve(image, removed, eight)
    def zero_outside(image, removed): return solve(image, removed, four, outside_zero=True)
    def kept_neighbours_once(image, removed):          # one pass over the kept neighbours, no system
        out = image.astype(float).copy(); H, W = image.shape
        for i, j in zip(*np.nonzero(removed)):
            nb = [image[a, c] for a, c in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
                  if 0 <= a < H and 0 <= c < W and not removed[a, c]]
            out[i, j] = np.mean(nb) if nb else image[~removed].mean()
        return out
    def image_mean(image, removed): return np.where(removed, image[~removed].mean(), image)
    def chapter_blur(image, removed):                  # the chapter's blurred fill
        smooth = E30.blurred(torch.as_tensor(image, dtype=torch.float64)[None, None])[0, 0].numpy()
        return np.where(removed, smooth, image)
    for wrong in (eight_neighbours, zero_outside, kept_neighbours_once, image_mean, chapter_blur):
        assert status(E30.check_neighbour_fill, wrong) == "failed"


# chapter 30, exercise 2: Krippendorff's alpha --------------------------------------------------------------------------

def test_ch30_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_coincidences(R):                            # Krippendorff's coincidence matrix over the values that occur
        units = [c[~np.isnan(c)] for c in R.T]
        units = [u for u in units if len(u) > 1]
        vals = np.unique(np.concatenate(units)); pos = {v: k for k, v in enumerate(vals)}
        o = np.zeros((len(vals), len(vals)))
        for u in units:
            for i in range(len(u)):
                for j in range(len(u)):
                    if i != j: o[pos[u[i]], pos[u[j]]] += 1 / (len(u) - 1)
        n_c = o.sum(1); n = n_c.sum(); d = (vals[:, None] - vals[None, :]) ** 2
        return 1 - (n - 1) * (o * d).sum() / (np.outer(n_c, n_c) * d).sum()
    assert status(E30.check_krippendorff_alpha, by_coincidences) == "passed"
    def with_single_ratings(R):                        # counts the unpairable values too
        units = [c[~np.isnan(c)] for c in R.T]
        vals = np.concatenate(units); n = len(vals)
        d_o = sum(((u[:, None] - u[None]) ** 2).sum() / (len(u) - 1) for u in units if len(u) > 1) / n
        return 1 - d_o / (((vals[:, None] - vals[None]) ** 2).sum() / (n * (n - 1)))
    def no_pair_weight(R):                             # forgets 1/(m - 1)
        units = [u for u in (c[~np.isnan(c)] for c in R.T) if len(u) > 1]
        vals = np.concatenate(units); n = len(vals)
        d_o = sum(((u[:, None] - u[None]) ** 2).sum() for u in units) / n
        return 1 - d_o / (((vals[:, None] - vals[None]) ** 2).sum() / (n * (n - 1)))
    def nominal(R):                                    # disagreement counted, not its size
        units = [u for u in (c[~np.isnan(c)] for c in R.T) if len(u) > 1]
        vals = np.concatenate(units); n = len(vals)
        d_o = sum((u[:, None] != u[None]).sum() / (len(u) - 1) for u in units) / n
        return 1 - d_o / ((vals[:, None] != vals[None]).sum() / (n * (n - 1)))
    def variance_ratio(R):                             # 1 - within-item variance / total variance
        within = np.nanmean(np.nanvar(R, axis=0))
        return 1 - within / np.nanvar(R)
    for wrong in (with_single_ratings, no_pair_weight, nominal, variance_ratio):
        assert status(E30.check_krippendorff_alpha, wrong) == "failed"


# chapter 11, exercise 1: any picture, the same statistics -------------------------------------------------------------

from dlopt_labs.explain import visualise as V11


def test_ch11_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_cholesky(x, y, t):                          # whiten with the inverse Cholesky factor, colour with the target's
        P = np.c_[x, y] - [x.mean(), y.mean()]
        L = np.linalg.cholesky(np.cov(P.T))
        Z = P @ np.linalg.inv(L).T
        S = np.array([[t["sd_x"] ** 2, t["corr"] * t["sd_x"] * t["sd_y"]],
                      [t["corr"] * t["sd_x"] * t["sd_y"], t["sd_y"] ** 2]])
        out = Z @ np.linalg.cholesky(S).T + [t["mean_x"], t["mean_y"]]
        return out[:, 0], out[:, 1]
    assert status(V11.check_set_statistics, by_cholesky) == "passed"
    def corr_ignored(x, y, t):                         # shifts and scales each axis: the correlation stays as it was
        return (t["mean_x"] + t["sd_x"] * (x - x.mean()) / x.std(ddof=1),
                t["mean_y"] + t["sd_y"] * (y - y.mean()) / y.std(ddof=1))
    def original_corr_kept_in(x, y, t):                # mixes in zy without removing its correlation with x first
        zx, zy = (x - x.mean()) / x.std(ddof=1), (y - y.mean()) / y.std(ddof=1)
        r = t["corr"]
        return t["mean_x"] + t["sd_x"] * zx, t["mean_y"] + t["sd_y"] * (r * zx + np.sqrt(1 - r * r) * zy)
    def population_sd(x, y, t):                        # standard deviations with n instead of n - 1
        zx, zy = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
        r0 = np.corrcoef(x, y)[0, 1]; w = (zy - r0 * zx) / np.sqrt(1 - r0**2); r = t["corr"]
        return t["mean_x"] + t["sd_x"] * zx, t["mean_y"] + t["sd_y"] * (r * zx + np.sqrt(1 - r * r) * w)
    def x_from_both(x, y, t):                          # a symmetric square root: the new x depends on y too
        from scipy.linalg import sqrtm
        P = np.c_[x, y] - [x.mean(), y.mean()]
        Z = P @ np.real(np.linalg.inv(sqrtm(np.cov(P.T))))
        S = np.array([[t["sd_x"] ** 2, t["corr"] * t["sd_x"] * t["sd_y"]],
                      [t["corr"] * t["sd_x"] * t["sd_y"], t["sd_y"] ** 2]])
        out = Z @ np.real(sqrtm(S)) + [t["mean_x"], t["mean_y"]]
        return out[:, 0], out[:, 1]
    for wrong in (corr_ignored, original_corr_kept_in, population_sd, x_from_both):
        assert status(V11.check_set_statistics, wrong) == "failed"


# chapter 11, exercise 2: TensorBoard's smoothing ----------------------------------------------------------------------

def test_ch11_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    import pandas as pd
    def by_weights(values, w):                         # the debiased average written as explicit weights
        v = np.asarray(values, float)
        if v.size == 0 or np.all(v == v[0]): return v.copy()
        out, seen = v.copy(), []
        for i, x in enumerate(v):
            if not np.isfinite(x): continue
            seen.append(x)
            k = len(seen); wt = (1 - w) * w ** np.arange(k - 1, -1, -1)
            out[i] = (wt * np.array(seen)).sum() / wt.sum() if w != 1 else seen[0]
        return out
    assert status(V11.check_tensorboard_smoothing, by_weights) == "passed"
    def pandas_ewm(values, w):                         # pandas fills the gaps with the running average
        return pd.Series(values).replace([np.inf, -np.inf], np.nan).ewm(alpha=1 - w, adjust=True).mean().to_numpy()
    def not_debiased(values, w):
        out, last = np.asarray(values, float).copy(), 0.0
        for i, x in enumerate(out):
            if np.isfinite(x): last = w * last + (1 - w) * x; out[i] = last
        return out
    def counts_the_gaps(values, w):                    # k counts every step, finite or not
        out, last = np.asarray(values, float).copy(), 0.0
        for i, x in enumerate(out):
            if np.isfinite(x): last = w * last + (1 - w) * x; out[i] = last / (1 - w ** (i + 1))
        return out
    def started_at_first(values, w):                   # the textbook EMA: s_0 = v_0, no debiasing
        out = np.asarray(values, float).copy(); last = None
        for i, x in enumerate(out):
            if np.isfinite(x): last = x if last is None else w * last + (1 - w) * x; out[i] = last
        return out
    def no_constant_rule(values, w):                   # debiased and gap-aware, but recomputes a constant series
        out, last, k = np.asarray(values, float).copy(), 0.0, 0
        for i, x in enumerate(out):
            if np.isfinite(x): last = w * last + (1 - w) * x; k += 1; out[i] = last / (1 - w ** k)
        return out
    def nan_as_zero(values, w):                        # fills the gaps with 0 before smoothing
        return by_weights(np.nan_to_num(np.asarray(values, float), nan=0.0, posinf=0.0, neginf=0.0), w)
    for wrong in (pandas_ewm, not_debiased, counts_the_gaps, started_at_first, no_constant_rule, nan_as_zero):
        assert status(V11.check_tensorboard_smoothing, wrong) == "failed"


# chapter 23, exercise 1: the heavy-tailed t-SNE gradient ------------------------------------------------------------

from dlopt_labs.explain import embed as E23


def test_ch23_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from scipy.spatial.distance import pdist, squareform
    from sklearn.manifold._t_sne import _kl_divergence
    def by_pairs(Y, P, dof):                           # an explicit loop over pairs instead of matrices
        n, grad, k = len(Y), np.zeros_like(Y), 0
        d2 = pdist(Y, "sqeuclidean"); w = (1 + d2 / dof) ** (-(dof + 1) / 2); Z = 2 * w.sum()
        for i in range(n):
            for j in range(i + 1, n):
                f = 2 * (dof + 1) / dof * (P[k] - w[k] / Z) / (1 + d2[k] / dof) * (Y[i] - Y[j])
                grad[i] += f; grad[j] -= f; k += 1
        return grad
    assert status(E23.check_heavy_tailed_gradient, by_pairs) == "passed"
    def chapter_nu_1(Y, P, dof): return E23.kl_and_gradient(Y, P)[1]
    def scikit_learn(Y, P, dof):                       # multiplies by the kernel itself: right only for dof = 1
        return _kl_divergence(Y.ravel().copy(), P, dof, len(Y), 2)[1].reshape(Y.shape)
    def constant_four(Y, P, dof):                      # the factor of the dof = 1 case kept
        base = 1 + pdist(Y, "sqeuclidean") / dof; w = base ** (-(dof + 1) / 2)
        M = squareform((P - w / (2 * w.sum())) / base)
        return 4 * (M.sum(1)[:, None] * Y - M @ Y)
    def no_normaliser(Y, P, dof):                      # forgets that Q is normalised: only the attraction
        base = 1 + pdist(Y, "sqeuclidean") / dof
        M = squareform(P / base)
        return 2 * (dof + 1) / dof * (M.sum(1)[:, None] * Y - M @ Y)
    for wrong in (chapter_nu_1, scikit_learn, constant_four, no_normaliser):
        assert status(E23.check_heavy_tailed_gradient, wrong) == "failed"


# chapter 23, exercise 2: new points in a classical MDS picture ---------------------------------------------------

def test_ch23_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from scipy.spatial.distance import pdist, squareform
    def by_gram(D, D_new, k):                          # old picture from the library, new points from the Gram rows
        from sklearn.manifold import ClassicalMDS
        D = np.asarray(D); old = ClassicalMDS(k, metric="precomputed").fit_transform(D)
        d2, n2 = D ** 2, np.asarray(D_new) ** 2
        G = -0.5 * (n2 - n2.mean(1, keepdims=True) - d2.mean(0) + d2.mean())   # centred inner products
        return old, G @ old / (old ** 2).sum(0)
    assert status(E23.check_new_points, by_gram) == "passed"
    def _mds(D, k):
        n = len(D); J = np.eye(n) - 1 / n; w, V = np.linalg.eigh(-0.5 * J @ (np.asarray(D) ** 2) @ J)
        top = np.argsort(w)[::-1][:k]; return np.maximum(w[top], 1e-12), V[:, top]
    def redraw_all(D, D_new, k):                       # classical MDS of old and new together: the old points move
        D, D_new = np.asarray(D), np.asarray(D_new); m = len(D_new)
        between = squareform(pdist(np.zeros((m, 1)))) + np.median(D)   # unknown: guessed
        full = np.block([[D, D_new.T], [D_new, between]])
        w, V = _mds(full, k); pic = V * np.sqrt(w); return pic[: len(D)], pic[len(D):]
    def unsquared(D, D_new, k):                        # Gower's formula on distances instead of squared distances
        w, V = _mds(D, k); D, D_new = np.asarray(D), np.asarray(D_new)
        return V * np.sqrt(w), 0.5 * (D.mean(0) - D_new) @ V / np.sqrt(w)
    def no_centring(D, D_new, k):                      # forgets the old points' mean squared distances
        w, V = _mds(D, k)
        return V * np.sqrt(w), -0.5 * (np.asarray(D_new) ** 2) @ V / np.sqrt(w)
    def wrong_scale(D, D_new, k):                      # multiplies by the root of the eigenvalue instead of dividing
        w, V = _mds(D, k); d2 = np.asarray(D) ** 2
        return V * np.sqrt(w), 0.5 * (d2.mean(0) - np.asarray(D_new) ** 2) @ V * np.sqrt(w)
    for wrong in (redraw_all, unsquared, no_centring, wrong_scale):
        assert status(E23.check_new_points, wrong) == "failed"


# chapter 09, exercise 1: DeLong's standard error of ROC-AUC ---------------------------------------------------------

from dlopt_labs.reliable import validate as V09


def test_ch09_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_search(y, score):                           # placements by binary search in the sorted scores
        y, s = np.asarray(y, bool), np.asarray(score, float)
        pos, neg = np.sort(s[y]), np.sort(s[~y])
        below = lambda a, b: (np.searchsorted(b, a, "left") + np.searchsorted(b, a, "right")) / (2 * len(b))
        v10, v01 = below(s[y], neg), 1 - below(s[~y], pos)
        return v10.mean(), math.sqrt(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))
    assert status(V09.check_delong, by_search) == "passed"
    def hanley_mcneil(y, score):                       # the binormal-free formula of Hanley and McNeil (1982)
        a = V09.roc_auc(y, score); n1 = int(np.sum(y)); n0 = len(y) - n1
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        return a, math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    def population_variance(y, score):                 # ddof=0
        y, s = np.asarray(y, bool), np.asarray(score, float)
        psi = (s[y][:, None] > s[~y][None]) + 0.5 * (s[y][:, None] == s[~y][None])
        return psi.mean(), math.sqrt(psi.mean(1).var() / y.sum() + psi.mean(0).var() / (~y).sum())
    def swapped_counts(y, score):                      # each variance divided by the other class's count
        y, s = np.asarray(y, bool), np.asarray(score, float)
        psi = (s[y][:, None] > s[~y][None]) + 0.5 * (s[y][:, None] == s[~y][None])
        return psi.mean(), math.sqrt(psi.mean(1).var(ddof=1) / (~y).sum() + psi.mean(0).var(ddof=1) / y.sum())
    def bootstrap_halfwidth(y, score):                 # the chapter's own bootstrap, turned into an se
        lo, hi = V09.bootstrap_interval(V09.roc_auc, y, score, draws=200)
        return V09.roc_auc(y, score), (hi - lo) / (2 * 1.96)
    for wrong in (hanley_mcneil, population_variance, swapped_counts, bootstrap_halfwidth, V09.roc_auc,
                  V09.bootstrap_interval):
        assert status(V09.check_delong, wrong) == "failed"


# chapter 09, exercise 2: group k-fold ---------------------------------------------------------------------------

def test_ch09_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    import heapq
    def by_heap(groups, k):                            # a heap of (rows, fold) instead of argmin over an array
        names, sizes = np.unique(groups, return_counts=True)
        if len(names) < k: raise ValueError("fewer groups than folds")
        heap = [(0, f) for f in range(k)]; fold_of = {}
        for g in sorted(range(len(names)), key=lambda i: (-sizes[i], i)):
            rows, f = heapq.heappop(heap); fold_of[names[g]] = f; heapq.heappush(heap, (rows + sizes[g], f))
        return np.array([fold_of[g] for g in groups])
    assert status(V09.check_group_folds, by_heap) == "passed"
    def round_robin(groups, k):                        # groups dealt in turn, ignoring their sizes
        names = np.unique(groups)
        if len(names) < k: raise ValueError("fewer groups than folds")
        return np.searchsorted(names, groups) % k
    def rows_not_groups(groups, k): return V09.kfold_ids(len(groups), k, seed=0)
    def stratified_by_group(groups, k): return V09.stratified_fold_ids(groups, k, seed=0)
    def no_refusal(groups, k):                         # balanced, but fills folds with nothing when groups are few
        names, of_row, sizes = np.unique(groups, return_inverse=True, return_counts=True)
        load, fold = np.zeros(k), np.empty(len(names), dtype=int)
        for g in np.argsort(-sizes, kind="stable"):
            fold[g] = load.argmin(); load[fold[g]] += sizes[g]
        return fold[of_row]
    for wrong in (round_robin, rows_not_groups, stratified_by_group, no_refusal):
        assert status(V09.check_group_folds, wrong) == "failed"


# chapter 21, exercise 1: A-GEM's projection ----------------------------------------------------------------------

from dlopt_labs.reliable import continual as C21


def test_ch21_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_unit_vector(g, g_ref):                      # normalise g_ref first, then clip the negative part
        n = g_ref.norm()
        if n == 0: return g
        u = g_ref / n
        return g - torch.clamp(g @ u, max=0) * u
    assert status(C21.check_agem, by_unit_vector) == "passed"
    def always_project(g, g_ref): return g - (g @ g_ref) / (g_ref @ g_ref) * g_ref
    def onto_ref(g, g_ref): return (g @ g_ref) / (g_ref @ g_ref) * g_ref if g @ g_ref < 0 else g
    def wrong_sign(g, g_ref): return g + (g @ g_ref) / (g_ref @ g_ref) * g_ref if g @ g_ref < 0 else g
    def average(g, g_ref): return (g + g_ref) / 2           # replay-like: mixes the two gradients
    def no_zero_guard(g, g_ref): return g - (g @ g_ref) / (g_ref @ g_ref) * g_ref if g @ g_ref <= 0 else g
    for wrong in (always_project, onto_ref, wrong_sign, average, no_zero_guard):
        assert status(C21.check_agem, wrong) == "failed"


# chapter 21, exercise 2: the Mahalanobis score --------------------------------------------------------------------

def test_ch21_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from sklearn.covariance import EmpiricalCovariance
    def with_sklearn(E, y, T):                          # scikit-learn's covariance on the class-centred rows
        classes = np.unique(y); means = {c: E[y == c].mean(0) for c in classes}
        cov = EmpiricalCovariance(assume_centered=True).fit(E - np.stack([means[c] for c in y]))
        return np.min([cov.mahalanobis(T - means[c]) for c in classes], axis=0)
    assert status(C21.check_mahalanobis, with_sklearn) == "passed"
    def per_class_cov(E, y, T):                         # each class its own covariance (QDA-like)
        out = []
        for c in np.unique(y):
            m = E[y == c].mean(0); P = np.linalg.inv(np.cov(E[y == c].T, bias=True))
            out.append(np.einsum("ij,jk,ik->i", T - m, P, T - m))
        return np.min(out, axis=0)
    def total_cov(E, y, T):                             # the covariance of all rows, class means ignored
        P = np.linalg.inv(np.cov(E.T, bias=True))
        return np.min([np.einsum("ij,jk,ik->i", T - E[y == c].mean(0), P, T - E[y == c].mean(0)) for c in np.unique(y)], 0)
    def euclidean(E, y, T):
        return np.min([((T - E[y == c].mean(0)) ** 2).sum(1) for c in np.unique(y)], 0)
    def not_squared(E, y, T): return np.sqrt(with_sklearn(E, y, T))
    def forest(E, y, T):                                # the chapter's own detector
        from dlopt_labs.reliable.validate import anomaly_score, isolation_forest
        return anomaly_score(isolation_forest(E, 50, 64, seed=0), T)
    for wrong in (per_class_cov, total_cov, euclidean, not_squared, forest):
        assert status(C21.check_mahalanobis, wrong) == "failed"


# chapter 06, exercise 1: scale and zero point of asymmetric quantisation -----------------------------------------

from dlopt_labs.efficient import inference as I06


def test_ch06_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def from_the_top(xmin, xmax, bits):                 # the zero point counted down from the top code
        lo, hi = min(xmin, 0.0), max(xmax, 0.0)
        top = 2**bits - 1
        scale = (hi - lo) / top
        return scale, top - round(hi / scale)
    assert status(I06.check_affine_qparams, from_the_top) == "passed"
    def symmetric(xmin, xmax, bits):                    # the chapter's scheme: zero point at the middle code
        amax = max(abs(xmin), abs(xmax))
        return 2 * amax / (2**bits - 1), 2 ** (bits - 1)
    def range_without_zero(xmin, xmax, bits):           # [0.5, 6] quantised as if zero were not needed
        scale = (xmax - xmin) / (2**bits - 1)
        return scale, round(-xmin / scale)
    def too_many_steps(xmin, xmax, bits):               # 2^bits steps for 2^bits codes: the top code overflows
        lo, hi = min(xmin, 0.0), max(xmax, 0.0)
        scale = (hi - lo) / 2**bits
        return scale, round(-lo / scale)
    def unrounded(xmin, xmax, bits):                    # a fractional zero point: zero not exactly representable
        lo, hi = min(xmin, 0.0), max(xmax, 0.0)
        scale = (hi - lo) / (2**bits - 1)
        return scale, -lo / scale + 0.3
    def chapter_scale(xmin, xmax, bits):                # the chapter's own quantize_rows, reused
        _, s = I06.quantize_rows(torch.tensor([[float(xmin), float(xmax)]]), bits)
        return float(s), 2 ** (bits - 1)
    for wrong in (symmetric, range_without_zero, too_many_steps, unrounded, chapter_scale):
        assert status(I06.check_affine_qparams, wrong) == "failed", wrong.__name__


# chapter 06, exercise 2: folding batch normalisation ------------------------------------------------------------

def test_ch06_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    import copy
    from torch import nn
    def by_matrices(linear, bn):                        # the batch norm as a diagonal matrix times the layer
        with torch.no_grad():
            g = bn.weight if bn.affine else torch.ones(bn.num_features, dtype=linear.weight.dtype)
            b = bn.bias if bn.affine else torch.zeros(bn.num_features, dtype=linear.weight.dtype)
            D = torch.diag(g / (bn.running_var + bn.eps).sqrt())
            out = nn.Linear(linear.in_features, linear.out_features, dtype=linear.weight.dtype)
            out.weight.copy_(D @ linear.weight)
            lb = linear.bias if linear.bias is not None else torch.zeros_like(b)
            out.bias.copy_(D @ (lb - bn.running_mean) + b)
        return out
    assert status(I06.check_fold_bn, by_matrices) == "passed"
    def no_eps(linear, bn):
        bn2 = copy.deepcopy(bn); bn2.eps = 0.0
        return by_matrices(linear, bn2)
    def variance_not_std(linear, bn):
        bn2 = copy.deepcopy(bn)
        with torch.no_grad(): bn2.running_var.copy_((bn.running_var + bn.eps) ** 2 - bn.eps)
        return by_matrices(linear, bn2)
    def in_place(linear, bn):                            # right numbers, but the learner's layer is overwritten
        folded = by_matrices(linear, bn)
        with torch.no_grad(): linear.weight.copy_(folded.weight)
        return folded
    def mean_ignored(linear, bn):
        bn2 = copy.deepcopy(bn)
        with torch.no_grad(): bn2.running_mean.zero_()
        return by_matrices(linear, bn2)
    def returns_the_pair(linear, bn): return nn.Sequential(linear, bn)
    for wrong in (no_eps, variance_not_std, in_place, mean_ignored, returns_the_pair):
        assert status(I06.check_fold_bn, wrong) == "failed", wrong.__name__


# chapter 26, exercise 1: the receptive field ----------------------------------------------------------------------

from dlopt_labs.efficient import arch as A26


def test_ch26_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def backwards(layers):                              # from the output pixel back to the input
        r = 1
        for k, s, d in reversed(layers):
            r = (r - 1) * s + (k - 1) * d + 1
        return r
    assert status(A26.check_receptive_field, backwards) == "passed"
    def strides_ignored(layers): return 1 + sum((k - 1) * d for k, s, d in layers)
    def dilation_ignored(layers):
        r, j = 1, 1
        for k, s, d in layers:
            r, j = r + (k - 1) * j, j * s
        return r
    def sum_of_kernels(layers): return sum(k for k, s, d in layers)
    def stride_after(layers):                           # the layer's own stride counted in its step
        r, j = 1, 1
        for k, s, d in layers:
            j *= s
            r += (k - 1) * d * j
        return r
    for wrong in (strides_ignored, dilation_ignored, sum_of_kernels, stride_after):
        assert status(A26.check_receptive_field, wrong) == "failed", wrong.__name__


# chapter 26, exercise 2: squeeze and excitation ------------------------------------------------------------------

def test_ch26_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from torch import nn
    class SE(nn.Module):                                # Linear layers on the pooled vector
        def __init__(self, c, r, pool="mean", gate=torch.sigmoid, bias=True):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(c, c // r, bias=bias), nn.Linear(c // r, c, bias=bias)
            self.pool, self.gate = pool, gate
        def forward(self, x):
            s = {"mean": lambda: x.mean((2, 3)), "max": lambda: x.amax((2, 3)),
                 "batch": lambda: x.mean((0, 2, 3)).expand(len(x), -1)}[self.pool]()
            return x * self.gate(self.fc2(torch.relu(self.fc1(s))))[:, :, None, None]
    assert status(A26.check_squeeze_excite, lambda c, r: SE(c, r)) == "passed"
    assert status(A26.check_squeeze_excite, lambda c, r: SE(c, r, gate=F.hardsigmoid)) == "passed"
    wrongs = {
        "max pooling": lambda c, r: SE(c, r, pool="max"),
        "the batch's mean": lambda c, r: SE(c, r, pool="batch"),
        "no sigmoid": lambda c, r: SE(c, r, gate=lambda t: t),
        "no biases": lambda c, r: SE(c, r, bias=False),
        "reduction ignored": lambda c, r: SE(c, 1),
        "a separable block": lambda c, r: A26.DepthwiseSeparable(c, c),
    }
    for name, wrong in wrongs.items():
        assert status(A26.check_squeeze_excite, wrong) == "failed", name


# chapter 19, exercise 1: logit matching ---------------------------------------------------------------------------

from dlopt_labs.efficient import distill as D19


def test_ch19_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_centring_matrix(s, t):                       # (I - 11^T / C) applied to the difference
        c = s.shape[1]
        H = torch.eye(c, dtype=s.dtype) - torch.full((c, c), 1 / c, dtype=s.dtype)
        d = (s - t) @ H
        return torch.einsum("ij,ij->", d, d) / (2 * c * s.shape[0])
    assert status(D19.check_logit_matching, by_centring_matrix) == "passed"
    wrongs = {
        "not centred": lambda s, t: ((s - t) ** 2).sum(1).mean() / (2 * s.shape[1]),
        "mse over all entries": lambda s, t: F.mse_loss(s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)),
        "summed over rows": lambda s, t: by_centring_matrix(s, t) * s.shape[0],
        "the chapter's loss at a high T": lambda s, t: D19.distill_loss(s, t, T=200.0),
        "probabilities matched": lambda s, t: ((F.softmax(s, 1) - F.softmax(t, 1)) ** 2).sum(1).mean() / 2,
    }
    for name, wrong in wrongs.items():
        assert status(D19.check_logit_matching, wrong) == "failed", name


# chapter 19, exercise 2: the hint loss -----------------------------------------------------------------------------

def test_ch19_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def with_mse(h_s, h_t, proj):                       # F.mse_loss averages over features too: times their number
        return F.mse_loss(proj(h_s), h_t.detach(), reduction="sum") / len(h_s)
    assert status(D19.check_hint_loss, with_mse) == "passed"
    wrongs = {
        "teacher not detached": lambda h_s, h_t, p: ((p(h_s) - h_t) ** 2).sum(-1).mean(),
        "mean over features too": lambda h_s, h_t, p: F.mse_loss(p(h_s), h_t.detach()),
        "not squared": lambda h_s, h_t, p: (p(h_s) - h_t.detach()).norm(dim=-1).mean(),
        "projection detached": lambda h_s, h_t, p: ((F.linear(h_s, p.weight.detach(), p.bias.detach())
                                                      - h_t.detach()) ** 2).sum(-1).mean(),
        "the chapter's distillation loss": lambda h_s, h_t, p: D19.distill_loss(p(h_s), h_t),
    }
    for name, wrong in wrongs.items():
        assert status(D19.check_hint_loss, wrong) == "failed", name


# chapter 25, exercise 1: learned step size ------------------------------------------------------------------------

from dlopt_labs.efficient import pipeline as P25


def test_ch25_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def torch_learnable(x, s, qmin, qmax):              # PyTorch's own LSQ kernel, zero point 0, grad factor 1
        return torch._fake_quantize_learnable_per_tensor_affine(x, s, torch.zeros(1, dtype=x.dtype), qmin, qmax, 1.0)
    assert status(P25.check_lsq, torch_learnable) == "passed"

    def by_straight_through(x, s, qmin, qmax):         # v + (round(v) - v).detach(), the clipping by where()
        v = x / s
        r = v + (torch.round(v) - v).detach()
        return torch.where(r < qmin, qmin * s, torch.where(r > qmax, qmax * s, r * s))
    assert status(P25.check_lsq, by_straight_through) == "passed"
    wrongs = {
        "the chapter's fake_quant: no gradient for the scale": lambda x, s, lo, hi: P25.fake_quant(x, s, 0, lo, hi),
        "scale detached": lambda x, s, lo, hi: by_straight_through(x, s.detach(), lo, hi),
        "no clipping in the gradient": lambda x, s, lo, hi: (x / s + (torch.round(x / s).clamp(lo, hi) - x / s).detach()) * s,
        "rounding kept out of the scale's gradient": lambda x, s, lo, hi: torch.clamp(x + (torch.round(x / s) * s - x).detach(), lo * s, hi * s),
        "no rounding": lambda x, s, lo, hi: torch.clamp(x, lo * s, hi * s),
    }
    for name, wrong in wrongs.items():
        assert status(P25.check_lsq, wrong) == "failed", name


# chapter 25, exercise 2: bias correction --------------------------------------------------------------------------

def test_ch25_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def via_outputs(w, wq, b, x):                        # the mean output shift measured, then removed
        return b - ((x @ wq.T) - (x @ w.T)).mean(0)
    assert status(P25.check_bias_correction, via_outputs) == "passed"

    def in_place(w, wq, b, x):
        b -= (wq - w) @ x.mean(0)
        return b
    wrongs = {
        "sign flipped": lambda w, wq, b, x: b + (wq - w) @ x.mean(0),
        "unchanged": lambda w, wq, b, x: b.clone(),
        "mean over the wrong axis": lambda w, wq, b, x: b - ((wq - w) * x.mean()).sum(1),
        "changes the bias in place": in_place,
    }
    for name, wrong in wrongs.items():
        assert status(P25.check_bias_correction, wrong) == "failed", name


# chapter 18, exercise 1: Che's approximation ------------------------------------------------------------------------

from dlopt_labs.efficient import parallel as P18


def test_ch18_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_bisection(p, c):                              # the characteristic time by plain bisection on a log scale
        lo, hi = 1e-9, 1e12
        for _ in range(200):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if np.sum(1 - np.exp(-p * mid)) < c else (lo, mid)
        t = (lo * hi) ** 0.5
        return float(np.sum(p * (1 - np.exp(-p * t))))
    assert status(P18.check_che, by_bisection) == "passed"

    def simulated(p, c):                                 # the chapter's LRU replayed: close, not Che's number
        reqs = np.random.default_rng(0).choice(len(p), size=20000, p=p)
        cache = P18.LRUCache(c)
        for r in reqs.tolist(): cache.get_or_compute(r, lambda: None)
        return cache.hits / len(reqs)
    wrongs = {
        "the chapter's LRU simulated": simulated,
        "top-C share (a static cache)": lambda p, c: float(np.sort(p)[::-1][:c].sum()),
        "unweighted mean of hit probabilities": lambda p, c: float(np.mean(1 - np.exp(-p * c / p.sum()))),
        "T = C": lambda p, c: float(np.sum(p * (1 - np.exp(-p * c)))),
    }
    for name, wrong in wrongs.items():
        assert status(P18.check_che, wrong) == "failed", name


# chapter 18, exercise 2: one call per distinct row -------------------------------------------------------------------

def test_ch18_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def by_dict(model, xs):                              # distinct rows by their bytes, in first-seen order
        index, rows, back = {}, [], []
        for x in xs:
            k = x.numpy().tobytes()
            if k not in index: index[k] = len(rows); rows.append(x)
            back.append(index[k])
        return model(torch.stack(rows))[torch.tensor(back)]
    assert status(P18.check_dedupe, by_dict) == "passed"

    def per_row_cache(model, xs):                        # the chapter's content-keyed cache: one call per distinct row
        cached = P18.CachedModel(model, 1000)
        return torch.stack([cached(x) for x in xs])
    wrongs = {
        "no deduplication": lambda model, xs: model(xs),
        "the chapter's cache": per_row_cache,
        "distinct rows, answers not scattered back": lambda model, xs: model(torch.unique(xs, dim=0)),
        "sorted unique without the inverse": lambda model, xs: model(torch.unique(xs, dim=0))[:len(xs)],
    }
    for name, wrong in wrongs.items():
        assert status(P18.check_dedupe, wrong) == "failed", name


# chapter 28, exercise 1: the tail of an M/M/1 queue -------------------------------------------------------------------

def test_ch28_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from dlopt_labs.deploy import serve as S28

    def by_inverting_the_cdf(lam, mu, q):               # solve 1 - exp(-(mu - lam) t) = q numerically
        if not lam < mu: raise ValueError("unstable")
        lo, hi = 0.0, 1.0
        while 1 - math.exp(-(mu - lam) * hi) < q: hi *= 2
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if 1 - math.exp(-(mu - lam) * mid) < q else (lo, mid)
        return (lo + hi) / 2
    assert status(S28.check_mm1, by_inverting_the_cdf) == "passed"

    def no_check(lam, mu, q): return -math.log(1 - q) / abs(mu - lam)
    wrongs = {
        "service time only (no queue)": lambda lam, mu, q: -math.log(1 - q) / mu,
        "waiting time only, no service": lambda lam, mu, q: -math.log(1 - q) / (mu - lam) - 1 / mu,
        "mean time in system, not its quantile": lambda lam, mu, q: 1 / (mu - lam),
        "q instead of 1 - q": lambda lam, mu, q: -math.log(q) / (mu - lam),
        "no ValueError when lam >= mu": no_check,
        "Little's law (L / lam) at the knee": lambda lam, mu, q: S28.replicas_needed(lam, mu, 1.0)["in_flight"] / lam,
    }
    for name, wrong in wrongs.items():
        assert status(S28.check_mm1, wrong) == "failed", name


# chapter 28, exercise 2: a token bucket -----------------------------------------------------------------------------

def test_ch28_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from dlopt_labs.deploy import serve as S28

    def by_theoretical_arrival_time(times, rate, burst):  # GCRA: the same bucket, kept as a virtual time
        out, tat = [], -math.inf
        period, tolerance = 1 / rate, (burst - 1) / rate
        for t in times:
            ok = t >= tat - tolerance - 1e-12
            if ok: tat = max(tat, t) + period
            out.append(ok)
        return np.array(out)
    assert status(S28.check_token_bucket, by_theoretical_arrival_time) == "passed"

    def empty_start(times, rate, burst):                # the bucket starts empty
        out, tokens, last = [], 0.0, times[0]
        for t in times:
            tokens = min(burst, tokens + (t - last) * rate); last = t
            out.append(tokens >= 1)
            tokens -= out[-1]
        return np.array(out)

    def no_cap(times, rate, burst):                     # tokens pile up without the burst limit
        out, tokens, last = [], float(burst), times[0]
        for t in times:
            tokens += (t - last) * rate; last = t
            out.append(tokens >= 1)
            tokens -= out[-1]
        return np.array(out)

    def fixed_window(times, rate, burst):               # a per-second counter instead of a bucket
        return np.array([np.sum((times >= math.floor(t)) & (times <= t)) <= rate for t in times])
    wrongs = {
        "admit everything": lambda times, rate, burst: np.ones(len(times), bool),
        "bucket starts empty": empty_start,
        "no burst cap": no_cap,
        "fixed one-second window": fixed_window,
    }
    for name, wrong in wrongs.items():
        assert status(S28.check_token_bucket, wrong) == "failed", name


# chapter 08, exercise 1: static shapes ------------------------------------------------------------------------------

def test_ch08_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    import torch.nn.functional as _F
    from dlopt_labs.deploy import package as P08

    def by_plan(programs, x):                            # plan every piece first, pad with F.pad
        sizes, big = sorted(programs), max(programs)
        pieces = list(torch.split(x, big))
        outs = []
        for p in pieces:
            b = min(s for s in sizes if s >= len(p))
            outs.append(programs[b](_F.pad(p, (0, 0, 0, b - len(p))))[: len(p)])
        return torch.cat(outs)
    assert status(P08.check_buckets, by_plan) == "passed"

    def always_largest(programs, x):
        big = max(programs)
        return torch.cat([programs[big](torch.cat([p, p.new_zeros(big - len(p), p.shape[1])]))[: len(p)]
                          for p in torch.split(x, big)])

    def padding_kept(programs, x):
        sizes = sorted(programs)
        return torch.cat([programs[min(s for s in sizes if s >= len(p))](
            torch.cat([p, p.new_zeros(min(s for s in sizes if s >= len(p)) - len(p), p.shape[1])]))
            for p in torch.split(x, max(programs))])

    def pad_by_repeating(programs, x):                   # pads with copies of the last row: answers fine, calls fine
        sizes = sorted(programs)
        outs = []
        for p in torch.split(x, max(programs)):
            b = min(s for s in sizes if s >= len(p))
            outs.append(programs[b](torch.cat([p, p[-1:].repeat(b - len(p), 1)]))[: len(p)])
        return torch.cat(outs)
    assert status(P08.check_buckets, pad_by_repeating) == "passed"      # also correct: any padding is cut off
    wrongs = {
        "always the largest program": always_largest,
        "padding left on the answer": padding_kept,
        "no chunking (the model called directly)": lambda programs, x: programs[max(programs)](x),
    }
    for name, wrong in wrongs.items():
        assert status(P08.check_buckets, wrong) == "failed", name


# chapter 08, exercise 2: may the new version replace the old? -----------------------------------------------------

def test_ch08_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from dlopt_labs.deploy import package as P08

    def by_tuples(old, new):                             # compares interfaces as tuples, versions with map(int)
        vo, vn = [list(map(int, m["version"].split("."))) for m in (old, new)]
        out = [] if vn > vo else ["version must increase"]
        def iface(m, fixed_ok):
            return [(s["dtype"], tuple(s["shape"][1:])) for s in (m["inputs"], m["outputs"])]
        changed = iface(old, 0) != iface(new, 0) or any(
            o["shape"][0] != n["shape"][0] and n["shape"][0] != "batch"
            for o, n in ((old["inputs"], new["inputs"]), (old["outputs"], new["outputs"])))
        if changed and vn[0] <= vo[0]:
            out.append("interface changed without a new major version")
        return out
    assert status(P08.check_compatible, by_tuples) == "passed"

    def string_versions(old, new):
        r = [] if new["version"] > old["version"] else ["older"]
        if old["inputs"] != new["inputs"] or old["outputs"] != new["outputs"]:
            if new["version"].split(".")[0] <= old["version"].split(".")[0]: r.append("breaking")
        return r

    def any_shape_change_breaks(old, new):               # freeing a fixed batch is refused too
        r = by_tuples(old, new)
        if old["inputs"]["shape"] != new["inputs"]["shape"] and int(new["version"][0]) <= int(old["version"][0]):
            r.append("shape changed")
        return r

    def ignores_batch(old, new):
        o = {**old, "inputs": {**old["inputs"], "shape": ["batch"] + old["inputs"]["shape"][1:]},
             "outputs": {**old["outputs"], "shape": ["batch"] + old["outputs"]["shape"][1:]}}
        n = {**new, "inputs": {**new["inputs"], "shape": ["batch"] + new["inputs"]["shape"][1:]},
             "outputs": {**new["outputs"], "shape": ["batch"] + new["outputs"]["shape"][1:]}}
        return by_tuples(o, n)
    def major_minor_only(old, new):                     # a patch release refused
        r = by_tuples(old, new)
        if new["version"].split(".")[:2] == old["version"].split(".")[:2]: r.append("same major.minor")
        return r
    wrongs = {
        "patch releases refused": major_minor_only,
        "versions compared as strings": string_versions,
        "a freed batch counted as breaking": any_shape_change_breaks,
        "batch dimension ignored": ignores_batch,
        "only the version checked": lambda old, new: by_tuples({**old, "inputs": new["inputs"], "outputs": new["outputs"]}, new),
        "always safe": lambda old, new: [],
    }
    for name, wrong in wrongs.items():
        assert status(P08.check_compatible, wrong) == "failed", name


# chapter 20, exercises 1 and 2: CUSUM, the chi-square test on predicted classes -----------------------------------
from dlopt_labs.deploy import monitor as P20


def test_ch20_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def vectorised(x, target, k, h):                     # correct too: the running sum clipped at zero, in numpy
        s = 0.0
        for t, v in enumerate(np.asarray(x, dtype=float) - target - k):
            s = max(0.0, s + v)
            if s > h: return t
        return None
    assert status(P20.check_cusum, vectorised) == "passed"

    def one_based(x, target, k, h):
        t = vectorised(x, target, k, h)
        return None if t is None else t + 1

    def no_floor(x, target, k, h):                       # the sum may go negative: late shifts are found late
        s = 0.0
        for t, v in enumerate(x):
            s += v - target - k
            if s > h: return t
        return None

    def at_or_above(x, target, k, h):
        s = 0.0
        for t, v in enumerate(x):
            s = max(0.0, s + v - target - k)
            if s >= h: return t
        return None

    def slack_ignored(x, target, k, h): return vectorised(x, target, 0.0, h)
    def minus_one(x, target, k, h):
        t = vectorised(x, target, k, h)
        return -1 if t is None else t
    for name, wrong in dict(one_based=one_based, no_floor=no_floor, slack_ignored=slack_ignored,
                            minus_one=minus_one).items():
        assert status(P20.check_cusum, wrong) == "failed", name
    # >= instead of > differs only on exact equality, which the check's third case builds (4.5 - 0 - 0.5 = 4.0 = h)
    assert status(P20.check_cusum, at_or_above) == "failed"


def test_ch20_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    from scipy.stats import chi2, chi2_contingency

    def with_scipy_after_dropping(ref, live, n_classes):   # correct: scipy on the table without empty columns
        t = np.stack([np.bincount(ref.numpy(), minlength=n_classes), np.bincount(live.numpy(), minlength=n_classes)])
        r = chi2_contingency(t[:, t.sum(0) > 0], correction=False)
        return r.statistic, r.pvalue
    assert status(P20.check_class_shift, with_scipy_after_dropping) == "passed"

    def scipy_on_full_table(ref, live, n_classes):      # refused by scipy when a class is in neither window
        t = np.stack([np.bincount(ref.numpy(), minlength=n_classes), np.bincount(live.numpy(), minlength=n_classes)])
        r = chi2_contingency(t, correction=False)
        return r.statistic, r.pvalue

    def all_classes_in_dof(ref, live, n_classes):
        stat, _ = with_scipy_after_dropping(ref, live, n_classes)
        return stat, float(chi2.sf(stat, n_classes - 1))

    def g_test(ref, live, n_classes):
        t = np.stack([np.bincount(ref.numpy(), minlength=n_classes), np.bincount(live.numpy(), minlength=n_classes)])
        r = chi2_contingency(t[:, t.sum(0) > 0], correction=False, lambda_="log-likelihood")
        return r.statistic, r.pvalue

    def live_against_ref_shares(ref, live, n_classes):   # a goodness-of-fit test: the reference taken as exact
        rc, lc = np.bincount(ref.numpy(), minlength=n_classes), np.bincount(live.numpy(), minlength=n_classes)
        keep = rc > 0
        exp = rc[keep] / rc.sum() * lc.sum()
        stat = float(((lc[keep] - exp) ** 2 / exp).sum())
        return stat, float(chi2.sf(stat, keep.sum() - 1))
    for name, wrong in dict(scipy_on_full_table=scipy_on_full_table, all_classes_in_dof=all_classes_in_dof,
                            g_test=g_test, live_against_ref_shares=live_against_ref_shares).items():
        assert status(P20.check_class_shift, wrong) == "failed", name


# chapter 07, exercises 1 and 2: transplanting a backbone, a registry for notebooks ---------------------------------
from dlopt_labs.deploy import design as P07


def test_ch07_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def via_load_state_dict(model, trained, prefix):      # correct too: check, then load_state_dict(strict=False)
        mine, theirs = model.state_dict(), trained.state_dict()
        keys = sorted(k for k in theirs if k.startswith(prefix))
        for k in keys:
            if k not in mine or mine[k].shape != theirs[k].shape:
                raise ValueError(f"cannot copy {k}")
        model.load_state_dict({k: theirs[k] for k in keys}, strict=False)
        return keys
    assert status(P07.check_transplant, via_load_state_dict) == "passed"

    def copies_everything(model, trained, prefix):        # the head too
        model.load_state_dict(trained.state_dict(), strict=False)
        return sorted(k for k in trained.state_dict() if k.startswith(prefix))

    def checks_while_copying(model, trained, prefix):    # a refused transplant leaves a half-copied model
        mine, keys = model.state_dict(), []
        for k, v in sorted(trained.state_dict().items()):
            if not k.startswith(prefix): continue
            if k not in mine or mine[k].shape != v.shape: raise ValueError(f"cannot copy {k}")
            with torch.no_grad(): mine[k].copy_(v)
            keys.append(k)
        return keys

    def no_checks(model, trained, prefix):
        mine = model.state_dict()
        keys = sorted(k for k in trained.state_dict() if k.startswith(prefix))
        for k in keys:
            if k in mine and mine[k].shape == trained.state_dict()[k].shape:
                with torch.no_grad(): mine[k].copy_(trained.state_dict()[k])
        return keys

    def unsorted_keys(model, trained, prefix):
        return list(reversed(via_load_state_dict(model, trained, prefix)))
    for name, wrong in dict(copies_everything=copies_everything, checks_while_copying=checks_while_copying,
                            no_checks=no_checks, unsorted_keys=unsorted_keys).items():
        assert status(P07.check_transplant, wrong) == "failed", name


def test_ch07_exercise2_accepts_a_different_correct_solution_and_refuses_the_chapters_registry_and_mistakes():
    class ByQualifiedName:                                # correct too: keyed on the qualified name
        def __init__(self): self.objs, self.where = {}, {}
        def register(self, name, kind):
            def add(obj):
                w = f"{obj.__module__}:{obj.__qualname__}"
                if self.where.get(name, w) != w: raise ValueError(f"{name} is taken by {self.where[name]}")
                self.objs[name], self.where[name] = obj, w
                return obj
            return add
        def names(self): return sorted(self.objs)
        def get(self, name): return self.objs[name]
    assert status(P07.check_rerun_registry, ByQualifiedName) == "passed"

    class Chapters(P07.Registry):                         # the chapter's own registry refuses the re-run cell
        def get(self, name): return self._items[name]["obj"]
    assert status(P07.check_rerun_registry, Chapters) == "failed"

    class AnyFromMain(ByQualifiedName):                   # any notebook object may replace any other
        def register(self, name, kind):
            def add(obj):
                if name in self.objs and obj.__module__ != "__main__": raise ValueError(f"{name} is taken")
                self.objs[name] = obj
                return obj
            return add

    class KeepsFirst(ByQualifiedName):                    # the re-run cell is accepted but the old class kept
        def register(self, name, kind):
            def add(obj):
                if name not in self.objs: return super(KeepsFirst, self).register(name, kind)(obj)
                if self.where[name] != f"{obj.__module__}:{obj.__qualname__}": raise ValueError(f"{name} is taken")
                return obj
            return add

    class ByClassName(ByQualifiedName):                   # same class name from another module passes
        def register(self, name, kind):
            def add(obj):
                if name in self.objs and self.objs[name].__name__ != obj.__name__: raise ValueError(f"{name} taken")
                self.objs[name] = obj
                return obj
            return add
    for name, wrong in dict(AnyFromMain=AnyFromMain, KeepsFirst=KeepsFirst, ByClassName=ByClassName).items():
        assert status(P07.check_rerun_registry, wrong) == "failed", name


# chapter 27, exercises 1 and 2: ring all-reduce, BatchNorm statistics merged across ranks -----------------------------
from dlopt_labs.deploy import ddp as P27


def _ring(tensors, direction=1, gather=True):
    "Ring all-reduce with the chunks kept in a dict per rank (another correct layout)."
    k = len(tensors)
    held = [dict(enumerate(c.clone() for c in t.tensor_split(k))) for t in tensors]
    log, step = [], 0
    for s in range(k - 1):
        moving = [(r, (r - s) % k, held[r][(r - s) % k].clone()) for r in range(k)]
        for r, c, data in moving:
            to = (r + direction) % k
            held[to][c] = held[to][c] + data
            log.append((step, r, to, c, data))
        step += 1
    if gather:
        for s in range(k - 1):
            moving = [(r, (r + 1 - s) % k, held[r][(r + 1 - s) % k].clone()) for r in range(k)]
            for r, c, data in moving:
                held[(r + 1) % k][c] = data
                log.append((step, r, (r + 1) % k, c, data))
            step += 1
    return [torch.cat([h[c] for c in range(k)]) for h in held], log


def test_ch27_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(P27.check_ring_allreduce, _ring) == "passed"

    def summed_with_invented_log(tensors):                 # the sum computed directly, a log of chunk sizes only
        k, total = len(tensors), torch.stack(tensors).sum(0)
        chunks = total.tensor_split(k)
        log = [(s, r, (r + 1) % k, r, chunks[r]) for s in range(2 * (k - 1)) for r in range(k)]
        return [total.clone() for _ in range(k)], log

    def everyone_to_everyone(tensors):
        k, total = len(tensors), torch.stack(tensors).sum(0)
        log = [(0, r, q, 0, tensors[r].tensor_split(k)[0]) for r in range(k) for q in range(k) if q != r]
        return [total.clone() for _ in range(k)], log

    def in_place(tensors):
        results, log = _ring(tensors)
        for t, r in zip(tensors, results): t.copy_(r)
        return tensors, log

    def reduce_scatter_only(tensors):
        return _ring(tensors, gather=False)

    def left_neighbour(tensors):
        return _ring(tensors, direction=-1)
    for name, wrong in dict(summed_with_invented_log=summed_with_invented_log, everyone_to_everyone=everyone_to_everyone,
                            in_place=in_place, reduce_scatter_only=reduce_scatter_only,
                            left_neighbour=left_neighbour).items():
        assert status(P27.check_ring_allreduce, wrong) == "failed", name


def test_ch27_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def all_at_once(parts):                                # correct too: the law of total variance, in one pass
        parts = [(c, m, s) for c, m, s in parts if c]
        n = sum(c for c, _, _ in parts)
        mean = sum(c * m for c, m, _ in parts) / n
        return mean, sum(s + c * (m - mean) ** 2 for c, m, s in parts) / n
    assert status(P27.check_merge_stats, all_at_once) == "passed"

    def sums_of_squares(parts):                            # right in exact arithmetic, loses digits far from 0
        parts = [(c, m, s) for c, m, s in parts if c]
        n = sum(c for c, _, _ in parts)
        total, squares = sum(c * m for c, m, _ in parts), sum(s + c * m**2 for c, m, s in parts)
        return total / n, squares / n - (total / n) ** 2

    def mean_of_variances(parts):                          # what each rank's own BatchNorm would average to
        parts = [(c, m, s) for c, m, s in parts if c]
        n = sum(c for c, _, _ in parts)
        return sum(c * m for c, m, _ in parts) / n, sum(s for _, _, s in parts) / n

    def unweighted(parts):                                 # every rank counts the same, whatever its rows
        parts = [(c, m, s) for c, m, s in parts if c]
        mean = sum(m for _, m, _ in parts) / len(parts)
        n = sum(c for c, _, _ in parts)
        return mean, sum(s + c * (m - mean) ** 2 for c, m, s in parts) / n

    def unbiased(parts):
        mean, var = all_at_once(parts)
        n = sum(c for c, _, _ in parts)
        return mean, var * n / (n - 1)
    for name, wrong in dict(sums_of_squares=sums_of_squares, mean_of_variances=mean_of_variances,
                            unweighted=unweighted, unbiased=unbiased).items():
        assert status(P27.check_merge_stats, wrong) == "failed", name


# chapter 13, exercises 1 and 2: a Laplace-mechanism mean, secure aggregation by masks that cancel -------------------
from dlopt_labs.debug import privacy as P13


def _laplace_mean(values, lo, hi, epsilon, generator):    # by the inverse CDF of one uniform draw
    if epsilon <= 0 or lo >= hi:
        raise ValueError("need epsilon > 0 and lo < hi")
    u = float(torch.rand(1, dtype=torch.float64, generator=generator)) - 0.5
    scale = (hi - lo) / (len(values) * epsilon)
    return float(values.clamp(lo, hi).mean()) - scale * math.copysign(1.0, u) * math.log(1 - 2 * abs(u))


def test_ch13_exercise1_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    assert status(P13.check_dp_mean, _laplace_mean) == "passed"

    def gaussian(values, lo, hi, epsilon, generator):      # the right spread, the wrong (light) tails
        if epsilon <= 0 or lo >= hi: raise ValueError("bad")
        scale = (hi - lo) / (len(values) * epsilon)
        return float(values.clamp(lo, hi).mean()) + scale * math.sqrt(2) * float(torch.randn(1, generator=generator))

    def no_clipping(values, lo, hi, epsilon, generator):
        return _laplace_mean(values, -1e9, 1e9, epsilon, generator) - 0 if False else (
            float(values.mean()) + _laplace_mean(torch.zeros(len(values), dtype=torch.float64), lo, hi, epsilon, generator))

    def range_ignored(values, lo, hi, epsilon, generator):  # sensitivity 1 / n whatever the range
        return _laplace_mean(values.clamp(lo, hi), 0.0, 1.0, epsilon, generator) + 0 * lo

    def global_randomness(values, lo, hi, epsilon, generator):
        return _laplace_mean(values, lo, hi, epsilon, None)

    def no_refusal(values, lo, hi, epsilon, generator):
        return _laplace_mean(values, lo, hi, max(epsilon, 1e-3), generator) if lo < hi else 0.0
    for name, wrong in dict(gaussian=gaussian, no_clipping=no_clipping, range_ignored=range_ignored,
                            global_randomness=global_randomness, no_refusal=no_refusal).items():
        assert status(P13.check_dp_mean, wrong) == "failed", name


def test_ch13_exercise2_accepts_a_different_correct_solution_and_refuses_likely_mistakes():
    def last_client_balances(updates, seed):               # correct too: the masks sum to zero by construction
        g = torch.Generator().manual_seed(seed)
        masks = [torch.randn(updates[0].shape, dtype=updates[0].dtype, generator=g) * 50 for _ in updates[:-1]]
        masks.append(-sum(masks))
        return [u + m for u, m in zip(updates, masks)]
    assert status(P13.check_secure_aggregation, last_client_balances) == "passed"

    def small_masks(updates, seed):
        out = last_client_balances(updates, seed)
        return [u + (o - u) * 1e-4 for u, o in zip(updates, out)]

    def not_cancelling(updates, seed):
        g = torch.Generator().manual_seed(seed)
        return [u + torch.randn(u.shape, dtype=u.dtype, generator=g) * 50 for u in updates]

    def in_place(updates, seed):
        for u, o in zip(updates, last_client_balances(updates, seed)): u.copy_(o)
        return updates

    def unseeded(updates, seed):
        return last_client_balances(updates, int(torch.randint(0, 10**6, (1,))))
    for name, wrong in dict(small_masks=small_masks, not_cancelling=not_cancelling, in_place=in_place,
                            unseeded=unseeded).items():
        assert status(P13.check_secure_aggregation, wrong) == "failed", name
