"""JAM model: layout, modes, persistence, logit scale, dtypes, and that it can learn to align."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from raysys.errors import ConfigError
from raysys.jam import JAM, JAMConfig, losses
from raysys.jam.model import Block, SwiGLU

SMALL = {"d_image": 12, "d_text": 10, "hidden": (16, 8), "latent": 6}


def _model(**kw) -> JAM:
    torch.manual_seed(0)
    return JAM(JAMConfig(**{**SMALL, **kw}))


def _inputs(b: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, SMALL["d_image"], generator=g), torch.randn(
        b, SMALL["d_text"], generator=g
    )


def test_forward_shapes_and_cross() -> None:
    m = _model().eval()
    img, txt = _inputs()
    out = m(img, txt)
    assert set(out) == {"zi", "zt", "image_hat", "text_hat", "image_target", "text_target"}
    assert out["zi"].shape == out["zt"].shape == (5, SMALL["latent"])
    assert out["image_hat"].shape == img.shape and out["text_hat"].shape == txt.shape
    cross = m(img, txt, cross=True)
    assert cross["text_from_image"].shape == txt.shape
    assert cross["image_from_text"].shape == img.shape
    torch.testing.assert_close(cross["text_from_image"], m.decode_text(out["zi"]))


def test_negatives_are_encoded_with_the_captions_but_never_decoded() -> None:
    m = _model().eval()
    img, txt = _inputs()
    m.fit_input_stats(3 * img + 1, 2 * txt - 1)  # a standardisation that is no identity
    neg = txt.flip(0) + 0.3
    out = m(img, txt, cross=True, negative=neg)
    plain = m(img, txt, cross=True)
    assert set(out) == set(plain) | {"zn"}
    torch.testing.assert_close(out["zn"], m.encode_text(neg))
    for key, value in plain.items():  # positives' outputs are those of a call without them
        assert value.shape == out[key].shape, key
        torch.testing.assert_close(out[key], value, msg=key)
    # targets are the standardised inputs, by hand
    torch.testing.assert_close(out["text_target"], (txt - m.text_mean) / m.text_std)


def test_encode_text_handles_negatives_with_extra_dims() -> None:
    m = _model().eval()
    _, txt = _inputs(b=6)
    grouped = m.encode_text(txt.view(2, 3, -1))
    assert grouped.shape == (2, 3, SMALL["latent"])
    torch.testing.assert_close(grouped.view(6, -1), m.encode_text(txt))


def _param_count(d_in: int, hidden: tuple[int, ...], d_out: int) -> int:
    """Per block: Linear(d,w) + LayerNorm(w) + SwiGLU Linear(w,2w); then a last Linear."""
    n, d = 0, d_in
    for w in hidden:
        n += (d * w + w) + 2 * w + (w * 2 * w + 2 * w)
        d = w
    return n + d * d_out + d_out


def test_layout_matches_spec() -> None:
    cfg = JAMConfig(**SMALL)
    m = JAM(cfg)
    enc = list(m.image.encoder)
    assert [type(x) for x in enc] == [Block, Block, nn.Linear]
    assert [b.linear.out_features for b in enc[:-1]] == list(cfg.hidden)
    assert all(isinstance(b.act, SwiGLU) and isinstance(b.norm, nn.LayerNorm) for b in enc[:-1])
    dec = list(m.text.decoder)
    assert [b.linear.out_features for b in dec[:-1]] == list(reversed(cfg.hidden))
    assert dec[-1].out_features == cfg.d_text
    want = sum(
        _param_count(d, cfg.hidden, cfg.latent) + _param_count(cfg.latent, cfg.hidden[::-1], d)
        for d in (cfg.d_image, cfg.d_text)
    )
    assert sum(p.numel() for p in m.parameters()) == want + 1  # + log logit scale


def test_eval_is_deterministic_train_uses_dropout() -> None:
    m = _model(dropout=0.5)
    img, txt = _inputs()
    m.eval()
    a, b = m(img, txt), m(img, txt)
    for key in a:
        assert torch.equal(a[key], b[key])
    m.train()
    assert not torch.equal(m.encode_image(img), m.encode_image(img))


def test_save_load_round_trip(tmp_path) -> None:
    m = _model(learn_logit_scale=True, logit_scale=30.0).eval()
    img, txt = _inputs()
    path = m.save(tmp_path / "jam")
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "config.json"}
    assert json.loads((path / "config.json").read_text())["hidden"] == list(SMALL["hidden"])
    back = JAM.load(path).eval()
    assert back.cfg == m.cfg
    assert torch.equal(back.encode_image(img), m.encode_image(img))
    assert torch.equal(back.encode_text(txt), m.encode_text(txt))
    assert torch.equal(back.logit_scale(), m.logit_scale())
    assert back.log_logit_scale.requires_grad


def test_load_rejects_missing_files_and_unknown_keys(tmp_path) -> None:
    with pytest.raises(ConfigError):
        JAM.load(tmp_path)
    path = _model().save(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "latnet": 3}))
    with pytest.raises(ConfigError, match="latnet"):
        JAM.load(path)


@pytest.mark.parametrize(
    "bad", [{"latent": 0}, {"hidden": (8, -1)}, {"dropout": 1.0}, {"logit_scale": 0.0}]
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ConfigError):
        JAMConfig(**{**SMALL, **bad})


def test_logit_scale_default_clamp_and_learnable() -> None:
    frozen = _model()
    assert frozen.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert not frozen.log_logit_scale.requires_grad

    capped = _model(logit_scale=500.0, max_logit_scale=100.0)
    assert capped.logit_scale().item() == pytest.approx(100.0, rel=1e-6)

    m = _model(learn_logit_scale=True)
    img, txt = _inputs(b=8)
    out = m(img, txt)
    losses.con(out["zi"], out["zt"], m.logit_scale()).backward()
    grad = m.log_logit_scale.grad
    assert grad is not None and grad.abs().item() > 0


def test_float16_inputs_are_cast() -> None:
    m = _model().eval()
    img, txt = _inputs()
    img16, txt16 = img.half(), txt.half()
    out = m(img16, txt16)
    assert out["zi"].dtype == torch.float32
    torch.testing.assert_close(out["zi"], m.encode_image(img16.float()))
    torch.testing.assert_close(out["zt"], m.encode_text(txt16.float()))


def _views(n: int, g: torch.Generator, maps: tuple[torch.Tensor, torch.Tensor]):
    u = torch.randn(n, maps[0].shape[0], generator=g)
    noise = 0.05
    return (
        u @ maps[0] + noise * torch.randn(n, maps[0].shape[1], generator=g),
        u @ maps[1] + noise * torch.randn(n, maps[1].shape[1], generator=g),
    )


def _retrieval_acc(m: JAM, img: torch.Tensor, txt: torch.Tensor) -> float:
    with torch.no_grad():
        zi = torch.nn.functional.normalize(m.encode_image(img), dim=-1)
        zt = torch.nn.functional.normalize(m.encode_text(txt), dim=-1)
    hits = (zi @ zt.T).argmax(dim=1) == torch.arange(len(img))
    return hits.float().mean().item()


def test_con_training_aligns_two_views() -> None:
    """Two random linear views of one latent: InfoNCE training should make them retrievable."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    k, d_img, d_txt = 8, 32, 24
    maps = (torch.randn(k, d_img, generator=g), torch.randn(k, d_txt, generator=g))
    m = JAM(JAMConfig(d_image=d_img, d_text=d_txt, hidden=(64,), latent=16, dropout=0.0))
    test_img, test_txt = _views(256, g, maps)
    chance = 1 / len(test_img)
    before = _retrieval_acc(m.eval(), test_img, test_txt)

    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(300):
        img, txt = _views(128, g, maps)
        out = m(img, txt)
        loss = losses.con(out["zi"], out["zt"], m.logit_scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _retrieval_acc(m.eval(), test_img, test_txt)
    assert after > max(50 * chance, before + 0.3), (before, after)
    assert math.isfinite(loss.item())


def test_input_standardisation_is_fitted_saved_and_applied(tmp_path) -> None:
    torch.manual_seed(0)
    m = _model().eval()
    img, txt = _inputs()
    img, txt = img * 50 + 7, txt * 0.01 - 3  # wildly different scales per modality
    m.fit_input_stats(img, txt)
    out = m(img, txt)
    for key in ("image_target", "text_target"):
        assert out[key].mean(0).abs().max() < 1e-4
        assert (out[key].std(0) - 1).abs().max() < 1e-4
    # The stats travel with the model: a reloaded copy encodes raw embeddings identically.
    loaded = JAM.load(m.save(tmp_path / "m")).eval()
    torch.testing.assert_close(loaded.encode_image(img), m.encode_image(img))
    torch.testing.assert_close(loaded.encode_text(txt), out["zt"])
