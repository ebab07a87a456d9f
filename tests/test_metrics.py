"""Tests for raysys.metrics.

The references below re-derive the platonic-rep definitions independently (explicit loops and
sets for kNN, an explicit centering matrix H and the literal Song et al. eq. 5 for HSIC,
sklearn's CCA for SVCCA, brute-force ranking for retrieval) so that the vectorised module is
checked against the maths rather than against itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from raysys import metrics as M

# Alignment metrics under a common (a, b) -> float signature, small k/dim for small N.
ALIGNMENT: dict[str, Callable[[object, object], float]] = {
    "mutual_knn": lambda a, b: M.mutual_knn(a, b, k=5),
    "cycle_knn": lambda a, b: M.cycle_knn(a, b, k=5),
    "cka_linear": lambda a, b: M.cka(a, b, kernel="linear"),
    # sigma = 1 (platonic-rep's default): with much smaller sigma the RBF Gram matrices of any
    # unit vectors approach the identity and biased RBF CKA is high even for unrelated inputs.
    "cka_rbf": lambda a, b: M.cka(a, b, kernel="rbf", sigma=1.0),
    "unbiased_cka_linear": lambda a, b: M.unbiased_cka(a, b),
    "unbiased_cka_rbf": lambda a, b: M.cka(a, b, kernel="rbf", sigma=1.0, unbiased=True),
    "cknna": lambda a, b: M.cknna(a, b, k=5),
    "svcca": lambda a, b: M.svcca(a, b, dim=6),
}

# CKA-type values carry platonic-rep's +1e-6 denominator guard, so identical inputs give
# 1 - O(1e-6 / HSIC) rather than exactly 1.
IDENTITY_TOL = 1e-3


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _correlated(seed: int = 0, n: int = 60, da: int = 12, db: int = 20):
    """Two related representations of the same n samples, so metric values are non-trivial."""
    rng = _rng(seed)
    a = rng.standard_normal((n, da))
    b = a @ rng.standard_normal((da, db)) + 0.7 * rng.standard_normal((n, db))
    return a, b


def _clustered(seed: int = 0, clusters: int = 12, size: int = 6, d: int = 16) -> np.ndarray:
    """Tight, well separated clusters of `size` points: with k = size - 1 every point's kNN
    is exactly its cluster, so kNN relations are symmetric (needed for cycle_knn(a, a) == 1,
    which does not hold in general because kNN is not a symmetric relation)."""
    rng = _rng(seed)
    centres = rng.standard_normal((clusters, d))
    pts = np.repeat(centres, size, axis=0) + 0.01 * rng.standard_normal((clusters * size, d))
    return pts[rng.permutation(len(pts))]


# --------------------------------------------------------------------------- references


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_neighbour_sets(x, k: int) -> list[set[int]]:
    x = _unit(x)
    n = len(x)
    out = []
    for i in range(n):
        ranked = sorted(((float(x[i] @ x[j]), j) for j in range(n) if j != i), reverse=True)
        out.append({j for _, j in ranked[:k]})
    return out


def ref_mutual_knn(a, b, k: int) -> float:
    na, nb = ref_neighbour_sets(a, k), ref_neighbour_sets(b, k)
    return float(np.mean([len(sa & sb) / k for sa, sb in zip(na, nb, strict=True)]))


def ref_cycle_knn(a, b, k: int) -> float:
    na, nb = ref_neighbour_sets(a, k), ref_neighbour_sets(b, k)
    return float(np.mean([any(i in na[j] for j in nb[i]) for i in range(len(na))]))


def ref_kernel(x, kernel: str, sigma: float = 1.0) -> np.ndarray:
    x = _unit(x)
    if kernel == "linear":
        return x @ x.T
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-sq / (2 * sigma**2))


def ref_hsic_biased(k_mat: np.ndarray, l_mat: np.ndarray) -> float:
    n = len(k_mat)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k_mat @ h @ l_mat @ h))


def ref_hsic_unbiased(k_mat: np.ndarray, l_mat: np.ndarray) -> float:
    """Song et al. (2012) eq. 5, written with an explicit ones vector."""
    n = len(k_mat)
    kt, lt = k_mat.copy(), l_mat.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    value = (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    )
    return float(value / (n * (n - 3)))


def ref_cka(a, b, kernel: str, sigma: float = 1.0, unbiased: bool = False) -> float:
    k_mat, l_mat = ref_kernel(a, kernel, sigma), ref_kernel(b, kernel, sigma)
    hsic = ref_hsic_unbiased if unbiased else ref_hsic_biased
    return hsic(k_mat, l_mat) / (np.sqrt(hsic(k_mat, k_mat) * hsic(l_mat, l_mat)) + 1e-6)


def ref_cknna(a, b, k: int) -> float:
    k_mat, l_mat = ref_kernel(a, "linear"), ref_kernel(b, "linear")
    na, nb = ref_neighbour_sets(a, k), ref_neighbour_sets(b, k)
    n = len(k_mat)

    def mask(sets_x, sets_y) -> np.ndarray:
        return np.array([[float(j in sets_x[i] and j in sets_y[i]) for j in range(n)]
                         for i in range(n)])  # fmt: skip

    def sim(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return ref_hsic_unbiased(m * x, m * y)

    kl = sim(mask(na, nb), k_mat, l_mat)
    kk = sim(mask(na, na), k_mat, k_mat)
    ll = sim(mask(nb, nb), l_mat, l_mat)
    return kl / (np.sqrt(kk * ll) + 1e-6)


def ref_svcca(a, b, dim: int) -> float:
    """platonic-rep's recipe with exact SVD and a tightly converged sklearn CCA (no noise)."""
    from sklearn.cross_decomposition import CCA

    def top_u(x) -> np.ndarray:
        x = _unit(x)
        x = x - x.mean(0)
        x = x / (x.std(0, ddof=1) + 1e-8)
        return np.linalg.svd(x, full_matrices=False)[0][:, :dim]

    u1, u2 = top_u(a), top_u(b)
    cca = CCA(n_components=dim, max_iter=5000, tol=1e-12)
    c1, c2 = cca.fit(u1, u2).transform(u1, u2)
    return float(np.mean([np.corrcoef(c1[:, i], c2[:, i])[0, 1] for i in range(dim)]))


def ref_retrieval(img, txt, t2i, ks) -> dict[str, float]:
    sim = _unit(img) @ _unit(txt).T
    out = {}
    for k in ks:
        hits = [any(t2i[t] == i for t in np.argsort(-sim[i])[:k]) for i in range(len(img))]
        out[f"i2t_r{k}"] = float(np.mean(hits))
    for k in ks:
        hits = [t2i[t] in np.argsort(-sim[:, t])[:k] for t in range(len(txt))]
        out[f"t2i_r{k}"] = float(np.mean(hits))
    return out


# --------------------------------------------------------------------------- alignment metrics


@pytest.mark.parametrize("name", sorted(ALIGNMENT))
def test_identical_inputs_score_one(name: str) -> None:
    x = _clustered()
    value = ALIGNMENT[name](x, x)
    assert isinstance(value, float)
    assert value == pytest.approx(1.0, abs=IDENTITY_TOL)


def test_knn_metrics_exactly_one_on_identical_inputs() -> None:
    x = _clustered(seed=3)
    assert M.mutual_knn(x, x, k=5) == 1.0
    assert M.cycle_knn(x, x, k=5) == 1.0


@pytest.mark.parametrize("name", sorted(ALIGNMENT))
def test_independent_inputs_score_much_lower(name: str) -> None:
    rng = _rng(1)
    a, b = rng.standard_normal((200, 32)), rng.standard_normal((200, 48))
    same, independent = ALIGNMENT[name](a, a), ALIGNMENT[name](a, b)
    assert same > 0.9
    assert independent < 0.5 * same


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_invariant_to_rotation_and_isotropic_scaling(unbiased: bool) -> None:
    a, b = _correlated(seed=2)
    qa, _ = np.linalg.qr(_rng(5).standard_normal((a.shape[1], a.shape[1])))
    qb, _ = np.linalg.qr(_rng(6).standard_normal((b.shape[1], b.shape[1])))
    base = M.cka(a, b, unbiased=unbiased)
    assert 0.05 < base < 0.95  # a non-trivial value, so invariance is informative
    assert M.cka(a, 3.7 * b @ qb, unbiased=unbiased) == pytest.approx(base, abs=1e-9)
    assert M.cka(0.2 * a @ qa, b, unbiased=unbiased) == pytest.approx(base, abs=1e-9)
    # A non-orthogonal map of the same input does change CKA, so the check has teeth.
    skew = np.diag(np.linspace(0.1, 5.0, b.shape[1]))
    assert M.cka(a, b @ skew, unbiased=unbiased) != pytest.approx(base, abs=1e-3)


@pytest.mark.parametrize("name", sorted(ALIGNMENT))
def test_alignment_invariant_to_shared_row_permutation(name: str) -> None:
    a, b = _correlated(seed=4)
    perm = _rng(6).permutation(len(a))
    assert ALIGNMENT[name](a[perm], b[perm]) == pytest.approx(ALIGNMENT[name](a, b), abs=1e-9)


def test_unshared_permutation_breaks_alignment() -> None:
    a, b = _correlated(seed=4)
    perm = _rng(6).permutation(len(a))
    assert M.mutual_knn(a, b[perm], k=5) < 0.5 * M.mutual_knn(a, b, k=5)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_knn_metrics_match_reference(k: int) -> None:
    a, b = _correlated(seed=7, n=50)
    assert M.mutual_knn(a, b, k=k) == pytest.approx(ref_mutual_knn(a, b, k), abs=1e-6)
    assert M.cycle_knn(a, b, k=k) == pytest.approx(ref_cycle_knn(a, b, k), abs=1e-6)


def test_cycle_knn_is_directional() -> None:
    """cycle_knn(a, b) goes through b's neighbours then a's, so it is not symmetric."""
    a, b = _correlated(seed=10, n=50)
    assert M.cycle_knn(a, b, k=3) == pytest.approx(ref_cycle_knn(a, b, 3), abs=1e-6)
    assert M.cycle_knn(b, a, k=3) == pytest.approx(ref_cycle_knn(b, a, 3), abs=1e-6)
    assert ref_cycle_knn(a, b, 3) != ref_cycle_knn(b, a, 3)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_reference(kernel: str, unbiased: bool) -> None:
    a, b = _correlated(seed=9, n=40)
    got = M.cka(a, b, kernel=kernel, sigma=0.7, unbiased=unbiased)
    assert got == pytest.approx(ref_cka(a, b, kernel, 0.7, unbiased), abs=1e-9)


def test_unbiased_cka_is_cka_with_unbiased_hsic() -> None:
    a, b = _correlated(seed=10)
    assert M.unbiased_cka(a, b, kernel="rbf", sigma=2.0) == M.cka(
        a, b, kernel="rbf", sigma=2.0, unbiased=True
    )
    assert M.unbiased_cka(a, b) != pytest.approx(M.cka(a, b), abs=1e-3)


def test_cka_accepts_platonic_rep_kernel_name() -> None:
    a, b = _correlated(seed=10)
    assert M.cka(a, b, kernel="ip") == M.cka(a, b, kernel="linear")


@pytest.mark.parametrize("k", [2, 5, 15])
def test_cknna_matches_reference(k: int) -> None:
    a, b = _correlated(seed=11, n=45)
    assert M.cknna(a, b, k=k) == pytest.approx(ref_cknna(a, b, k), abs=1e-9)


@pytest.mark.parametrize("dim", [1, 4, 8])
def test_svcca_matches_sklearn_cca_reference(dim: int) -> None:
    # With exact SVD and a tightly converged CCA the two agree to ~1e-12; 1e-6 leaves margin
    # for sklearn's iterative solver.
    a, b = _correlated(seed=12, n=120, da=16, db=24)
    assert M.svcca(a, b, dim=dim) == pytest.approx(ref_svcca(a, b, dim), abs=1e-6)


def test_inputs_accept_torch_numpy_and_float16() -> None:
    a, b = _correlated(seed=15)
    as_np32 = M.cka(a.astype(np.float32), b.astype(np.float32))
    assert M.cka(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(M.cka(a, b), abs=1e-12)
    assert M.cka(a.astype(np.float16), torch.from_numpy(b).half()) == pytest.approx(
        as_np32, abs=1e-2
    )
    assert M.mutual_knn(a.astype(np.float16), b.astype(np.float16), k=5) == pytest.approx(
        M.mutual_knn(a, b, k=5), abs=0.05
    )


def test_inputs_requiring_grad_are_accepted_without_building_a_graph() -> None:
    a, b = _correlated(seed=16)
    ta = torch.tensor(a, requires_grad=True)
    for fn in ALIGNMENT.values():
        assert isinstance(fn(ta, b), float)
    assert ta.grad is None


# --------------------------------------------------------------------------- retrieval


def _hand_built() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images e0, e1, e2; unit-norm captions, so cos(image i, caption t) = caption_t[i].

    similarity (rows images, columns captions t0..t4, owners 0 0 1 2 2):
        img0: 1.00 0.28 0.00 0.80 0.00 -> top t0 (own)                  i2t hit@1
        img1: 0.00 0.96 0.60 0.00 0.00 -> top t1 (img0's), t2 (own)     i2t hit@2
        img2: 0.00 0.00 0.80 0.60 1.00 -> top t4, its SECOND caption    i2t hit@1
    caption queries: t0 -> img0 rank 1, t1 -> img0 rank 2, t2 -> img1 rank 2,
                     t3 -> img2 rank 2, t4 -> img2 rank 1.
    """
    images = np.eye(3)
    texts = np.array(
        [
            [1.0, 0.0, 0.0],
            [0.28, 0.96, 0.0],
            [0.0, 0.6, 0.8],
            [0.8, 0.0, 0.6],
            [0.0, 0.0, 1.0],
        ]
    )
    return images, texts, np.array([0, 0, 1, 2, 2])


def test_retrieval_hand_built_multi_caption_case() -> None:
    images, texts, owners = _hand_built()
    got = M.retrieval(images, texts, owners, ks=(1, 2))
    assert got == pytest.approx(
        {"i2t_r1": 2 / 3, "i2t_r2": 1.0, "t2i_r1": 2 / 5, "t2i_r2": 1.0}, abs=1e-7
    )
    assert list(got) == ["i2t_r1", "i2t_r2", "t2i_r1", "t2i_r2"]
    assert all(isinstance(v, float) for v in got.values())


def test_retrieval_clips_k_to_gallery_size() -> None:
    images, texts, owners = _hand_built()
    got = M.retrieval(images, texts, owners, ks=(3, 4, 100))
    # 3 images: any k >= 3 ranks every image, so every caption query is a hit.
    assert got["t2i_r3"] == got["t2i_r4"] == got["t2i_r100"] == 1.0
    # 5 captions: k = 100 is clipped to 5, so every image (all have captions) is a hit.
    assert got["i2t_r100"] == 1.0
    assert got["i2t_r3"] == 1.0


def test_retrieval_clipped_k_reaches_the_last_rank() -> None:
    # Image 1's only caption is its LAST text and caption 1's image is its LAST image, so
    # recall reaches 1 only when k is clipped to exactly the gallery size.
    images = np.eye(2)
    texts = np.array([[1.0, 0.0], [0.8, -0.6]])
    got = M.retrieval(images, texts, np.array([0, 1]), ks=(1, 100))
    assert got == pytest.approx({"i2t_r1": 0.5, "i2t_r100": 1.0, "t2i_r1": 0.5, "t2i_r100": 1.0})


def test_retrieval_image_without_caption_counts_as_miss() -> None:
    images, texts, owners = _hand_built()
    images = np.vstack([images, np.ones((1, 3))])  # image 3 has no caption
    got = M.retrieval(images, texts, owners, ks=(10,))
    assert got["i2t_r10"] == pytest.approx(3 / 4)
    assert got["t2i_r10"] == 1.0


def test_retrieval_identical_embeddings_give_perfect_recall() -> None:
    emb = _rng(17).standard_normal((50, 16))
    got = M.retrieval(emb, torch.from_numpy(emb.copy()), np.arange(50))
    assert got == {f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_retrieval_matches_bruteforce_reference_with_shared_images() -> None:
    rng = _rng(18)
    n_img, extra, d = 30, 45, 8
    owners = np.concatenate([np.arange(n_img), rng.integers(0, n_img, extra)])
    owners = owners[rng.permutation(len(owners))]
    images = rng.standard_normal((n_img, d))
    texts = images[owners] + 1.2 * rng.standard_normal((len(owners), d))
    ks = (1, 5, 10)
    got = M.retrieval(images, texts, owners, ks=ks)
    want = ref_retrieval(images, texts, owners, ks)
    assert got == pytest.approx(want, abs=1e-6)
    assert 0.0 < got["t2i_r1"] < got["t2i_r10"] < 1.0  # a case where ranking matters


def test_retrieval_random_is_much_worse_than_identical() -> None:
    rng = _rng(19)
    images, texts = rng.standard_normal((100, 32)), rng.standard_normal((100, 32))
    got = M.retrieval(images, texts, np.arange(100), ks=(1,))
    assert got["i2t_r1"] < 0.1 and got["t2i_r1"] < 0.1


def test_retrieval_invariant_to_gallery_permutation() -> None:
    rng = _rng(20)
    owners = np.concatenate([np.arange(20), rng.integers(0, 20, 20)])
    images = rng.standard_normal((20, 6))
    texts = images[owners] + rng.standard_normal((40, 6))
    p_img, p_txt = rng.permutation(20), rng.permutation(40)
    new_index = np.argsort(p_img)  # old image row -> new image row
    got = M.retrieval(images[p_img], texts[p_txt], new_index[owners[p_txt]])
    assert got == pytest.approx(M.retrieval(images, texts, owners), abs=1e-7)


# --------------------------------------------------------------------------- hard negatives


def test_hard_negative_accuracy_one_when_positive_is_the_image() -> None:
    rng = _rng(21)
    image = rng.standard_normal((64, 16))
    assert M.hard_negative_accuracy(image, image.copy(), rng.standard_normal((64, 16))) == 1.0
    assert M.hard_negative_accuracy(image, rng.standard_normal((64, 16)), image.copy()) == 0.0


def test_hard_negative_accuracy_matches_reference_and_ties_are_misses() -> None:
    rng = _rng(22)
    image, pos, neg = (rng.standard_normal((80, 10)) for _ in range(3))
    pos[:5] = neg[:5]  # ties
    cos = lambda x, y: float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))  # noqa: E731
    want = np.mean([cos(i, p) > cos(i, n) for i, p, n in zip(image, pos, neg, strict=True)])
    assert M.hard_negative_accuracy(image, pos, neg) == pytest.approx(want, abs=1e-7)
    assert 0.2 < want < 0.8
    # Cosine ignores norms (checked away from the exact ties, which rescaling would perturb).
    scaled = M.hard_negative_accuracy(image[5:], 5.0 * pos[5:], 0.1 * neg[5:])
    assert scaled == M.hard_negative_accuracy(image[5:], pos[5:], neg[5:])
    perm = rng.permutation(80)
    assert M.hard_negative_accuracy(image[perm], pos[perm], neg[perm]) == pytest.approx(want)


def test_retrieval_hits_hand_built_per_query() -> None:
    images, texts, owners = _hand_built()
    i2t, t2i = M.retrieval_hits(images, texts, owners, ks=(1, 2))
    # See `_hand_built`: img1 finds its caption at rank 2; t1, t2, t3 find their image at 2.
    np.testing.assert_array_equal(i2t.numpy(), [[1, 1], [0, 1], [1, 1]])
    np.testing.assert_array_equal(t2i.numpy(), [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1]])
    assert i2t.dtype == t2i.dtype == torch.bool


def test_retrieval_hits_average_to_the_recalls() -> None:
    rng = _rng(23)
    owners = np.concatenate([np.arange(25), rng.integers(0, 25, 35)])
    images = rng.standard_normal((25, 8))
    texts = images[owners] + 1.2 * rng.standard_normal((60, 8))
    ks = (1, 5, 100)
    i2t, t2i = M.retrieval_hits(images, texts, owners, ks=ks)
    assert i2t.shape == (25, 3) and t2i.shape == (60, 3)
    want = ref_retrieval(images, texts, owners, (1, 5, 60))  # k clipped to the gallery
    for j, (k, clipped) in enumerate(zip(ks, (1, 5, 60), strict=True)):
        assert i2t[:, j].double().mean().item() == pytest.approx(want[f"i2t_r{clipped}"])
        assert t2i[:, j].double().mean().item() == pytest.approx(
            M.retrieval(images, texts, owners, ks=ks)[f"t2i_r{k}"], abs=1e-7
        )


def test_hard_negative_wins_per_row() -> None:
    rng = _rng(24)
    image, pos, neg = (rng.standard_normal((40, 6)) for _ in range(3))
    pos[:3] = neg[:3]  # ties are misses
    cos = lambda x, y: x @ y / (np.linalg.norm(x) * np.linalg.norm(y))  # noqa: E731
    want = [cos(i, p) > cos(i, n) for i, p, n in zip(image, pos, neg, strict=True)]
    wins = M.hard_negative_wins(image, pos, neg)
    np.testing.assert_array_equal(wins.numpy(), want)
    assert wins.double().mean().item() == pytest.approx(M.hard_negative_accuracy(image, pos, neg))


# --------------------------------------------------------------------------- zero-shot


def test_zeroshot_accuracy_hand_built() -> None:
    """Three classes along +x, +y and -x; five images whose nearest class (by cosine) is
    0, 1, 2, 1 and 0 against labels 0, 1, 2, 0, 0: four of five right."""
    classes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    images = np.array([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.2], [1.0, 1.1], [0.5, -0.4]])
    labels = np.array([0, 1, 2, 0, 0])
    hits = M.zeroshot_hits(images, classes, labels)
    np.testing.assert_array_equal(hits.numpy(), [True, True, True, False, True])
    assert M.zeroshot_accuracy(images, classes, labels) == pytest.approx(0.8)
    # Cosine: the norms of images and class embeddings do not matter.
    scaled = M.zeroshot_accuracy(3 * images, classes * [[10.0], [1.0], [0.1]], labels)
    assert scaled == pytest.approx(0.8)
    assert M.zeroshot_accuracy(images, classes, [1, 0, 0, 1, 1]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="labels values must lie in"):
        M.zeroshot_accuracy(images, classes, [0, 1, 3, 0, 0])
    with pytest.raises(ValueError, match="one class index per image"):
        M.zeroshot_accuracy(images, classes, [0, 1])
    with pytest.raises(ValueError, match="embedding dimension"):
        M.zeroshot_accuracy(images, np.ones((3, 3)), labels)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_covers_a_known_mean_at_its_level() -> None:
    """200 independent Bernoulli(p) test sets of n = 2,000 items (one per column): about 95%
    of their intervals contain p, and their width is the normal approximation's
    2 * 1.96 * sqrt(p (1 - p) / n)."""
    p, n, sets = 0.3, 2000, 200
    samples = (_rng(25).random((n, sets)) < p).astype(float)
    lo, hi = M.bootstrap_interval(samples, resamples=1000, level=0.95, seed=0)
    coverage = np.mean((lo <= p) & (p <= hi))
    assert 0.9 <= coverage <= 0.99
    assert np.all((lo <= samples.mean(0)) & (samples.mean(0) <= hi))
    want = 2 * 1.96 * np.sqrt(p * (1 - p) / n)
    assert np.mean(hi - lo) == pytest.approx(want, rel=0.05)


def test_bootstrap_interval_matches_a_naive_resampling_loop() -> None:
    values = _rng(26).exponential(size=500)  # skewed: the percentile interval is asymmetric
    lo, hi = M.bootstrap_interval(values, resamples=2000, level=0.9, seed=1)
    rng = _rng(27)
    naive = [values[rng.integers(0, 500, 500)].mean() for _ in range(2000)]
    want_lo, want_hi = np.percentile(naive, [5, 95])
    assert isinstance(lo, float) and isinstance(hi, float)
    assert lo == pytest.approx(want_lo, abs=0.015) and hi == pytest.approx(want_hi, abs=0.015)
    assert hi - values.mean() > values.mean() - lo  # right-skewed mean: a longer upper arm


def test_bootstrap_interval_is_seeded_and_resamples_columns_together() -> None:
    values = _rng(28).random((300, 3))
    lo, hi = M.bootstrap_interval(values, resamples=400, seed=5)
    for j in range(3):  # one column alone draws the same resamples as the group
        one = M.bootstrap_interval(values[:, j], resamples=400, seed=5)
        assert one == pytest.approx((lo[j], hi[j]), abs=1e-12)
    again = M.bootstrap_interval(torch.from_numpy(values), resamples=400, seed=5)
    np.testing.assert_array_equal(again[0], lo)
    narrow = M.bootstrap_interval(values, resamples=400, level=0.5, seed=5)
    assert np.all((lo <= narrow[0]) & (narrow[1] <= hi))
    assert M.bootstrap_interval(np.full(50, 0.25), resamples=10) == (0.25, 0.25)


def test_cluster_bootstrap_covers_a_known_mean_where_the_naive_one_does_not() -> None:
    """200 test sets of 100 images x 5 captions whose outcomes are strongly clustered (each
    image's captions succeed with probability 0.1 or 0.9, a fair coin per image; true mean
    0.5): resampling whole images covers 0.5 at about the nominal 95%, resampling captions as
    if independent is far too narrow and covers it much less often."""
    images, captions, sets = 100, 5, 200
    rng = _rng(30)
    p = np.where(rng.random((images, sets)) < 0.5, 0.1, 0.9)
    outcomes = (rng.random((images, captions, sets)) < p[:, None, :]).astype(float)
    outcomes = outcomes.reshape(images * captions, sets)
    image_of = np.repeat(np.arange(images), captions)
    lo, hi = M.bootstrap_interval(outcomes, resamples=500, seed=0, groups=image_of)
    naive_lo, naive_hi = M.bootstrap_interval(outcomes, resamples=500, seed=0)
    coverage = np.mean((lo <= 0.5) & (0.5 <= hi))
    assert 0.9 <= coverage <= 0.99
    assert np.mean((naive_lo <= 0.5) & (0.5 <= naive_hi)) < 0.8
    assert np.mean(hi - lo) > 1.5 * np.mean(naive_hi - naive_lo)
    # The between-image standard error: var(mean) = var(image means) / images.
    image_means = outcomes.reshape(images, captions, sets).mean(1)
    want = 2 * 1.96 * image_means.std(0).mean() / np.sqrt(images)
    assert np.mean(hi - lo) == pytest.approx(want, rel=0.1)


def test_cluster_bootstrap_of_singletons_is_the_plain_bootstrap() -> None:
    values = _rng(31).random(60)
    plain = M.bootstrap_interval(values, resamples=300, seed=2)
    assert M.bootstrap_interval(values, resamples=300, seed=2, groups=np.arange(60)) == plain
    # Group labels of any type; a group's items always travel together, so a constant group
    # gives a zero-width interval at its mean.
    labels = np.array([f"img{i // 3}" for i in range(60)])
    lo, hi = M.bootstrap_interval(np.repeat(values[:20], 3), 300, seed=2, groups=labels)
    assert lo <= values[:20].mean() <= hi
    assert M.bootstrap_interval(values, 50, groups=np.zeros(60)) == pytest.approx(
        (values.mean(), values.mean())
    )
    with pytest.raises(ValueError, match="groups"):
        M.bootstrap_interval(values, groups=np.arange(59))


def _related(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n rows of two noisy views of one 6-d signal, in 16 and 12 dimensions (fixed maps)."""
    maps = _rng(32)
    to_a, to_b = maps.standard_normal((6, 16)), maps.standard_normal((6, 12))
    z = rng.standard_normal((n, 6))
    a = z @ to_a + 1.5 * rng.standard_normal((n, 16))
    return a, z @ to_b + 1.5 * rng.standard_normal((n, 12))


@pytest.fixture
def one_thread():
    """Many tiny-matrix metric calls: torch's thread pool only adds overhead (and on a loaded
    2-core machine spins for tens of ms per call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_half_sample_interval_covers_a_population_value(one_thread) -> None:
    """Unbiased linear CKA of two noisy views; its population value, from the covariances of
    50,000 L2-normalised rows, is ||C_ab||^2 / (||C_aa|| ||C_bb||). Over 30 test sets of 200
    rows the half-sample intervals cover it in most sets, and their width matches the spread
    of the full-sample values across the sets (the variance half-sampling claims to
    estimate)."""
    a_pop, b_pop = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in _related(50_000, _rng(1)))
    a_pop, b_pop = a_pop - a_pop.mean(0), b_pop - b_pop.mean(0)
    norm = lambda c: np.sum(c**2)  # noqa: E731
    cov = lambda x, y: x.T @ y / len(x)  # noqa: E731
    truth = norm(cov(a_pop, b_pop)) / np.sqrt(norm(cov(a_pop, a_pop)) * norm(cov(b_pop, b_pop)))
    values, covered, widths = [], 0, []
    for rep in range(30):
        a, b = _related(200, _rng(100 + rep))
        full = M.unbiased_cka(a, b)
        lo, hi = M.half_sample_interval(
            lambda r, a=a, b=b: M.unbiased_cka(a[r], b[r]), 200, full, 50, 0.95, seed=rep
        )
        assert lo < full < hi
        values.append(full)
        covered += lo <= truth <= hi
        widths.append(hi - lo)
    assert 0.1 < truth < 0.9
    assert covered >= 24  # nominal 28.5 of 30; rough tails from 50 halves
    ratio = np.mean(widths) / (2 * 1.96 * np.std(values, ddof=1))
    assert 0.6 < ratio < 1.6


def test_half_sample_interval_of_a_mean_is_the_standard_error() -> None:
    """For a plain mean, halves without replacement vary as the full sample does:
    var = (1/m - 1/N) s^2 = s^2 / N at m = N / 2, so the interval is the usual
    mean +- 1.96 s / sqrt(N) (odd N rescaled); seeded; several statistics at once."""
    x = _rng(33).standard_normal(401)
    want = 1.96 * x.std() / np.sqrt(401)
    stat = lambda r: [x[r].mean(), 2 * x[r].mean()]  # noqa: E731
    lo, hi = M.half_sample_interval(stat, 401, [x.mean(), 2 * x.mean()], 400, seed=3)
    assert (hi[0] - lo[0]) / 2 == pytest.approx(want, rel=0.15)
    assert hi[1] - lo[1] == pytest.approx(2 * (hi[0] - lo[0]))
    seen = []
    once = M.half_sample_interval(lambda r: seen.append(r) or x[r].mean(), 401, 0.0, 5, seed=3)
    assert all(len(r) == 200 and len(set(r)) == 200 for r in seen)  # halves never repeat rows
    assert once == M.half_sample_interval(lambda r: x[r].mean(), 401, 0.0, 5, seed=3)
    assert once != M.half_sample_interval(lambda r: x[r].mean(), 401, 0.0, 5, seed=4)
    with pytest.raises(ValueError, match="resamples"):
        M.half_sample_interval(lambda r: 0.0, 10, 0.0, 1)
    with pytest.raises(ValueError, match="N >= 2"):
        M.half_sample_interval(lambda r: 0.0, 1, 0.0, 5)


@pytest.mark.parametrize(
    ("values", "kwargs"),
    [
        (np.zeros(0), {}),
        (np.zeros((2, 2, 2)), {}),
        (np.array([1.0, np.nan]), {}),
        (np.ones(5), {"resamples": 0}),
        (np.ones(5), {"resamples": 2.5}),
        (np.ones(5), {"level": 1.0}),
    ],
)
def test_bootstrap_interval_rejects_bad_inputs(values: np.ndarray, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        M.bootstrap_interval(values, **kwargs)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", sorted(ALIGNMENT))
def test_row_count_mismatch_is_rejected(name: str) -> None:
    rng = _rng(23)
    with pytest.raises(ValueError, match="same number of rows"):
        ALIGNMENT[name](rng.standard_normal((20, 8)), rng.standard_normal((21, 8)))


@pytest.mark.parametrize("name", sorted(ALIGNMENT))
def test_non_2d_input_is_rejected(name: str) -> None:
    rng = _rng(24)
    with pytest.raises(ValueError, match="2-D"):
        ALIGNMENT[name](rng.standard_normal(20), rng.standard_normal(20))
    with pytest.raises(ValueError, match="2-D"):
        ALIGNMENT[name](rng.standard_normal((20, 8)), rng.standard_normal((20, 8, 1)))


@pytest.mark.parametrize("k", [0, 1, -3])
def test_cknna_rejects_k_below_two(k: int) -> None:
    a = _rng(25).standard_normal((20, 8))
    with pytest.raises(ValueError, match="k >= 2"):
        M.cknna(a, a, k=k)


@pytest.mark.parametrize("fn", [M.mutual_knn, M.cycle_knn, M.cknna])
def test_knn_metrics_reject_k_not_below_n(fn) -> None:
    a = _rng(26).standard_normal((10, 4))
    with pytest.raises(ValueError, match="k < N"):
        fn(a, a, k=10)
    with pytest.raises(ValueError, match="integer"):
        fn(a, a, k=2.5)


def test_small_n_and_bad_options_are_rejected() -> None:
    tiny = _rng(27).standard_normal((3, 4))
    a = _rng(27).standard_normal((20, 4))
    with pytest.raises(ValueError, match="N >= 4"):
        M.cka(tiny, tiny, unbiased=True)
    with pytest.raises(ValueError, match="N >= 4"):
        M.cknna(tiny, tiny, k=2)
    with pytest.raises(ValueError, match="kernel"):
        M.cka(a, a, kernel="poly")
    with pytest.raises(ValueError, match="sigma"):
        M.cka(a, a, kernel="rbf", sigma=0.0)
    with pytest.raises(ValueError, match="dim"):
        M.svcca(a, a, dim=5)  # D = 4
    with pytest.raises(ValueError, match="NaN"):
        M.cka(np.full((20, 4), np.nan), a)


def test_retrieval_rejects_bad_inputs() -> None:
    images, texts, owners = _hand_built()
    with pytest.raises(ValueError, match="shape \\[5\\]"):
        M.retrieval(images, texts, owners[:4])
    with pytest.raises(ValueError, match="lie in"):
        M.retrieval(images, texts, np.array([0, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        M.retrieval(images, texts, owners.astype(float))
    with pytest.raises(ValueError, match="embedding dimension"):
        M.retrieval(images, texts[:, :2], owners)
    with pytest.raises(ValueError, match="positive"):
        M.retrieval(images, texts, owners, ks=(0,))


def test_hard_negative_accuracy_rejects_shape_mismatch() -> None:
    rng = _rng(28)
    with pytest.raises(ValueError, match="same \\[N, D\\] shape"):
        M.hard_negative_accuracy(
            rng.standard_normal((10, 4)), rng.standard_normal((10, 4)), rng.standard_normal((9, 4))
        )


def _dense_hits(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor, ks: list[int]):
    """retrieval_hits as it was before chunking: the whole N_images x N_texts matrix."""
    images = torch.nn.functional.normalize(images, dim=1)
    texts = torch.nn.functional.normalize(texts, dim=1)
    sim = images @ texts.T
    top_texts = sim.topk(min(max(ks), len(texts)), dim=1).indices
    rows = torch.arange(len(images))[:, None]
    top_images = sim.T.topk(min(max(ks), len(images)), dim=1).indices
    return M._hits_at(owner[top_texts] == rows, ks), M._hits_at(top_images == owner[:, None], ks)


def test_chunked_retrieval_equals_the_dense_matrix_exactly() -> None:
    """37 images with 1-4 captions each (a caption repeated verbatim, so exact ties), in
    chunks of 1, 5 (does not divide 37 or the 93 captions), 37 and the default (one chunk)."""
    rng = _rng(11)
    images = torch.as_tensor(rng.standard_normal((37, 16)), dtype=torch.float32)
    owner = torch.as_tensor(np.repeat(np.arange(37), rng.integers(1, 5, 37)))
    texts = images[owner] + 0.9 * torch.as_tensor(rng.standard_normal((len(owner), 16))).float()
    texts[1] = texts[0]  # a tie for every query
    ks = [1, 5, 10]
    want_i2t, want_t2i = _dense_hits(images, texts, owner, ks)
    for chunk in (1, 5, 37, None):
        i2t, t2i = M.retrieval_hits(images, texts, owner, ks, chunk=chunk)
        assert torch.equal(i2t, want_i2t) and torch.equal(t2i, want_t2i), chunk
    assert M.retrieval(images, texts, owner, ks, chunk=4) == M.retrieval(images, texts, owner, ks)
    assert 0 < want_i2t[:, 0].float().mean() < 1  # neither hopeless nor perfect
    with pytest.raises(ValueError, match="chunk"):
        M.retrieval_hits(images, texts, owner, ks, chunk=0)
