"""Representation-alignment and retrieval metrics.

Why this module exists: JAM is judged by how much the frozen vision and language spaces agree
before and after alignment, and by how well the aligned spaces retrieve each other.

* The alignment metrics (``mutual_knn``, ``cycle_knn``, ``cka``, ``unbiased_cka``, ``cknna``,
  ``svcca``) follow the definitions of the Platonic Representation Hypothesis code
  (github.com/minyoungg/platonic-rep, ``metrics.py``) so that our numbers are comparable with
  the paper's. This is an independent implementation of the same maths, vectorised and
  O(N^2) in memory and time where the original builds N x N products.
* ``retrieval`` follows clip_benchmark's recall@k so that numbers are comparable with CLIP
  papers; ``hard_negative_accuracy`` is the usual "positive beats negative" score.
* Per-item outcomes (``retrieval_hits``, ``hard_negative_wins``, ``zeroshot_hits``) are the 0/1
  values whose means those scores are, so ``bootstrap_interval`` can resample test items for
  error bars; with ``groups`` it resamples whole clusters (all captions of one image), since
  captions of one image are not independent. The alignment metrics are set-level (kNN graphs,
  Gram matrices): they have no per-item outcome, and resampling rows with replacement would
  duplicate samples that then become each other's nearest neighbours, so
  ``half_sample_interval`` draws halves without replacement instead.

Every function accepts ``[N, D]`` torch tensors (on any device) or numpy arrays of any
numeric dtype (float16 included), never tracks gradients, and returns Python floats.
Alignment metrics L2-normalise rows first, as platonic-rep does before calling its metrics.
Kernel (HSIC) and SVCCA computations run in float64 because they subtract nearly equal sums;
the kNN and retrieval metrics run in float32 (float64 inputs stay float64).

Deviation from platonic-rep: ``svcca`` is computed exactly and deterministically (full SVD,
then canonical correlations as the singular values of ``U1.T @ U2``) instead of randomized
``svd_lowrank``, sklearn's iterative CCA and injected 1e-10 noise; where those converge they
give the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "bootstrap_interval",
    "cka",
    "clamp_outliers",
    "cknna",
    "cycle_knn",
    "half_sample_interval",
    "hard_negative_accuracy",
    "hard_negative_wins",
    "mutual_knn",
    "retrieval",
    "retrieval_hits",
    "svcca",
    "unbiased_cka",
    "zeroshot_accuracy",
    "zeroshot_hits",
]

ArrayLike = torch.Tensor | np.ndarray

# The guard platonic-rep adds to CKA/CKNNA denominators; kept so values match theirs.
_DENOM_EPS = 1e-6


# --------------------------------------------------------------------------- input handling


def clamp_outliers(x: ArrayLike, q: float = 0.95) -> torch.Tensor:
    """Clip every value to +-t, t the mean over rows of each row's `q` quantile of |x|:
    platonic-rep's preparation before its metrics (`remove_outliers`), which keeps a language
    model's few huge outlier dimensions from dominating every inner product. `q = 1` returns
    `x` unchanged (as a float tensor)."""
    t = _as_tensor(x, "x")
    if q >= 1:
        return t
    if not 0 < q < 1:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    threshold = torch.quantile(t.abs().float(), q, dim=1).mean().to(t.dtype)
    return t.clamp(-threshold, threshold)


class NonFiniteError(ValueError):
    """Embeddings or values hold NaN or Inf: a population tells a diverged member by it."""


def _as_tensor(x: ArrayLike, name: str, *, float64: bool = False) -> torch.Tensor:
    """Return ``x`` as a detached, finite, non-empty 2-D float tensor.

    float16/bfloat16 (and integer) inputs are upcast so sums over N rows do not overflow or
    lose precision; ``float64=True`` forces double precision for cancellation-prone maths.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype == object:
            raise ValueError(f"{name} must be a numeric array, got an object array")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    dtype = torch.float64 if (float64 or t.dtype == torch.float64) else torch.float32
    t = t.to(dtype)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf values")
    return t


def _normalized_pair(
    a: ArrayLike, b: ArrayLike, *, float64: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two representations of the same N samples and L2-normalise their rows.

    The feature dimensions may differ (two different models); the row counts may not.
    """
    ta = _as_tensor(a, "a", float64=float64)
    tb = _as_tensor(b, "b", float64=float64)
    if ta.shape[0] != tb.shape[0]:
        raise ValueError(
            "a and b must have the same number of rows (one per sample), got "
            f"{ta.shape[0]} and {tb.shape[0]}"
        )
    ta, tb = _common(ta, tb)
    return F.normalize(ta, dim=1), F.normalize(tb, dim=1)


def _shared_space(
    a: ArrayLike, b: ArrayLike, name_a: str, name_b: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets of vectors in one embedding space (retrieval, zero-shot), rows L2-normalised:
    the widths must agree, the row counts need not."""
    ta = F.normalize(_as_tensor(a, name_a), dim=1)
    tb = F.normalize(_as_tensor(b, name_b), dim=1)
    if ta.shape[1] != tb.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must share the embedding dimension, got "
            f"{ta.shape[1]} and {tb.shape[1]}"
        )
    return _common(ta, tb)


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both on `a`'s device in their promoted dtype, so mixed inputs compare exactly."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(device=a.device, dtype=dtype)


def _check_int(value: object, name: str) -> int:
    """Reject bools/floats so that e.g. ``k=2.5`` fails loudly instead of truncating."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_k(k: object, n: int, *, minimum: int = 1) -> int:
    """kNN excludes the sample itself, so only N - 1 neighbours exist: need minimum <= k < N."""
    k = _check_int(k, "k")
    if not minimum <= k < n:
        raise ValueError(
            f"k must satisfy {minimum} <= k < N (self is excluded from its neighbours), "
            f"got k={k} with N={n}"
        )
    return k


def _check_resampling(resamples: object, level: object, minimum: int) -> int:
    """A resample count of at least `minimum` and an interval level in (0, 1)."""
    resamples = _check_int(resamples, "resamples")
    if resamples < minimum:
        raise ValueError(f"resamples must be >= {minimum}, got {resamples}")
    if not 0 < float(level) < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    return resamples


def _check_min_rows(n: int, minimum: int, what: str) -> None:
    if n < minimum:
        raise ValueError(f"{what} needs N >= {minimum} samples, got N={n}")


# --------------------------------------------------------------------------- kNN metrics


def _knn_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of each row's k most cosine-similar other rows (self excluded)."""
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


def _neighbour_mask(knn: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N, N]`` adjacency with ``mask[i, j]`` true when j is a neighbour of i."""
    n = knn.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool, device=knn.device)
    return mask.scatter_(1, knn, True)


@torch.no_grad()
def mutual_knn(a: ArrayLike, b: ArrayLike, k: int = 10) -> float:
    """Mean over samples of |kNN_a(i) ∩ kNN_b(i)| / k.

    Why: measures whether the two spaces agree on *local* neighbourhoods, the headline metric
    of the Platonic Representation Hypothesis paper. 1 for identical spaces, about k / (N - 1)
    for independent ones.
    """
    xa, xb = _normalized_pair(a, b)
    k = _check_k(k, xa.shape[0])
    knn_a, knn_b = _knn_indices(xa, k), _knn_indices(xb, k)
    shared = _neighbour_mask(knn_a).gather(1, knn_b).sum(dim=1)
    return (shared.to(xa.dtype) / k).mean().item()


@torch.no_grad()
def cycle_knn(a: ArrayLike, b: ArrayLike, k: int = 10) -> float:
    """Fraction of samples i that are among the a-neighbours of at least one b-neighbour of i.

    Why: a cycle-consistency view of neighbourhood agreement (go to b's neighbours, come back
    through a). Matches platonic-rep's ``cycle_knn`` (``knn_A[knn_B]`` contains i).
    """
    xa, xb = _normalized_pair(a, b)
    n = xa.shape[0]
    k = _check_k(k, n)
    mask_a = _neighbour_mask(_knn_indices(xa, k))
    knn_b = _knn_indices(xb, k)
    rows = torch.arange(n, device=xa.device).unsqueeze(1)
    # mask_a[j, i] for each b-neighbour j of i: is i one of j's a-neighbours?
    back = mask_a[knn_b, rows].any(dim=1)
    return back.to(xa.dtype).mean().item()


# --------------------------------------------------------------------------- HSIC / CKA


def _double_center(m: torch.Tensor) -> torch.Tensor:
    """H M H with H = I - 11^T / n, in O(n^2) instead of two n^3 products."""
    return m - m.mean(dim=0, keepdim=True) - m.mean(dim=1, keepdim=True) + m.mean()


def _hsic_biased(k_mat: torch.Tensor, l_mat: torch.Tensor) -> torch.Tensor:
    """trace(K H L H) (biased HSIC, unnormalised as in platonic-rep) = sum((HKH) * (HLH)^T)."""
    return (_double_center(k_mat) * _double_center(l_mat).T).sum()


def _hsic_unbiased(k_mat: torch.Tensor, l_mat: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator of Song et al. (2012), eq. 5, as written in platonic-rep.

    With K~, L~ the kernels with zeroed diagonals:
    [sum(K~ * L~^T) + sum(K~) sum(L~) / ((m-1)(m-2)) - 2 sum(K~ L~) / (m-2)] / (m (m-3)),
    where sum(K~ L~) = colsums(K~) . rowsums(L~) avoids an m^3 product.
    """
    m = k_mat.shape[0]
    kt = k_mat.clone().fill_diagonal_(0)
    lt = l_mat.clone().fill_diagonal_(0)
    trace_term = (kt * lt.T).sum()
    sums_term = kt.sum() * lt.sum() / ((m - 1) * (m - 2))
    cross_term = 2 * (kt.sum(dim=0) @ lt.sum(dim=1)) / (m - 2)
    return (trace_term + sums_term - cross_term) / (m * (m - 3))


def _kernel(x: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """Gram matrix of the rows of ``x``: inner products, or exp(-|xi - xj|^2 / (2 sigma^2))."""
    gram = x @ x.T
    if kernel == "linear":
        return gram
    sq_norms = gram.diagonal()
    sq_dist = (sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2 * gram).clamp_min_(0)
    sq_dist.fill_diagonal_(0)
    return torch.exp(-sq_dist / (2 * sigma**2))


@torch.no_grad()
def cka(
    a: ArrayLike,
    b: ArrayLike,
    kernel: str = "linear",
    sigma: float = 1.0,
    unbiased: bool = False,
) -> float:
    """Centered Kernel Alignment: HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + 1e-6).

    Why: a global similarity of the two spaces' Gram matrices, invariant to rotations and
    isotropic scaling of either space. ``kernel`` is ``"linear"`` (platonic-rep's ``"ip"``,
    also accepted) or ``"rbf"`` with bandwidth ``sigma``; ``unbiased=True`` uses the unbiased
    HSIC estimator (needs N >= 4), which removes the positive bias of small-N CKA. As in
    platonic-rep, a negative unbiased self-HSIC (possible only for tiny, degenerate inputs)
    makes the result NaN.
    """
    if kernel == "ip":
        kernel = "linear"
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    if kernel == "rbf" and not float(sigma) > 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    xa, xb = _normalized_pair(a, b, float64=True)
    n = xa.shape[0]
    if unbiased:
        _check_min_rows(n, 4, "unbiased HSIC (divides by N(N-3))")
    else:
        _check_min_rows(n, 2, "CKA")
    k_mat, l_mat = _kernel(xa, kernel, sigma), _kernel(xb, kernel, sigma)
    hsic = _hsic_unbiased if unbiased else _hsic_biased
    value = hsic(k_mat, l_mat) / (torch.sqrt(hsic(k_mat, k_mat) * hsic(l_mat, l_mat)) + _DENOM_EPS)
    return value.item()


def unbiased_cka(a: ArrayLike, b: ArrayLike, kernel: str = "linear", sigma: float = 1.0) -> float:
    """``cka`` with the unbiased HSIC estimator (platonic-rep's ``unbiased_cka``)."""
    return cka(a, b, kernel=kernel, sigma=sigma, unbiased=True)


@torch.no_grad()
def cknna(a: ArrayLike, b: ArrayLike, k: int = 10) -> float:
    """Centered Kernel Nearest-Neighbour Alignment (platonic-rep's ``cknna``, unbiased=True).

    Why: CKA restricted to pairs that are mutual k-nearest neighbours, so that it measures
    local rather than global kernel agreement. With M the intersection of both spaces' kNN
    masks (self excluded), sim(K, L) = HSIC_unbiased(M * K, M * L) and
    CKNNA = sim(K, L) / (sqrt(sim(K, K) sim(L, L)) + 1e-6). Needs 2 <= k < N and N >= 4.
    """
    xa, xb = _normalized_pair(a, b, float64=True)
    n = xa.shape[0]
    _check_min_rows(n, 4, "CKNNA (unbiased HSIC divides by N(N-3))")
    k = _check_int(k, "k")
    if k < 2:
        raise ValueError(f"CKNNA requires k >= 2, got k={k}")
    k = _check_k(k, n, minimum=2)
    k_mat, l_mat = xa @ xa.T, xb @ xb.T
    mask_k = _neighbour_mask(_knn_indices(xa, k)).to(k_mat.dtype)
    mask_l = _neighbour_mask(_knn_indices(xb, k)).to(l_mat.dtype)
    mask_kl = mask_k * mask_l
    sim_kl = _hsic_unbiased(mask_kl * k_mat, mask_kl * l_mat)
    sim_kk = _hsic_unbiased(mask_k * k_mat, mask_k * k_mat)
    sim_ll = _hsic_unbiased(mask_l * l_mat, mask_l * l_mat)
    return (sim_kl / (torch.sqrt(sim_kk * sim_ll) + _DENOM_EPS)).item()


# --------------------------------------------------------------------------- SVCCA


def _top_left_singular_vectors(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Centre and unit-variance-scale each column (std + 1e-8, as platonic-rep), then take the
    ``dim`` leading left singular vectors: an orthonormal basis of the dominant subspace."""
    x = x - x.mean(dim=0, keepdim=True)
    x = x / (x.std(dim=0, keepdim=True) + 1e-8)
    u, _, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, :dim]


@torch.no_grad()
def svcca(a: ArrayLike, b: ArrayLike, dim: int = 10) -> float:
    """SVCCA: mean canonical correlation between the top-``dim`` SVD subspaces of a and b.

    Why: compares the dominant linear subspaces of two representations regardless of their
    bases. Canonical correlations between two orthonormal bases U1, U2 are the cosines of the
    principal angles, i.e. the singular values of U1^T U2; computing them this way is exact and
    deterministic where platonic-rep uses randomized SVD and sklearn's iterative CCA.
    Needs 1 <= dim <= min(N - 1, D_a, D_b) (centred data has rank at most N - 1).
    """
    xa, xb = _normalized_pair(a, b, float64=True)
    n = xa.shape[0]
    _check_min_rows(n, 2, "SVCCA")
    dim = _check_int(dim, "dim")
    limit = min(n - 1, xa.shape[1], xb.shape[1])
    if not 1 <= dim <= limit:
        raise ValueError(
            f"dim must satisfy 1 <= dim <= min(N - 1, D_a, D_b) = {limit}, got dim={dim}"
        )
    u1 = _top_left_singular_vectors(xa, dim)
    u2 = _top_left_singular_vectors(xb, dim)
    correlations = torch.linalg.svdvals(u1.T @ u2).clamp(0.0, 1.0)
    return correlations.mean().item()


# --------------------------------------------------------------------------- retrieval


def _as_index(
    x: ArrayLike | Sequence[int],
    n_texts: int,
    n_images: int,
    name: str = "text_to_image",
    per: str = "caption",
    target: str = "image",
) -> torch.Tensor:
    """Validate ``text_to_image`` (or another ``name``): one integer row index per item, all
    in range."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integer {target} indices, got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != n_texts:
        raise ValueError(
            f"{name} must have shape [{n_texts}] (one {target} index per {per}), "
            f"got {tuple(t.shape)}"
        )
    t = t.long()
    if n_texts and (int(t.min()) < 0 or int(t.max()) >= n_images):
        raise ValueError(
            f"{name} values must lie in [0, {n_images}), got range [{int(t.min())}, {int(t.max())}]"
        )
    return t


def _hits_at(relevant: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """From ``relevant[q, r]`` (result at rank r is relevant to query q) to ``hits[q, j]``:
    query q has a relevant result within its top ``ks[j]`` (k clipped to the ranked list)."""
    found = relevant.to(torch.int8).cummax(dim=1).values.bool()
    last = torch.tensor([min(k, found.shape[1]) - 1 for k in ks], device=found.device)
    return found[:, last]


# Similarities `retrieval_hits` holds at once: 2^24 float32 cells (64 MiB) per chunk of queries.
_RETRIEVAL_CELLS = 1 << 24


def _top(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Indices ``[Q, k]`` of each query's k most similar gallery rows, ``chunk`` queries at a
    time: memory O(chunk x N) instead of the whole Q x N matrix. Each chunk's similarities
    are the same dot products the dense image x text matrix held (row or column of it), fed
    to the same ``topk``, so scores and ties fall as they did there."""
    return torch.cat(
        [
            (queries[start : start + chunk] @ gallery.T).topk(k, dim=1).indices
            for start in range(0, queries.shape[0], chunk)
        ]
    )


@torch.no_grad()
def retrieval_hits(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query retrieval outcomes: boolean ``i2t [N_images, len(ks)]`` and
    ``t2i [N_texts, len(ks)]``, True where the query is a hit at ``ks[j]``.

    Why: recall@k is the mean of these columns (``retrieval``), and the rows are the test items
    a bootstrap resamples: image queries for image->text, caption queries for text->image.
    Hit rules as in ``retrieval``; results stay on the inputs' device. Exact over the whole
    gallery, computed ``chunk`` queries at a time (default: as many as fit 64 MiB of
    similarities), so a 100k-pair split never holds its N_images x N_texts matrix.
    """
    images, texts = _shared_space(image_emb, text_emb, "image_emb", "text_emb")
    n_images, n_texts = images.shape[0], texts.shape[0]
    owner = _as_index(text_to_image, n_texts, n_images).to(images.device)
    ks = [_check_int(k, "each k in ks") for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks}")
    if chunk is None:
        chunk = max(1, _RETRIEVAL_CELLS // max(n_images, n_texts))
    chunk = _check_int(chunk, "chunk")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of queries, got {chunk}")

    top_texts = _top(images, texts, min(max(ks), n_texts), chunk)
    rows = torch.arange(n_images, device=images.device)[:, None]
    i2t = _hits_at(owner[top_texts] == rows, ks)
    top_images = _top(texts, images, min(max(ks), n_images), chunk)
    t2i = _hits_at(top_images == owner[:, None], ks)
    return i2t, t2i


@torch.no_grad()
def retrieval(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk: int | None = None,
) -> dict[str, float]:
    """Image->text and text->image recall@k under cosine similarity, as in clip_benchmark.

    Why: the standard zero-shot retrieval score for a joint embedding space. An image query
    is a hit at k when ANY of its captions is among its top-k texts; a caption query is a hit
    at k when its image is among its top-k images. k larger than the gallery is clipped to the
    gallery size. An image with no caption can never be hit and counts as a miss (as in
    clip_benchmark). Returns ``{"i2t_r{k}": ..., "t2i_r{k}": ...}`` for each k in ``ks``;
    computed ``chunk`` queries at a time (``retrieval_hits``).
    """
    i2t, t2i = retrieval_hits(image_emb, text_emb, text_to_image, ks, chunk)
    i2t, t2i = i2t.to(torch.float32).mean(dim=0), t2i.to(torch.float32).mean(dim=0)
    out = {f"i2t_r{k}": i2t[j].item() for j, k in enumerate(ks)}
    return out | {f"t2i_r{k}": t2i[j].item() for j, k in enumerate(ks)}


def _wins(image_emb: ArrayLike, pos_emb: ArrayLike, neg_emb: ArrayLike) -> torch.Tensor:
    """cos(image_i, pos_i) > cos(image_i, neg_i) per row, as 0/1 in the inputs' promoted dtype
    (so the accuracy, their mean, is float64 exactly when an input is)."""
    image = F.normalize(_as_tensor(image_emb, "image_emb"), dim=1)
    pos = F.normalize(_as_tensor(pos_emb, "pos_emb"), dim=1)
    neg = F.normalize(_as_tensor(neg_emb, "neg_emb"), dim=1)
    if not image.shape == pos.shape == neg.shape:
        raise ValueError(
            "image_emb, pos_emb and neg_emb must all have the same [N, D] shape, got "
            f"{tuple(image.shape)}, {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(image.dtype, pos.dtype), neg.dtype)
    image = image.to(dtype)
    pos = pos.to(device=image.device, dtype=dtype)
    neg = neg.to(device=image.device, dtype=dtype)
    return ((image * pos).sum(dim=1) > (image * neg).sum(dim=1)).to(dtype)


@torch.no_grad()
def hard_negative_wins(
    image_emb: ArrayLike, pos_emb: ArrayLike, neg_emb: ArrayLike
) -> torch.Tensor:
    """Boolean ``[N]``: row i's image is strictly closer (cosine) to pos_i than to neg_i.

    Why: the per-item outcomes behind ``hard_negative_accuracy``, for bootstrap intervals.
    """
    return _wins(image_emb, pos_emb, neg_emb).bool()


@torch.no_grad()
def hard_negative_accuracy(image_emb: ArrayLike, pos_emb: ArrayLike, neg_emb: ArrayLike) -> float:
    """Fraction of rows i with cos(image_i, pos_i) > cos(image_i, neg_i) (ties count as misses).

    Why: probes whether the aligned space separates a true caption from a minimally edited
    (hard negative) one, which recall@k on random galleries cannot show.
    """
    return _wins(image_emb, pos_emb, neg_emb).mean().item()


# --------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def zeroshot_hits(
    image_latents: ArrayLike, class_latents: ArrayLike, labels: ArrayLike | Sequence[int]
) -> torch.Tensor:
    """Boolean ``[N]``: image i's most cosine-similar class embedding is class ``labels[i]``.

    Why: CLIP-style zero-shot classification (one embedding per class, e.g. the ensemble of its
    prompt templates); the per-image outcomes, for bootstrap intervals. Ties go to the lower
    class index (``argmax``). ``labels`` are class indices into the rows of ``class_latents``.
    """
    images, classes = _shared_space(image_latents, class_latents, "image_latents", "class_latents")
    n = images.shape[0]
    target = _as_index(labels, n, classes.shape[0], "labels", "image", "class")
    return (images @ classes.T).argmax(dim=1) == target.to(images.device)


@torch.no_grad()
def zeroshot_accuracy(
    image_latents: ArrayLike, class_latents: ArrayLike, labels: ArrayLike | Sequence[int]
) -> float:
    """Fraction of images whose nearest class embedding (cosine) is their label's.

    Why: the understanding task the paper reports beside retrieval, on a shared space."""
    return zeroshot_hits(image_latents, class_latents, labels).to(torch.float32).mean().item()


# --------------------------------------------------------------------------- bootstrap

# Resamples drawn per chunk: at most this many [resamples x N] counts in memory at once.
_BOOTSTRAP_CELLS = 1 << 22


def bootstrap_interval(
    values: ArrayLike,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: ArrayLike | Sequence | None = None,
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean of per-item ``values`` over their N items.

    Why: a test score is the mean of per-item outcomes (a retrieval hit, a hard-negative win,
    a reconstruction error), so resampling the items with replacement shows how much the score
    would move on another test set of the same size. ``values`` is ``[N]`` (returns two floats)
    or ``[N, M]`` (M metrics over the same items, resampled together; returns two ``[M]``
    arrays). Seeded, so the same N draws the same resamples (paired across models); each
    resample is a multinomial count vector over the items, and the means are one matrix
    product per chunk of resamples. Only for item-level metrics: set-level ones (kNN, CKA)
    are distorted by the duplicated rows of a resample (see ``half_sample_interval``).

    ``groups`` (``[N]`` labels, e.g. each caption's image id) makes it a cluster bootstrap:
    whole groups are drawn with replacement and a resample's mean is over all the items of the
    drawn groups. Items of one group (the captions of one image) are correlated, so resampling
    them one by one would understate the variance; with one item per group it is the plain
    bootstrap (the same draws when the labels are 0..N-1 in order).
    """
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if v.ndim not in (1, 2) or v.shape[0] == 0 or v.dtype == object:
        raise ValueError(f"values must be a non-empty numeric [N] or [N, M] array, got {v.shape}")
    resamples = _check_resampling(resamples, level, minimum=1)
    matrix = v.reshape(v.shape[0], -1).astype(np.float64)
    if not np.isfinite(matrix).all():
        raise NonFiniteError("values contains NaN or Inf")
    sums, sizes = _group_sums(matrix, groups)
    n = sums.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    means = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        # Flat bincount of offset draws: row r counts how often each group is drawn in resample r.
        draws = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n)
        means.append(counts @ sums / (counts @ sizes)[:, None])
    tail = (1 - float(level)) / 2
    lo, hi = np.quantile(np.concatenate(means), [tail, 1 - tail], axis=0)
    return (float(lo[0]), float(hi[0])) if v.ndim == 1 else (lo, hi)


def _group_sums(
    matrix: np.ndarray, groups: ArrayLike | Sequence | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums ``[G, M]`` of the rows of ``matrix`` and group sizes ``[G]`` (groups in
    sorted label order); every row its own group when ``groups`` is None."""
    n = matrix.shape[0]
    if groups is None:
        return matrix, np.ones(n)
    g = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape [{n}] (one label per item), got {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1)
    k = int(inverse.max()) + 1
    sums = np.zeros((k, matrix.shape[1]))
    np.add.at(sums, inverse, matrix)
    return sums, np.bincount(inverse, minlength=k).astype(np.float64)


def half_sample_interval(
    statistic: Callable[[np.ndarray], ArrayLike | float],
    n: int,
    full: ArrayLike | float,
    resamples: int = 50,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Interval of a set-level statistic of N rows from ``resamples`` seeded random halves.

    ``statistic(rows)`` scores the rows ``rows`` (indices into the N, sorted, no repeats) and
    returns a float or ``[M]`` values; ``full`` is its value on all N rows. The interval is
    ``full + c * percentiles(half - mean(halves))`` with ``c = sqrt(m / (N - m))``, m = N // 2.

    Why: kNN and kernel metrics (mutual kNN, CKA, CKNNA, SVCCA) have no per-item outcome, and
    a with-replacement bootstrap duplicates rows, which then are each other's nearest
    neighbours and inflate the metric. Halves drawn without replacement never repeat a row.
    Centring on the halves' own mean removes the metric's dependence on N (CKA's small-sample
    bias, kNN overlap that changes with N), keeping only their spread; and the spread of a
    without-replacement subsample of m rows around the full value has variance
    ``(1/m - 1/N) s^2`` for a mean (finite-population correction), ``s^2 / N`` exactly when
    m = N/2: half-sampling (the delete-N/2 jackknife) estimates the full sample's own variance
    for root-N statistics, and ``c`` (1 for even N) corrects odd N. With the default 50 halves
    the 2.5 / 97.5% tails are interpolated between a few extreme halves: a rough interval, but
    its cost is ``resamples`` evaluations on N/2 rows (about resamples/4 full ones for O(N^2)
    metrics). Deterministic in ``(N, seed)``, so models scored on the same images draw the
    same halves.
    """
    n = _check_int(n, "n")
    if n < 2:
        raise ValueError(f"half-sampling needs N >= 2 rows, got N={n}")
    resamples = _check_resampling(resamples, level, minimum=2)
    m = n // 2
    rng = np.random.default_rng(seed)
    halves = np.stack(
        [
            np.asarray(statistic(np.sort(rng.permutation(n)[:m])), dtype=np.float64).reshape(-1)
            for _ in range(resamples)
        ]
    )
    center = np.asarray(full, dtype=np.float64).reshape(-1)
    spread = (halves - halves.mean(axis=0)) * np.sqrt(m / (n - m))
    tail = (1 - float(level)) / 2
    lo, hi = center + np.quantile(spread, [tail, 1 - tail], axis=0)
    return (float(lo[0]), float(hi[0])) if np.ndim(full) == 0 else (lo, hi)
