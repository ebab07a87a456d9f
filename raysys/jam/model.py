"""The JAM model: one small autoencoder per modality on top of frozen embeddings.

JAM (Joint Autoencoder Modulator, arXiv 2507.01201) never touches the backbones: it reads
pre-computed image and text embeddings, encodes each into a shared latent space where the
contrastive losses align the two modalities, and decodes back so a reconstruction loss keeps
the latent faithful to what the frozen model knew.

Layout of one autoencoder (``d_in`` is the backbone's embedding width)::

    encoder: d_in -> [Block(h) for h in hidden] -> Linear(-> latent)
    decoder: latent -> [Block(h) for h in reversed(hidden)] -> Linear(-> d_in)

where every hidden ``Block(width)`` is ``Linear(d_prev, width) -> LayerNorm(width) ->
SwiGLU(width) -> Dropout``. The SwiGLU owns its gate projection: ``Linear(width, 2*width)``,
split into halves ``a, b``, output ``silu(a) * b``; so a block maps ``d_prev -> width`` and the
next block's ``Linear`` sees exactly ``width`` features. The last projections (to the latent and
back to ``d_in``) are plain ``Linear`` layers so latents and reconstructions are unbounded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from raysys.errors import ConfigError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class JAMConfig:
    """Shape and temperature of a JAM model; everything needed to rebuild it from disk."""

    d_image: int
    d_text: int
    hidden: tuple[int, ...] = (512, 512, 512)
    latent: int = 256
    dropout: float = 0.1
    logit_scale: float = 1 / 0.07
    learn_logit_scale: bool = False
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        # JSON round-trips tuples as lists; normalise so equality and hashing behave.
        self.hidden = tuple(int(h) for h in self.hidden)
        for name in ("d_image", "d_text", "latent"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(
                    f"JAMConfig.{name} must be a positive int, got {getattr(self, name)!r}"
                )
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"JAMConfig.hidden widths must be positive, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"JAMConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (self.logit_scale > 0 and self.max_logit_scale > 0):
            raise ConfigError(
                "JAMConfig.logit_scale and max_logit_scale must be > 0, got "
                f"{self.logit_scale!r} and {self.max_logit_scale!r}"
            )

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> JAMConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so typos are not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown JAMConfig keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**d)


class SwiGLU(nn.Module):
    """``silu(a) * b`` with ``[a, b] = Linear(width, 2*width)(x)``: width in, width out.

    Keeping the gate projection inside the activation lets a block's output width equal its
    nominal layer width, so stacking blocks needs no bookkeeping.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return F.silu(a) * b


def step_seed(seed: int, step: int) -> int:
    """The dropout seed of one training step: a member's masks then depend on its seed and the
    step alone, not on how many draws the steps before made (a population makes some that a
    member alone would not: cross-reconstruction decodes that only other members use), and a
    resumed run draws what an uninterrupted one would."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keep_mask(
    shape: torch.Size, p: float | torch.Tensor, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Which units inverted dropout at rate `p` keeps, drawn from `generator` alone: the one
    rule `JAM` and `Population` share, so a member's masks are its own seed's."""
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype) >= p


class Dropout(nn.Module):
    """Inverted dropout whose masks come from the model's own generator once it has one
    (`JAM.seed_dropout`), not from torch's global one: a population draws each member's masks
    from that member's generator, so a member trains as it would alone, whichever members it
    is stacked with. Without a generator it is `nn.Dropout`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.generator is None:
            return F.dropout(x, self.p, training=True)
        return x * keep_mask(x.shape, self.p, self.generator, x) / (1 - self.p)


class Block(nn.Module):
    """One dense hidden layer: Linear -> LayerNorm -> SwiGLU -> Dropout."""

    def __init__(self, d_in: int, width: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, width)
        self.norm = nn.LayerNorm(width)
        self.act = SwiGLU(width)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.norm(self.linear(x))))


def _mlp(d_in: int, hidden: tuple[int, ...], d_out: int, dropout: float) -> nn.Sequential:
    """Blocks through ``hidden`` then a plain Linear to ``d_out``."""
    layers: list[nn.Module] = []
    d = d_in
    for width in hidden:
        layers.append(Block(d, width, dropout))
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """A mirrored encoder/decoder pair for one modality."""

    def __init__(self, d_in: int, hidden: tuple[int, ...], latent: int, dropout: float) -> None:
        super().__init__()
        self.encoder = _mlp(d_in, hidden, latent, dropout)
        self.decoder = _mlp(latent, tuple(reversed(hidden)), d_in, dropout)


class Autoencoding(Protocol):
    """What `autoencode` needs of a model: per modality, standardise, encode, decode."""

    def standardize(self, modality: str, x: torch.Tensor) -> torch.Tensor: ...
    def encode_standardized(self, modality: str, x: torch.Tensor) -> torch.Tensor: ...
    def decode(self, modality: str, z: torch.Tensor) -> torch.Tensor: ...


def autoencode(
    model: Autoencoding,
    image: torch.Tensor,
    text: torch.Tensor,
    cross: bool,
    negative: torch.Tensor | None,
    dim: int,
) -> dict[str, torch.Tensor]:
    """The forward of `JAM` (rows along `dim` 0) and of a stacked population (`dim` 1, after
    the members): see `JAM.forward`. Negatives go through the text encoder in the same pass
    as the captions and are never decoded."""
    image, text = model.standardize("image", image), model.standardize("text", text)
    zi = model.encode_standardized("image", image)
    if negative is None:
        zt = model.encode_standardized("text", text)
    else:
        b = text.shape[dim]
        both = torch.cat([text, model.standardize("text", negative)], dim=dim)
        zt, zn = model.encode_standardized("text", both).split([b, negative.shape[dim]], dim=dim)
    out = {
        "zi": zi,
        "zt": zt,
        "image_target": image,
        "text_target": text,
        "image_hat": model.decode("image", zi),
        "text_hat": model.decode("text", zt),
    }
    if negative is not None:
        out["zn"] = zn
    if cross:
        out["text_from_image"] = model.decode("text", zi)
        out["image_from_text"] = model.decode("image", zt)
    return out


class JAM(nn.Module):
    """Joint Autoencoder Modulator: image and text autoencoders sharing a latent space.

    Latents returned by :meth:`encode_image` / :meth:`encode_text` are raw (not normalised);
    the losses normalise them, so the decoders see the unnormalised latent and the contrastive
    geometry only constrains its direction.
    """

    def __init__(self, cfg: JAMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = Autoencoder(cfg.d_image, cfg.hidden, cfg.latent, cfg.dropout)
        self.text = Autoencoder(cfg.d_text, cfg.hidden, cfg.latent, cfg.dropout)
        # The log is stored (as CLIP does) so a learnt scale stays positive and its updates are
        # multiplicative; frozen unless the config asks to learn it.
        self.log_logit_scale = nn.Parameter(
            torch.tensor(math.log(cfg.logit_scale)), requires_grad=cfg.learn_logit_scale
        )
        # Per-feature input standardisation, fitted on the training split. Backbone layers
        # differ in scale by orders of magnitude (an early conv block vs a 1280-d head), so
        # without it the reconstruction term would be dominated by a few loud features. Kept
        # as buffers so a saved model encodes raw backbone embeddings on its own.
        for name, dim in (("image", cfg.d_image), ("text", cfg.d_text)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        # Where dropout masks come from once `seed_dropout` is called (torch's global
        # generator until then).
        self._generator: torch.Generator | None = None
        self._dropout_seed = 0

    def seed_dropout(self, seed: int, device: torch.device | str | None = None) -> None:
        """Draw every dropout mask from one generator, reseeded from `seed` at each training
        step (`dropout_step`), in the order the forward pass meets the blocks: as a population
        member's are drawn. A generator does not follow `.to()`: it is made on `device`, by
        default where the weights are now, so seed after moving the model."""
        self._dropout_seed = seed
        self._generator = torch.Generator(device=device or next(self.parameters()).device)
        for module in self.modules():
            if isinstance(module, Dropout):
                module.generator = self._generator
        self.dropout_step(0)

    def dropout_step(self, step: int) -> None:
        """Reseed the dropout generator for training step `step` (a no-op when unseeded)."""
        if self._generator is not None:
            self._generator.manual_seed(step_seed(self._dropout_seed, step))

    @torch.no_grad()
    def fit_input_stats(self, image: torch.Tensor, text: torch.Tensor) -> None:
        """Set the standardisation from training embeddings (call once, before training)."""
        stats = {}
        for name, x in (("image", image), ("text", text)):
            x = x.to(self.image_mean.device, torch.float64)
            stats[name] = (x.mean(0), x.std(0))
        self.set_input_stats(*stats["image"], *stats["text"])

    def set_input_stats(
        self,
        image_mean: torch.Tensor,
        image_std: torch.Tensor,
        text_mean: torch.Tensor,
        text_std: torch.Tensor,
    ) -> None:
        """Set the standardisation from moments computed elsewhere (e.g. across DDP ranks)."""
        for name, mean, std in (("image", image_mean, image_std), ("text", text_mean, text_std)):
            getattr(self, f"{name}_mean").copy_(mean)
            # Floor near-constant features (dead CNN channels): a tiny train-split std would
            # blow any held-out deviation up into a huge standardised value.
            floor = max(0.1 * float(std.median()), 1e-6)
            getattr(self, f"{name}_std").copy_(std.clamp(min=floor))

    def standardize_image(self, x: torch.Tensor) -> torch.Tensor:
        """Raw image embeddings -> the standardised space the image autoencoder works in."""
        return self.standardize("image", x)

    def standardize_text(self, x: torch.Tensor) -> torch.Tensor:
        """Raw text embeddings -> the standardised space the text autoencoder works in."""
        return self.standardize("text", x)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding caches are often float16; run in the model's own dtype."""
        dtype = self.log_logit_scale.dtype
        return x if x.dtype == dtype else x.to(dtype)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[..., d_image]`` -> raw latents ``[..., latent]``."""
        return self.encode_standardized("image", self.standardize("image", x))

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``[..., d_text]`` -> raw latents; captions and hard negatives alike."""
        return self.encode_standardized("text", self.standardize("text", x))

    def decode_image(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> standardised image-embedding space ``[..., d_image]``."""
        return self.decode("image", z)

    def decode_text(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> standardised text-embedding space ``[..., d_text]``."""
        return self.decode("text", z)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        cross: bool = False,
        negative: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode both modalities and reconstruct each from its own latent.

        Reconstructions live in the standardised-feature space (each input feature less its
        train-split mean, over its train-split std; :meth:`standardize_image`); ``image_target``
        and ``text_target`` are the inputs in that space, ready for the reconstruction loss.

        ``negative`` (hard-negative captions, as ``text``) is encoded in the same text-encoder
        pass as ``text`` and returned as ``zn`` but never decoded: negatives serve the
        alignment terms only, as in the authors' loss (``½(MSE(image) + MSE(positive))``).

        With ``cross=True`` also decode each latent through the *other* modality's decoder
        (``text_from_image``, ``image_from_text``; positives only), which is only meaningful
        once the latents are aligned, hence opt-in.
        """
        return autoencode(self, image, text, cross, negative, dim=0)

    # `autoencode`'s view of the model, per modality: standardise raw embeddings, encode
    # standardised ones, decode latents (back to the standardised space).
    def standardize(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = getattr(self, f"{modality}_mean"), getattr(self, f"{modality}_std")
        return (self._cast(x) - mean) / std

    def encode_standardized(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, modality).encoder(x)

    def decode(self, modality: str, z: torch.Tensor) -> torch.Tensor:
        return getattr(self, modality).decoder(z)

    def logit_scale(self) -> torch.Tensor:
        """Current contrastive scale ``exp(log_scale)``, capped at ``max_logit_scale``.

        The cap (CLIP uses 100) stops a learnt temperature from collapsing; past the cap the
        gradient of the scale is zero, so it stays there unless the loss pulls it back down.
        """
        cap = math.log(self.cfg.max_logit_scale)
        return self.log_logit_scale.clamp(max=cap).exp()

    def save(self, path: str | Path) -> Path:
        """Write ``path/model.safetensors`` and ``path/config.json``; returns the directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> JAM:
        """Rebuild a model saved by :meth:`save` (strict: every weight must match)."""
        src = Path(path)
        cfg_file, weights_file = src / CONFIG_FILE, src / WEIGHTS_FILE
        if not cfg_file.is_file() or not weights_file.is_file():
            raise ConfigError(
                f"{src} is not a saved JAM model: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it"
            )
        cfg = JAMConfig.from_dict(json.loads(cfg_file.read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(weights_file), device=str(map_location)))
        return model.to(map_location)
