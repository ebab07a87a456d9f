"""A population: P JAM models stacked along a leading dimension and trained as one module.

A JAM trial is tiny (two MLP autoencoders over cached vectors), so a sweep's trials cost far
more in process start-up and idle device time than in compute. Stacking every member's weights
into ``[P, ...]`` tensors runs the P forwards as one batched matrix multiply per layer
(`torch.baddbmm`), so P trials cost one process, one data pipeline and one launch per op.

Members share the architecture's shape (`hidden`, `latent`) but may have their own input
widths (different layer pairs of one model pair): inputs are zero-padded to the widest member,
the padded input columns of the first layer stay zero (their gradient is zero), and the padded
outputs of the last layer are masked out of reconstruction (`Population.reconstruction`), so
a padded member computes exactly what it would alone. Dropout rate, logit scale and input
standardisation are per member too. Nothing mixes members: member m's outputs depend only on
member m's weights, so the sum of the members' losses gives each member its own gradient.

Every member keeps the parameter names of a `JAM` (``image.encoder.0.linear.weight`` …),
stacked: `member` cuts one out as a normal `JAM`, `Population.from_members` stacks them. A
Linear's weight is stacked transposed, ``[P, in, out]``: the batched multiply then reads it as
it is, and its gradient comes out of the backward in that layout, where ``[P, out, in]`` cost
a copy of every weight gradient per step (8% of a CPU step of twelve default members).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raysys.errors import ConfigError
from raysys.jam.model import JAM, JAMConfig, autoencode, keep_mask, step_seed

SHARED = ("hidden", "latent", "learn_logit_scale")  # what every member of one population shares


def _key(name: str) -> str:
    """A JAM parameter name as a ParameterDict key (no dots allowed there)."""
    return name.replace(".", "__")


def _stacked(value: torch.Tensor) -> torch.Tensor:
    """A member's tensor in the population's layout: a Linear's weight ``[out, in]`` (the only
    2-D tensors of a JAM) as ``[in, out]``, the rest as they are (views, both ways)."""
    return value.T if value.dim() == 2 else value


class Population(nn.Module):
    """P JAM members with stacked weights; `forward` takes and returns ``[P, B, ...]``."""

    def __init__(self, cfgs: list[JAMConfig]) -> None:
        super().__init__()
        if not cfgs:
            raise ConfigError("a population needs at least one member")
        first = cfgs[0]
        for cfg in cfgs[1:]:
            for key in SHARED:
                if getattr(cfg, key) != getattr(first, key):
                    raise ConfigError(
                        f"population members differ in {key} ({getattr(first, key)!r} vs "
                        f"{getattr(cfg, key)!r}); they must share {', '.join(SHARED)}"
                    )
        self.cfgs = list(cfgs)
        self.size = len(cfgs)
        self.d_image = max(c.d_image for c in cfgs)
        self.d_text = max(c.d_text for c in cfgs)
        self.hidden = tuple(first.hidden)
        template = JAM(self._padded(first))
        self.params = nn.ParameterDict(
            {
                _key(name): nn.Parameter(
                    torch.zeros(self.size, *_stacked(p).shape, dtype=p.dtype),
                    requires_grad=p.requires_grad,
                )
                for name, p in template.named_parameters()
            }
        )
        for name, buffer in template.named_buffers():
            self.register_buffer(_key(name), torch.zeros(self.size, *buffer.shape))
        self.register_buffer("dropout", torch.tensor([c.dropout for c in cfgs]))
        self.any_dropout = any(c.dropout > 0 for c in cfgs)
        self.generators: list[torch.Generator] = []  # per member, once `seed_dropout` is called
        self.dropout_seeds: list[int] = []
        self.register_buffer(
            "max_log_scale", torch.tensor([math.log(c.max_logit_scale) for c in cfgs])
        )
        # Which padded features are real, per member: masks reconstruction to each member's own.
        for name, width, full in (
            ("image", [c.d_image for c in cfgs], self.d_image),
            ("text", [c.d_text for c in cfgs], self.d_text),
        ):
            mask = torch.arange(full)[None, :] < torch.tensor(width)[:, None]
            self.register_buffer(f"{name}_valid", mask.float())

    def _padded(self, cfg: JAMConfig) -> JAMConfig:
        d = cfg.to_dict() | {"d_image": self.d_image, "d_text": self.d_text}
        return JAMConfig.from_dict(d)

    # --- members in and out ------------------------------------------------------------------

    @classmethod
    def from_members(cls, members: list[JAM]) -> Population:
        """A population whose member m starts as `members[m]` (weights and standardisation)."""
        population = cls([m.cfg for m in members])
        for m, jam in enumerate(members):
            population.set_member(m, jam)
        return population

    @torch.no_grad()
    def set_member(self, m: int, jam: JAM) -> None:
        """Copy a JAM into slot m, zero-padded to the population's widths (std padded with 1)."""
        state = jam.state_dict()
        for name, value in state.items():
            value = _stacked(value)
            target = self._tensor(name)[m]
            target.zero_()
            if name.endswith("_std"):
                target.fill_(1.0)
            target[tuple(slice(0, n) for n in value.shape)] = value.to(target.dtype)

    @torch.no_grad()
    def member(self, m: int) -> JAM:
        """Member m as a normal `JAM` on the CPU (padding cut off): what a trial exports."""
        jam = JAM(self.cfgs[m])
        state = {}
        for name, value in jam.state_dict().items():
            stacked = self._tensor(name)[m]
            own = stacked[tuple(slice(0, n) for n in _stacked(value).shape)]
            state[name] = _stacked(own).detach().cpu()
        jam.load_state_dict(state)
        return jam

    def _tensor(self, name: str) -> torch.Tensor:
        key = _key(name)
        return self.params[key] if key in self.params else getattr(self, key)

    def _p(self, name: str) -> torch.Tensor:
        return self.params[_key(name)]

    # --- the stacked forward -------------------------------------------------------------------

    def _linear(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._p(f"{prefix}.weight"), self._p(f"{prefix}.bias")  # [P, in, out]
        return torch.baddbmm(bias.unsqueeze(1), x, weight)

    def seed_dropout(self, seeds: list[int], device: torch.device | str | None = None) -> None:
        """Give member m its own dropout generator, seeded with `seeds[m]` on `device` (by
        default where the weights are: seed after moving): its masks then are those
        `JAM.seed_dropout(seeds[m])` draws alone (one launch per member and block on a GPU:
        the price of results that do not depend on the stack)."""
        self.dropout_seeds = list(seeds)
        device = device or next(self.parameters()).device
        self.generators = [torch.Generator(device=device) for _ in seeds]
        self.dropout_step(0)

    def dropout_step(self, step: int) -> None:
        """Reseed each member's generator for training step `step`, as `JAM.dropout_step`."""
        for seed, generator in zip(self.dropout_seeds, self.generators, strict=True):
            generator.manual_seed(step_seed(seed, step))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout at each member's own rate, from its own generator once seeded."""
        if not self.training or not self.any_dropout:
            return x
        # The scale in float32: in bf16 `1 - 0.1` is 0.8984375, where `JAM` divides by 0.9.
        rate = self.dropout.view(-1, 1, 1)
        p = rate.to(x.dtype)  # the masks compare in x's dtype, as `keep_mask` does alone
        if self.generators:
            masks = [keep_mask(x.shape[1:], p[m], g, x) for m, g in enumerate(self.generators)]
            keep = torch.stack(masks)
        else:
            keep = torch.rand_like(x) >= p
        return (x * keep * (1 / (1 - rate))).to(x.dtype)

    def _mlp(self, prefix: str, depth: int, x: torch.Tensor) -> torch.Tensor:
        """Blocks (Linear -> LayerNorm -> SwiGLU -> Dropout) then the plain output Linear."""
        for i in range(depth):
            block = f"{prefix}.{i}"
            h = self._linear(f"{block}.linear", x)
            h = F.layer_norm(h, h.shape[-1:], eps=1e-5)
            h = h * self._p(f"{block}.norm.weight").unsqueeze(1) + self._p(
                f"{block}.norm.bias"
            ).unsqueeze(1)
            a, b = self._linear(f"{block}.act.proj", h).chunk(2, dim=-1)
            x = self._dropout(F.silu(a) * b)
        return self._linear(f"{prefix}.{depth}", x)

    # `autoencode`'s view of the population, as of a `JAM` (inputs and outputs [P, B, ...]).
    def encode_standardized(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return self._mlp(f"{modality}.encoder", len(self.hidden), x)

    def decode(self, modality: str, z: torch.Tensor) -> torch.Tensor:
        return self._mlp(f"{modality}.decoder", len(self.hidden), z)

    def standardize(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Raw ``[P, B, d]`` embeddings (each member's own, zero-padded) -> standardised."""
        mean, std = getattr(self, f"{modality}_mean"), getattr(self, f"{modality}_std")
        x = x.to(mean.dtype)
        # padded inputs stay 0: (0 - 0) / 1
        return (x - mean.unsqueeze(1)) / std.unsqueeze(1)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        cross: bool = False,
        negative: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`JAM.forward` for every member at once: inputs ``[P, B, d]`` (each member's own
        layers, zero-padded to the widest), outputs ``[P, B, ...]`` with the same keys."""
        return autoencode(self, image, text, cross, negative, dim=1)

    def logit_scale(self) -> torch.Tensor:
        """Each member's contrastive scale ``[P]``, capped as `JAM.logit_scale` caps it: its
        `clamp(max=)` passes no gradient at the cap itself (and keeps a NaN), where
        `torch.minimum` or a clamp with a tensor bound passes half, moving a member that
        stays put alone."""
        log_scale = self._p("log_logit_scale")
        cap = self.max_log_scale.to(log_scale.dtype)
        return torch.where(log_scale >= cap, cap, log_scale).exp()

    def reconstruction(
        self, modality: str, target: torch.Tensor, hat: torch.Tensor
    ) -> torch.Tensor:
        """Each member's MSE ``[P]`` over its own features only (padding masked out), in at
        least float32, as `losses.reconstruction` computes it alone."""
        valid = getattr(self, f"{modality}_valid")  # [P, d]
        hat = hat.float() if hat.dtype in (torch.float16, torch.bfloat16) else hat
        err = (hat - target.to(hat.dtype)).square() * valid.unsqueeze(1).to(hat.dtype)
        count = valid.sum(-1) * target.shape[1]
        return err.sum(dim=(1, 2)) / count.to(err.dtype)
