"""JAM losses against open_clip and against independent loop-by-loop reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from raysys.jam import losses

# float64 throughout the equality tests: differences are then pure summation-order noise.
TOL64 = 1e-10


def _rand(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# --- hand-built batch: B=4, D=3, every negative close to (but not equal to) its positive -------

IMAGES = [[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [-0.2, 0.1, 1.0], [0.7, -0.6, 0.2]]
POS = [[0.9, 0.3, 0.1], [0.0, 0.8, 0.5], [-0.1, 0.3, 0.9], [0.5, -0.8, 0.0]]
NEG = [[0.8, 0.1, -0.4], [0.4, 0.9, 0.1], [0.2, -0.2, 1.0], [0.9, -0.3, 0.3]]


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


Keys = list[int] | None  # row i's image; None = every row its own image


def _other_of_same(keys: Keys, i: int, j: int) -> bool:
    """Rows i != j show one image: neither is the other's negative."""
    return keys is not None and i != j and keys[i] == keys[j]


def _ref_t2i(v: list[list[float]], t: list[list[float]], s: float, keys: Keys = None) -> float:
    """Mean over captions of -log softmax over images, target the own image; other rows of
    the caption's own image are no candidates."""
    total = 0.0
    for i in range(len(t)):
        num = math.exp(s * _dot(t[i], v[i]))
        den = sum(
            math.exp(s * _dot(t[i], v[j])) for j in range(len(v)) if not _other_of_same(keys, i, j)
        )
        total += -math.log(num / den)
    return total / len(t)


def _ref_con(images, pos, s: float, keys: Keys = None) -> float:
    v, t = ([_unit(x) for x in rows] for rows in (images, pos))
    return 0.5 * (_ref_t2i(t, v, s, keys) + _ref_t2i(v, t, s, keys))


def _ref_negcon(images, pos, neg, s: float, keys: Keys = None) -> float:
    v, t, n = ([_unit(x) for x in rows] for rows in (images, pos, neg))
    i2t = 0.0
    for i in range(len(v)):
        den = sum(
            math.exp(s * _dot(v[i], t[j])) for j in range(len(t)) if not _other_of_same(keys, i, j)
        )
        den += sum(math.exp(s * _dot(v[i], c)) for c in n)  # hard negatives always count
        i2t += -math.log(math.exp(s * _dot(v[i], t[i])) / den)
    return 0.5 * (i2t / len(v) + _ref_t2i(v, t, s, keys))


def _ref_context(t: list[list[float]], i: int, k: int, keys: Keys = None) -> list[int]:
    """Indices into positives of the k other captions most cosine-similar to t_i, none of
    t_i's own image."""
    others = (j for j in range(len(t)) if j != i and not _other_of_same(keys, i, j))
    return sorted(others, key=lambda j: -_dot(t[i], t[j]))[:k]


def _ref_spread(images, pos, neg, s: float, alpha: float, k: int, keys: Keys = None) -> float:
    v, t, n = ([_unit(x) for x in rows] for rows in (images, pos, neg))
    img = 0.0
    for i in range(len(v)):
        candidates = [t[j] for j in range(len(t)) if not _other_of_same(keys, i, j)] + n
        context = [t[i], n[i]] + [t[j] for j in _ref_context(t, i, k, keys)]
        e_ctx = sum(math.exp(s * _dot(v[i], c)) for c in context)
        e_all = sum(math.exp(s * _dot(v[i], c)) for c in candidates)
        concon = -math.log(e_ctx / e_all)
        context_nce = -math.log(math.exp(s * _dot(v[i], t[i])) / e_ctx)
        img += (1 - alpha) * concon + alpha * context_nce
    return 0.5 * (img / len(v) + _ref_t2i(v, t, s, keys))


# --- con == open_clip ClipLoss ----------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_con_matches_open_clip(scale: float) -> None:
    zv, zt = _rand(16, 8, seed=0).requires_grad_(), _rand(16, 8, seed=1).requires_grad_()
    ours = losses.con(zv, zt, scale)
    (g_ours,) = torch.autograd.grad(ours, zv)
    ref = ClipLoss()(F.normalize(zv, dim=-1), F.normalize(zt, dim=-1), scale)
    (g_ref,) = torch.autograd.grad(ref, zv)
    assert ours.ndim == 0
    torch.testing.assert_close(ours, ref, atol=TOL64, rtol=0)
    torch.testing.assert_close(g_ours, g_ref, atol=TOL64, rtol=0)


def test_con_accepts_tensor_scale_and_float32() -> None:
    zv, zt = _rand(8, 5, seed=2).float(), _rand(8, 5, seed=3).float()
    s = torch.tensor(20.0)
    ref = ClipLoss()(F.normalize(zv, dim=-1), F.normalize(zt, dim=-1), s)
    torch.testing.assert_close(losses.con(zv, zt, s), ref, atol=1e-6, rtol=0)


# --- negcon / spread == loop references -------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_negcon_matches_reference(scale: float) -> None:
    got = losses.negcon(_t(IMAGES), _t(POS), _t(NEG), scale)
    assert got.item() == pytest.approx(_ref_negcon(IMAGES, POS, NEG, scale), abs=TOL64)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_spread_matches_reference(alpha: float, k: int, scale: float) -> None:
    got = losses.spread(_t(IMAGES), _t(POS), _t(NEG), scale, alpha=alpha, k=k)
    want = _ref_spread(IMAGES, POS, NEG, scale, alpha, k)
    assert got.item() == pytest.approx(want, abs=TOL64)


def test_context_mask_picks_nearest_other_positive() -> None:
    t = [_unit(x) for x in POS]
    mask = losses.context_mask(_t(POS), k=1)
    b = len(POS)
    for i in range(b):
        want = {i, b + i} | set(_ref_context(t, i, 1))
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == want


def test_spread_concon_is_multi_positive_infonce() -> None:
    """α=0, k=0: image term is -log((e^{v·t_i}+e^{v·n_i}) / Σ_all), written here with torch."""
    zv, zt, zn = _rand(6, 4, seed=4), _rand(6, 4, seed=5), _rand(6, 4, seed=6)
    s = 3.0
    v, t, n = (F.normalize(z, dim=-1) for z in (zv, zt, zn))
    pos, neg = s * (v * t).sum(-1), s * (v * n).sum(-1)
    all_ = s * v @ torch.cat([t, n]).T
    concon = (torch.logsumexp(all_, 1) - torch.logaddexp(pos, neg)).mean()
    t2i = F.cross_entropy(s * t @ v.T, torch.arange(6))
    got = losses.spread(zv, zt, zn, s, alpha=0.0, k=0)
    torch.testing.assert_close(got, 0.5 * (concon + t2i), atol=TOL64, rtol=0)


@pytest.mark.parametrize("k", [0, 2])
def test_spread_terms_telescope_to_negcon(k: int) -> None:
    """ConCon + ContextNCE = -log softmax over all captions, i.e. negcon's image term."""
    zv, zt, zn = _rand(8, 5, seed=7), _rand(8, 5, seed=8), _rand(8, 5, seed=9)
    s = 7.0
    t2i = F.cross_entropy(s * F.normalize(zt, dim=-1) @ F.normalize(zv, dim=-1).T, torch.arange(8))
    sp0 = losses.spread(zv, zt, zn, s, alpha=0.0, k=k)
    sp1 = losses.spread(zv, zt, zn, s, alpha=1.0, k=k)
    # sp0 + sp1 = ½(ConCon + ContextNCE) + t2i = ½·I + t2i, and negcon = ½(I + t2i).
    torch.testing.assert_close(
        sp0 + sp1, losses.negcon(zv, zt, zn, s) + 0.5 * t2i, atol=TOL64, rtol=0
    )
    # and the α mix is linear
    sp_mid = losses.spread(zv, zt, zn, s, alpha=0.25, k=k)
    torch.testing.assert_close(sp_mid, 0.75 * sp0 + 0.25 * sp1, atol=TOL64, rtol=0)


def test_spread_k_capped_at_batch() -> None:
    zv, zt, zn = _rand(5, 4, seed=10), _rand(5, 4, seed=11), _rand(5, 4, seed=12)
    capped = losses.spread(zv, zt, zn, 4.0, alpha=0.5, k=100)
    torch.testing.assert_close(capped, losses.spread(zv, zt, zn, 4.0, alpha=0.5, k=4))


def test_spread_selection_is_not_differentiated() -> None:
    """Gradients flow through the logits only; the k-NN choice is a constant."""
    zt = _rand(6, 4, seed=13).requires_grad_()
    mask = losses.context_mask(zt, k=2)
    assert not mask.requires_grad


# --- numerical stability ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["con", "negcon", "spread"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_scale_nearly_identical_vectors_finite(name: str, dtype: torch.dtype) -> None:
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    jitter = 1e-3 * _rand(3, 8, 4, seed=14).float()
    zv, zt, zn = ((base + j).to(dtype).requires_grad_() for j in jitter)
    s = 1e4
    if name == "con":
        loss = losses.con(zv, zt, s)
    elif name == "negcon":
        loss = losses.negcon(zv, zt, zn, s)
    else:
        loss = losses.spread(zv, zt, zn, s, alpha=0.5, k=2)
    loss.backward()
    assert loss.dtype == torch.float32  # half inputs are upcast for the softmax
    assert torch.isfinite(loss)
    for z in (zv, zt, zn):
        if z.grad is not None:
            assert torch.isfinite(z.grad).all()
    assert zv.grad is not None and zv.grad.abs().sum() > 0


# --- reconstruction / schedule ----------------------------------------------------------------


def test_reconstruction_is_elementwise_mse() -> None:
    x, x_hat = _rand(4, 3, seed=15), _rand(4, 3, seed=16)
    pairs = zip(x.flatten().tolist(), x_hat.flatten().tolist(), strict=True)
    want = sum((a - b) ** 2 for a, b in pairs) / x.numel()
    assert losses.reconstruction(x, x_hat).item() == pytest.approx(want, abs=TOL64)
    # float16 targets (embedding caches) are compared in the prediction's dtype
    got = losses.reconstruction(x.half(), x_hat.float())
    assert got.dtype == torch.float32


def test_lambda_schedule_linear_endpoints_and_clamp() -> None:
    total, start, end = 11, 1.0, 0.1
    values = [losses.lambda_schedule(i, total, start, end) for i in range(total)]
    assert values[0] == pytest.approx(start)
    assert values[-1] == pytest.approx(end)
    steps = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    assert all(d == pytest.approx((end - start) / (total - 1)) for d in steps)
    assert losses.lambda_schedule(-5, total, start, end) == pytest.approx(start)
    assert losses.lambda_schedule(10 * total, total, start, end) == pytest.approx(end)
    assert losses.lambda_schedule(0, 1, start, end) == pytest.approx(start)


# --- float32 inside a bf16 autocast region (the training step's, on a GPU) --------------------

AUTOCAST_LOSSES = {
    "con": lambda v, t, n, s: losses.con(v, t, s),
    "negcon": losses.negcon,
    "spread": lambda v, t, n, s: losses.spread(v, t, n, s, alpha=0.7, k=8),
}


def _latents(aligned: bool, b: int = 256, d: int = 64) -> list[torch.Tensor]:
    """Random latents, or nearly aligned ones (what training produces): captions within a
    few degrees of their image, hard negatives a little further."""
    v = _rand(b, d, seed=1).float()
    if not aligned:
        return [v, _rand(b, d, seed=2).float(), _rand(b, d, seed=3).float()]
    t = v + 0.05 * _rand(b, d, seed=2).float()
    n = v + 0.15 * _rand(b, d, seed=3).float()
    return [v, t, n]


def _value_and_grads(fn, tensors: list[torch.Tensor], s: float, autocast: bool):
    leaves = [x.clone().requires_grad_(True) for x in tensors]
    region = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with region:
        loss = fn(*leaves, s)
    loss.backward()
    return loss.detach(), torch.cat([x.grad.flatten() for x in leaves if x.grad is not None])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("aligned", [False, True], ids=["random", "aligned"])
@pytest.mark.parametrize("s", [14.3, 100.0])
@pytest.mark.parametrize("name", sorted(AUTOCAST_LOSSES))
def test_each_loss_is_float32_inside_a_bf16_autocast_region(name, s, aligned):
    tensors = _latents(aligned)
    fn = AUTOCAST_LOSSES[name]
    loss32, grad32 = _value_and_grads(fn, tensors, s, autocast=False)
    loss_ac, grad_ac = _value_and_grads(fn, tensors, s, autocast=True)
    assert loss_ac.dtype == torch.float32
    assert abs(float(loss_ac - loss32)) <= 1e-4 * abs(float(loss32)) + 1e-7
    assert _rel(grad_ac, grad32) <= 1e-3


def test_without_the_float32_guard_bf16_autocast_loses_spread():
    """The case the guard exists for: nearly aligned latents at s = 100, where Spread's two
    log-sum-exps in bf16 differ by less than bf16 resolves."""
    tensors = _latents(aligned=True)
    raw = losses.spread.__wrapped__  # the loss body without `in_float32`

    def spread(v, t, n, s):
        return raw(v, t, n, s, alpha=0.7, k=8)

    loss32, grad32 = _value_and_grads(spread, tensors, 100.0, autocast=False)
    loss_ac, grad_ac = _value_and_grads(spread, tensors, 100.0, autocast=True)
    assert abs(float(loss_ac - loss32)) > 1e-3 * abs(float(loss32)) or _rel(grad_ac, grad32) > 1e-2


def test_reconstruction_is_float32_inside_a_bf16_autocast_region():
    x = _rand(256, 512, seed=4).float()
    x_hat = x + 0.01 * _rand(256, 512, seed=5).float()
    plain = losses.reconstruction(x.half(), x_hat)  # a float16 target, as the cache stores it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded = losses.reconstruction(x.half(), x_hat)
    assert guarded.dtype == torch.float32
    assert abs(float(guarded - plain)) <= 1e-6 * float(plain)


# --- Spread's defaults: the authors' context variant, not a re-weighted NegCon ----------------


def _negcon_terms(zv: torch.Tensor, zt: torch.Tensor, zn: torch.Tensor, s: float) -> list[float]:
    """NegCon's two terms, written here: CE(image → positives and negatives), CE(text → image)."""
    v, t, n = (F.normalize(z, dim=-1) for z in (zv, zt, zn))
    y = torch.arange(len(v))
    i2t = F.cross_entropy(s * v @ torch.cat([t, n]).T, y)
    t2i = F.cross_entropy(s * t @ v.T, y)
    return [float(i2t), float(t2i)]


def _hard_batches(count: int, b: int = 16, d: int = 8) -> list[list[torch.Tensor]]:
    """Batches where captions cluster (so the K nearest differ from random captions) and each
    hard negative lies near its positive."""
    out = []
    for seed in range(count):
        centres = _rand(4, d, seed=100 + seed)
        t = centres.repeat(b // 4, 1) + 0.4 * _rand(b, d, seed=200 + seed)
        v = t + 0.5 * _rand(b, d, seed=300 + seed)
        n = t + 0.3 * _rand(b, d, seed=400 + seed)
        out.append([v, t, n])
    return out


def _lstsq_residual(batches, fn, s: float) -> tuple[torch.Tensor, float]:
    """Best (a, b) with fn ≈ a·i2t_negcon + b·t2i over the batches, and the largest miss."""
    x = torch.tensor([_negcon_terms(*z, s) for z in batches], dtype=torch.float64)
    y = torch.tensor([[float(fn(*z, s))] for z in batches], dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y).solution
    return coef.flatten(), float((x @ coef - y).abs().max())


def test_default_spread_is_no_reweighting_of_negcon() -> None:
    batches, s = _hard_batches(8), 1 / 0.07
    # control: at α = 0.5 one (a, b) = (¼, ½) fits every batch, so the check has power
    coef, miss = _lstsq_residual(batches, lambda v, t, n, s: losses.spread(v, t, n, s, 0.5, 8), s)
    assert miss < 1e-12
    torch.testing.assert_close(coef, torch.tensor([0.25, 0.5], dtype=torch.float64))
    # the defaults (α = 0.7, K = 8): the best (a, b) still misses some batch by ~0.01
    _, miss = _lstsq_residual(batches, losses.spread, s)
    assert miss > 2e-3
    # and K matters at the defaults
    v, t, n = batches[0]
    assert abs(float(losses.spread(v, t, n, s) - losses.spread(v, t, n, s, k=0))) > 1e-3
    want = _ref_spread(*(z.tolist() for z in batches[0]), s, alpha=0.7, k=8)
    assert losses.spread(v, t, n, s).item() == pytest.approx(want, abs=TOL64)


# --- several captions of one image in a batch -------------------------------------------------

KEYS = [0, 0, 1, 2, 2, 2, 3, 4]  # rows 0-1 and 3-5 show one image each


def _same(keys: list[int]) -> torch.Tensor:
    k = torch.tensor(keys)
    return k[:, None] == k[None, :]


def _batch(seed: int, b: int = len(KEYS), d: int = 5) -> list[torch.Tensor]:
    return [_rand(b, d, seed=seed + i) for i in range(3)]


MASKED = {
    "con": lambda v, t, n, s, same: losses.con(v, t, s, same=same),
    "negcon": lambda v, t, n, s, same: losses.negcon(v, t, n, s, same=same),
    "spread": lambda v, t, n, s, same: losses.spread(v, t, n, s, same=same),
    "spread_k2": lambda v, t, n, s, same: losses.spread(v, t, n, s, alpha=0.3, k=2, same=same),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_same_without_other_rows_of_an_image_changes_nothing(name: str) -> None:
    v, t, n = _batch(20)
    b = len(v)
    plain = MASKED[name](v, t, n, 4.0, None)
    for same in (torch.eye(b, dtype=torch.bool), torch.zeros(b, b, dtype=torch.bool)):
        torch.testing.assert_close(MASKED[name](v, t, n, 4.0, same), plain, atol=0, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_masked_losses_match_the_loop_reference(scale: float) -> None:
    v, t, n = _batch(30)
    same = _same(KEYS)
    rows = [z.tolist() for z in (v, t, n)]
    want = {
        "con": _ref_con(rows[0], rows[1], scale, KEYS),
        "negcon": _ref_negcon(*rows, scale, KEYS),
        "spread": _ref_spread(*rows, scale, 0.7, 8, KEYS),  # K above the 6 candidates of 3-5
        "spread_k2": _ref_spread(*rows, scale, 0.3, 2, KEYS),
    }
    for name, fn in MASKED.items():
        got = fn(v, t, n, scale, same)
        assert got.item() == pytest.approx(want[name], abs=TOL64), name
        assert abs(got.item() - fn(v, t, n, scale, None).item()) > 1e-3, name  # mask matters


def test_context_never_picks_a_caption_of_the_same_image() -> None:
    _, t, _ = _batch(40)
    b = len(KEYS)
    units = [_unit(x) for x in t.tolist()]
    for k in (1, 3, 7):
        mask = losses.context_mask(t, k, _same(KEYS))
        for i in range(b):
            want = {i, b + i} | set(_ref_context(units, i, k, KEYS))
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == want, (k, i)


def _orthonormal_complement(rows: torch.Tensor) -> torch.Tensor:
    """Columns spanning the space orthogonal to every row of ``rows``."""
    q, _ = torch.linalg.qr(torch.cat([rows.T, torch.eye(rows.shape[1], dtype=rows.dtype)], 1))
    return q[:, rows.shape[0] :]


@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_loss_ignores_how_a_same_image_caption_sits_to_that_image(name: str) -> None:
    """Rows 0 and 1 show one image (their latents differ, as dropout makes them). Turn
    caption 1 so that only its similarity to image 0 and caption 0 changes: every other
    cosine it enters (images 1-3, captions 2-3) stays put. The masked loss must not move; the
    unmasked one, which counts caption 1 as a negative of image 0, does."""
    b, d, s = 4, 8, 5.0
    v, t, n = (F.normalize(z, dim=-1) for z in (_rand(b, d, seed=s_) for s_ in (50, 51, 52)))
    keep = torch.cat([v[1:], t[2:]])  # what caption 1's other cosines are taken with
    basis = _orthonormal_complement(keep)  # [d, d - 5]
    inside = t[1] - basis @ (basis.T @ t[1])  # the part of t_1 those cosines see
    away = basis @ (basis.T @ v[0])  # turn what is left towards image 0, same length
    turned = t.clone()
    turned[1] = inside + (t[1] - inside).norm() * F.normalize(away, dim=0)
    assert float(turned[1].norm()) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(turned[1] @ v[0] - t[1] @ v[0])) > 0.05  # the masked pair does move
    same = _same([0, 0, 1, 2])
    fn = MASKED[name]
    torch.testing.assert_close(fn(v, turned, n, s, same), fn(v, t, n, s, same), atol=TOL64, rtol=0)
    assert abs(float(fn(v, turned, n, s, None) - fn(v, t, n, s, None))) > 1e-3


@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_gradients_are_finite_at_a_large_scale(name: str) -> None:
    """-inf logits must leave no NaN behind (softmax weight 0, not inf - inf)."""
    v, t, n = (z.requires_grad_() for z in _batch(60))
    loss = MASKED[name](v, t, n, 100.0, _same(KEYS))
    loss.backward()
    for z in (v, t) if name == "con" else (v, t, n):
        assert z.grad is not None and torch.isfinite(z.grad).all()
