"""SVM training: the liblinear mapping, the releases' hard-negative mining, dedup, NPZ files."""
import json

import numpy as np
import pytest
from scipy.optimize import minimize

import sppcli.detector.svm as svm_module
from sppcli.config import SvmParams
from sppcli.detector.svm import (
    NoNegativesError,
    NoPositivesError,
    SvmModel,
    dedup_negatives,
    feature_scale,
    fit_linear_svm,
    load_svms,
    save_svms,
    score,
    svm_objective,
    train_class_svm,
    unique_windows,
)

EXACT = dict(tol=1e-8, max_iter=200_000)  # solve each liblinear problem to near-optimality


def _axis(dim):
    axis = np.zeros(dim)
    axis[0] = 1.0
    return axis


def test_separable_data_is_separated_with_release_defaults():
    # Features of mean norm ~20, as after feature_scale; default C = 0.001 and bias 10.
    rng = np.random.default_rng(0)
    dim = 20
    positives = 14 * _axis(dim) + 3 * rng.standard_normal((60, dim))
    negatives = -14 * _axis(dim) + 3 * rng.standard_normal((400, dim))
    model = train_class_svm(positives, [negatives])
    assert model.w.dtype == np.float32 and model.w.shape == (dim,)
    assert score(positives, model).min() > 0 > score(negatives, model).max()
    held_out = 14 * _axis(dim) + 3 * rng.standard_normal((50, dim))
    assert (score(held_out, model) > 0).all()


def test_sklearn_mapping_solves_the_liblinear_problem_of_the_releases():
    # Reference: the dual of  0.5||w~||^2 + sum_i U_i max(0, 1 - y_i w~.x~_i)  with
    # x~ = [x, bias], U_i = C * 2 for positives and C for negatives, solved by L-BFGS-B.
    # Then w = w~[:-1] and b = bias * w~[-1]; the bias weight is regularised.
    rng = np.random.default_rng(1)
    positives = rng.standard_normal((25, 6)) + 1.0
    negatives = rng.standard_normal((60, 6)) - 0.5
    params = SvmParams(C=0.5)
    w, b = fit_linear_svm(positives, negatives, params, **EXACT)

    features = np.concatenate([positives, negatives])
    labels = np.r_[np.ones(25), -np.ones(60)]
    signed = labels[:, None] * np.c_[features, np.full(len(features), params.bias_value)]
    gram = signed @ signed.T
    upper = np.r_[np.full(25, params.C * params.pos_loss_weight), np.full(60, params.C)]
    dual = minimize(
        lambda a: (0.5 * a @ gram @ a - a.sum(), gram @ a - 1.0),
        np.zeros(len(labels)),
        jac=True,
        method="L-BFGS-B",
        bounds=list(zip(np.zeros(len(labels)), upper)),
        options=dict(ftol=1e-15, gtol=1e-12, maxiter=100_000),
    )
    w_tilde = signed.T @ dual.x
    np.testing.assert_allclose(w, w_tilde[:-1], atol=1e-4)
    assert b == pytest.approx(params.bias_value * w_tilde[-1], abs=1e-4)
    primal = svm_objective(w, b, positives, negatives, params)["objective"]
    assert primal == pytest.approx(-dual.fun, rel=1e-5)  # strong duality: both are optimal


def test_reported_objective_is_the_release_formula_on_the_cache():
    # With one batch, the only retrain uses exactly (positives, that batch).
    rng = np.random.default_rng(2)
    positives = rng.standard_normal((30, 5)) + 1.5
    negatives = rng.standard_normal((80, 5)) - 1.0
    params = SvmParams(C=0.1)
    model = train_class_svm(positives, [negatives], params, **EXACT)
    (entry,) = model.history
    w = model.w.astype(np.float64)
    z_pos, z_neg = positives @ w + model.b, negatives @ w + model.b
    pos_loss = 0.1 * 2 * np.maximum(0, 1 - z_pos).sum()
    neg_loss = 0.1 * np.maximum(0, 1 + z_neg).sum()
    reg = 0.5 * w @ w + 0.5 * (model.b / 10) ** 2
    assert entry["pos_loss"] == pytest.approx(pos_loss, rel=1e-5)
    assert entry["neg_loss"] == pytest.approx(neg_loss, rel=1e-5)
    assert entry["reg"] == pytest.approx(reg, rel=1e-5)
    assert entry["objective"] == pytest.approx(pos_loss + neg_loss + reg, rel=1e-5)
    assert entry["n_cache"] == 80 and entry["n_hard"] == 80 and entry["batch_index"] == 0
    assert entry["n_evicted"] == int((z_neg < -1.2).sum())
    json.dumps(model.history)  # plain numbers, ready for a manifest


def test_mining_is_sandwiched_around_the_full_problem_optimum():
    # With exact solves: F_cache(w_mined) <= F_full(w*) <= F_full(w_mined), where w* solves the
    # problem on all negatives (the cache is a subset, so its optimum cannot cost more). Mining
    # should reach the full optimum closely: within 2% here.
    rng = np.random.default_rng(3)
    dim = 30
    positives = 8 * _axis(dim) + 4 * rng.standard_normal((50, dim))
    batches = [-6 * _axis(dim) + 4 * rng.standard_normal((150, dim)) for _ in range(20)]
    all_negatives = np.concatenate(batches)
    params = SvmParams(C=0.01, retrain_limit=100)
    lines = []
    mined = train_class_svm(positives, iter(batches), params, log=lines.append, **EXACT)
    w_full, b_full = fit_linear_svm(positives, all_negatives, params, **EXACT)
    optimum = svm_objective(w_full, b_full, positives, all_negatives, params)["objective"]
    mined_on_all = svm_objective(mined.w, mined.b, positives, all_negatives, params)["objective"]
    on_cache = mined.history[-1]["objective"]
    assert on_cache <= optimum * (1 + 1e-6)
    assert optimum <= mined_on_all * (1 + 1e-6)
    assert mined_on_all <= 1.02 * optimum
    assert len(mined.history) >= 3 and len(lines) == len(mined.history)
    assert "obj" in lines[0] and "(reg)" in lines[0]
    # Far fewer negatives were ever trained on than the 3,000 in the stream.
    assert max(entry["n_cache"] for entry in mined.history) < 600


def test_mining_bookkeeping_with_a_scripted_solver(monkeypatch):
    # Replace the solver by one that always returns w = (1, 0), b = 0, so a negative's score is
    # its first feature; the second feature is an id. Each call records what it trained on.
    trained_on = []

    def scripted_solver(positives, negatives, params, tol, max_iter):
        trained_on.append(sorted(int(i) for i in negatives[:, 1]))
        return np.array([1.0, 0.0], dtype=np.float32), 0.0

    monkeypatch.setattr(svm_module, "fit_linear_svm", scripted_solver)

    def batch(first_id, scores):
        return np.array([[s, first_id + k] for k, s in enumerate(scores)])

    batches = [
        # first image: all six enter unscored; after the retrain the three < -1.2 are evicted
        batch(0, [-5.0, -1.3, -1.1, -0.5, 0.2, -1.25]),
        # > -1.0001 enters: ids 11, 13, 14 (3 added: not more than the limit 3, no retrain)
        batch(10, [-1.00011, -1.00009, -3.0, 0.5, -0.9]),
        # id 20 enters: 4 added > 3 -> retrain on 3 + 3 + 1 = 7 negatives
        batch(20, [-0.8]),
        # nothing hard; the last image still triggers a retrain
        batch(30, [-2.0, -1.15]),
    ]
    positives = np.array([[2.0, -1.0]])
    model = train_class_svm(positives, iter(batches), SvmParams(retrain_limit=3))
    survivors_of_first = [2, 3, 4]
    assert trained_on == [
        [0, 1, 2, 3, 4, 5],
        survivors_of_first + [11, 13, 14, 20],
        survivors_of_first + [11, 13, 14, 20],
    ]
    assert [(e["batch_index"], e["n_hard"], e["n_cache"], e["n_evicted"]) for e in model.history] == [
        (0, 6, 6, 3),
        (2, 4, 7, 0),
        (3, 0, 7, 0),
    ]
    # A cache emptied by eviction is not retrained on at the end (liblinear needs negatives).
    trained_on.clear()
    emptied = train_class_svm(positives, [batch(0, [-5.0, -2.0]), batch(10, [-3.0])], SvmParams())
    assert trained_on == [[0, 1]] and len(emptied.history) == 1
    # Margin support vectors as the releases count them, z > -1 - eps: (-0.5, 0.2), then
    # (-0.5, 0.2, 0.5, -0.9, -0.8); -1.1 and -1.00009 are below the margin.
    assert model.history[0]["n_neg_sv"] == 2 and model.history[1]["n_neg_sv"] == 5


def test_easy_negatives_are_never_mined_with_the_real_solver():
    # Positives at x0 = 6 and five first-image negatives at x0 = 0 give a first model close to
    # score = x0 / 3 - 1. Far negatives (x0 = -40, score ~ -14) are evicted after the first
    # image and never enter again; one near negative per later image (x0 = 2, score ~ -1/3)
    # always enters. 5 added is not more than the limit 5, so the next retrain is the last.
    rng = np.random.default_rng(4)
    dim = 8
    positives = 6 * _axis(dim) + 0.3 * rng.standard_normal((60, dim))

    def image(n_far, n_near, x0_near):
        far = -40 * _axis(dim) + rng.standard_normal((n_far, dim))
        near = x0_near * _axis(dim) + 0.05 * rng.standard_normal((n_near, dim))
        return np.concatenate([far, near])

    batches = [image(30, 5, 0.0)] + [image(30, 1, 2.0) for _ in range(5)]
    model = train_class_svm(positives, batches, SvmParams(C=1.0, retrain_limit=5))
    first, last = model.history
    assert (first["batch_index"], first["n_hard"], first["n_cache"], first["n_evicted"]) == (0, 35, 35, 30)
    assert (last["batch_index"], last["n_hard"], last["n_cache"]) == (5, 5, 10)


def test_before_the_first_training_every_negative_is_hard():
    # An empty first batch trains nothing; the all-zero model then scores every negative 0
    # (> -1.0001), so everything is added until the limit or the end.
    rng = np.random.default_rng(5)
    positives = rng.standard_normal((10, 4)) + 3
    batches = [np.zeros((0, 4)), rng.standard_normal((4, 4)) - 30, rng.standard_normal((3, 4)) - 30]
    model = train_class_svm(positives, batches, SvmParams(C=0.1, retrain_limit=100))
    assert [(e["batch_index"], e["n_hard"], e["n_cache"]) for e in model.history] == [(2, 7, 7)]


def test_missing_examples_raise_specific_errors():
    with pytest.raises(NoPositivesError):
        train_class_svm(np.zeros((0, 4)), [np.ones((3, 4))])
    with pytest.raises(NoNegativesError):
        train_class_svm(np.ones((2, 4)), [])
    with pytest.raises(NoNegativesError):
        train_class_svm(np.ones((2, 4)), [np.zeros((0, 4)), np.zeros(0)])
    with pytest.raises(ValueError, match="shape"):
        train_class_svm(np.ones((2, 4)), [np.ones((3, 5))])


def test_feature_scale():
    assert feature_scale(5.0) == 4.0
    assert feature_scale(40.0, target_norm=20.0) == 0.5
    with pytest.raises(ValueError):
        feature_scale(0.0)


def _slow_dedup(boxes, threshold):
    kept = []
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        drop = False
        for j in kept:
            a1, b1, a2, b2 = boxes[j].tolist()
            iw = max(0.0, min(x2, a2) - max(x1, a1))
            ih = max(0.0, min(y2, b2) - max(y1, b1))
            union = (x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - iw * ih
            if iw * ih / union > threshold:
                drop = True
                break
        if not drop:
            kept.append(i)
    return kept


def test_dedup_negatives_greedy_in_proposal_order():
    boxes = np.array(
        [
            [0, 0, 10, 10],
            [0, 0, 10, 11],  # IoU 100/110 = 0.91 with box 0 -> dropped
            [0, 0, 10, 15],  # IoU 100/150 = 0.67 with box 0, 110/150 = 0.73 with dropped box 1 -> kept
            [30, 30, 40, 40],
            [0, 0, 10, 12],  # IoU 100/120 = 0.83 with box 0 -> dropped
        ],
        dtype=np.float64,
    )
    np.testing.assert_array_equal(dedup_negatives(boxes), [0, 2, 3])
    # The rule is "more than": IoU exactly 0.5 (100/200) survives a 0.5 threshold.
    np.testing.assert_array_equal(dedup_negatives(np.array([[0, 0, 10, 10], [0, 0, 10, 20]]), 0.5), [0, 1])
    # Order matters: listing the big box first keeps it and drops the small one.
    np.testing.assert_array_equal(dedup_negatives(boxes[[1, 0]]), [0])
    assert dedup_negatives(np.zeros((0, 4))).shape == (0,)

    rng = np.random.default_rng(6)
    for _ in range(5):
        xy = rng.uniform(0, 50, size=(80, 2))
        random_boxes = np.concatenate([xy, xy + rng.uniform(5, 40, size=(80, 2))], axis=1)
        np.testing.assert_array_equal(dedup_negatives(random_boxes, 0.5), _slow_dedup(random_boxes, 0.5))


def test_unique_windows_keeps_first_of_identical_feature_windows():
    cells = np.array([[0, 0, 3, 3], [0, 0, 3, 3], [1, 0, 3, 3], [0, 0, 3, 3], [1, 0, 3, 3]])
    scales = np.array([0, 1, 0, 0, 0])
    np.testing.assert_array_equal(unique_windows(cells, scales), [0, 1, 2])


def test_npz_round_trip_without_pickles(tmp_path):
    rng = np.random.default_rng(7)
    positives = rng.standard_normal((20, 6)) + 2
    model = train_class_svm(positives, [rng.standard_normal((50, 6)) - 2], SvmParams(C=0.1))
    other = SvmModel(w=rng.standard_normal(6).astype(np.float32), b=-0.25)
    path = save_svms(tmp_path / "svms.npz", {"cat": model, "dog": other}, 0.125, ["cat", "cow", "dog"], SvmParams())
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert data["W"].shape == (3, 6) and not data["W"][1].any()
        assert json.loads(str(data["params"]))["C"] == 0.001
    models, scale, names = load_svms(path)
    assert names == ["cat", "cow", "dog"] and scale == 0.125 and models["cow"] is None
    features = rng.standard_normal((10, 6))
    np.testing.assert_array_equal(score(features, models["cat"]), score(features, model))
    np.testing.assert_array_equal(score(features, models["dog"]), score(features, other))
    assert models["cat"].b == model.b
    assert models["cat"].history == model.history
    assert [p.name for p in tmp_path.iterdir()] == ["svms.npz"]
    with pytest.raises(ValueError):
        save_svms(tmp_path / "none.npz", {"cat": None}, 1.0, ["cat"])


def test_float16_cache_changes_nothing_when_features_are_float16_exact():
    # Features that float16 holds exactly (multiples of 1/8 in a small range): the cache dtype can
    # then change no decision and no retrain, so the models must be identical.
    rng = np.random.default_rng(11)
    positives = np.round(8 * (rng.standard_normal((20, 6)) + 1.5)) / 8
    batches = [np.round(8 * (rng.standard_normal((40, 6)) - 1.0)) / 8 for _ in range(6)]
    wide = train_class_svm(positives, iter(batches), SvmParams(C=0.1, retrain_limit=30))
    half = train_class_svm(positives, iter(batches), SvmParams(C=0.1, retrain_limit=30, cache_dtype="float16"))
    np.testing.assert_array_equal(wide.w, half.w)
    assert wide.b == half.b and [h["n_cache"] for h in wide.history] == [h["n_cache"] for h in half.history]
    # and with arbitrary features the rounding moves the model only a little
    noisy = [b + 0.01 * rng.standard_normal(b.shape) for b in batches]
    wide = train_class_svm(positives, iter(noisy), SvmParams(C=0.1, retrain_limit=30))
    half = train_class_svm(positives, iter(noisy), SvmParams(C=0.1, retrain_limit=30, cache_dtype="float16"))
    assert np.abs(wide.w - half.w).max() < 1e-2 * np.abs(wide.w).max()


def test_max_cache_keeps_the_hardest_negatives_and_is_a_no_op_when_not_reached():
    rng = np.random.default_rng(12)
    positives = rng.standard_normal((20, 5)) + 1.0
    batches = [rng.standard_normal((60, 5)) for _ in range(20)]  # inseparable: the cache keeps growing
    free = train_class_svm(positives, iter(batches), SvmParams(C=0.1, retrain_limit=50))
    roomy = train_class_svm(positives, iter(batches), SvmParams(C=0.1, retrain_limit=50, max_cache=10**6))
    np.testing.assert_array_equal(free.w, roomy.w)
    capped = train_class_svm(positives, iter(batches), SvmParams(C=0.1, retrain_limit=50, max_cache=40))
    assert max(h["n_cache"] for h in capped.history) <= 40 + 50 + 60  # the bound plus one interval's additions
    assert any(h.get("n_capped") for h in capped.history)
    assert max(h["n_cache"] for h in free.history) > max(h["n_cache"] for h in capped.history)
