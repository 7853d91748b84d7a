"""kNN overlap and class consistency against hand-built cases, chance level and brute force."""
import numpy as np
import pytest

from fgc_jax import alignment


def circle(degrees):
    """2-D unit vectors at the given angles: cosine similarity falls with the angle between."""
    t = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def brute_force_overlap(a, b, k):
    """Full similarity matrices and argsort: no chunking, no argpartition."""
    def knn(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]
    na, nb = knn(a), knn(b)
    return np.mean([len(set(na[i]) & set(nb[i])) / k for i in range(len(a))])


def test_identical_spaces_overlap_one():
    x = np.random.default_rng(0).normal(size=(300, 8))
    for k in (1, 5, 50):
        assert alignment.knn_overlap(x, x, k) == 1.0
    # Cosine similarity ignores each row's length.
    scale = np.random.default_rng(1).uniform(0.1, 10, size=(300, 1))
    assert alignment.knn_overlap(x, x * scale, 10) == 1.0


def test_permuted_space_is_at_chance():
    rng = np.random.default_rng(0)
    n, k = 1000, 10
    a = rng.normal(size=(n, 16))
    b = a[rng.permutation(n)]
    chance = k / (n - 1)
    # Per example the overlap count is hypergeometric with mean k^2/(n-1) = 0.1 and variance
    # below 0.1, so the mean over 1000 examples has sd below 0.001 (as overlap / k).
    assert abs(alignment.knn_overlap(a, b, k) - chance) < 0.005
    assert alignment.chance_overlap(n, k) == pytest.approx(chance)


def test_hand_built_case():
    # a: clusters {0,1,2} at 0/10/30 deg and {3,4,5} at 100/110/130 deg.
    # b: the same but points 4 and 5 swap places (130 and 110 deg).
    a = circle([0, 10, 30, 100, 110, 130])
    b = circle([0, 10, 30, 100, 130, 110])
    # k=1: a's NN 1,0,1,4,3,4; b's NN 1,0,1,5,5,3 -> examples 0,1,2 agree -> 3/6.
    assert alignment.knn_overlap(a, b, 1) == pytest.approx(0.5)
    # k=2: every example's two neighbours are the rest of its cluster in both spaces.
    assert alignment.knn_overlap(a, b, 2) == pytest.approx(1.0)
    np.testing.assert_array_equal(alignment.knn_indices(a, 1)[:, 0], [1, 0, 1, 4, 3, 4])

    labels = np.array([0, 0, 1, 1, 1, 1])
    # k=1: example 2's neighbour (1) has another label, the other five agree -> 5/6.
    assert alignment.class_consistency(a, labels, 1) == pytest.approx(5 / 6)
    # k=2: examples 0,1 -> 1/2 each, example 2 -> 0, examples 3,4,5 -> 1 -> 4/6.
    assert alignment.class_consistency(a, labels, 2) == pytest.approx(4 / 6)


def test_chunked_equals_brute_force():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(137, 6))
    b = a + 0.7 * rng.normal(size=a.shape)  # partially aligned
    for k in (3, 10):
        expected = brute_force_overlap(a, b, k)
        assert 0.1 < expected < 0.95
        assert alignment.knn_overlap(a, b, k, chunk=16) == pytest.approx(expected)
        assert alignment.knn_overlap(a, b, k) == pytest.approx(expected)


def test_alignment_report_shapes_and_errors():
    rng = np.random.default_rng(4)
    feats = [rng.normal(size=(40, 4)), rng.normal(size=(40, 8))]
    report = alignment.alignment_report(feats, feats, rng.integers(0, 3, 40), ks=(5, 10, 50),
                                        fgc_blocks=(1,))
    assert report["ks"] == [5, 10]  # 50 > N - 1 is skipped
    assert [b["fgc"] for b in report["blocks"]] == [False, True]
    assert all(b["overlap"] == {"5": 1.0, "10": 1.0} for b in report["blocks"])
    with pytest.raises(ValueError, match="k=40"):
        alignment.knn_overlap(feats[0], feats[0], 40)
    with pytest.raises(ValueError, match="must match"):
        alignment.knn_overlap(feats[0], feats[0][:10], 3)
