"""GAO written plainly: the definition ``GradientAlignmentOptimizer`` is tested against.

One Python loop over the parameters that have a gradient (and over rows), cosines in float64
from the EMA kept in the parameter's dtype (float32 for float16/bfloat16 parameters), then the
base optimizer's step. It is slow on purpose and is not a ``torch.optim.Optimizer``; it spells
out what the fast optimizer must do:

- a complex tensor is read as its real view (``torch.view_as_real``), as torch's optimizers read
  it: its cosine is the real part of the conjugate product over the norms;
- a gradient element that is not finite (NaN, inf) is read as 0 by GAO (its EMA and cosine);
  the base optimizer still receives it, so it does with it what it would do alone;
- with ``target="grad"`` the base steps on the scaled gradient, and ``p.grad`` holds the user's
  own gradient again afterwards.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from gradalign.optim.functional import complex_like, ema_dtype, real


class ReferenceGAO:
    """GAO over the parameters of ``base`` (an optimizer built on them), one tensor at a time."""

    def __init__(
        self,
        base: Optimizer,
        beta: float = 0.9,
        target: str = "grad",
        granularity: str = "tensor",
        min_scale: float = 0.0,
    ) -> None:
        self.base = base
        self.params = [p for group in base.param_groups for p in group["params"]]
        self.beta, self.target, self.granularity = beta, target, granularity
        self.min_scale = min_scale
        self.ema = {p: torch.zeros_like(p, dtype=ema_dtype(p)) for p in self.params}
        self.last_scales: torch.Tensor | None = None

    @torch.no_grad()
    def step(self) -> None:
        present = [p for p in self.params if p.grad is not None]
        grads = {p: self._read(p) for p in present}
        for p in present:
            m = real(self.ema[p])
            m.copy_(self.beta * m + (1 - self.beta) * grads[p])
        scales = self._scales(present, grads)  # float64, broadcastable over the real view
        if self.target == "grad":
            own = {p: p.grad for p in present}
            for p in present:
                scaled = real(own[p]).double() * scales[p]
                p.grad = complex_like(own[p], scaled.to(real(own[p]).dtype).contiguous())
            try:
                self.base.step()
            finally:
                for p in present:
                    p.grad = own[p]
        else:
            before = {p: real(p).detach().clone() for p in present}
            self.base.step()
            for p in present:
                b = before[p].double()
                real(p).copy_(b + scales[p] * (real(p).double() - b))
        self.last_scales = torch.tensor(
            [float(scales[p].mean()) if p in scales else math.nan for p in self.params],
            dtype=torch.float64,
        )

    def _read(self, p: torch.Tensor) -> torch.Tensor:
        """The gradient as GAO reads it: real view, non-finite elements as 0, the EMA's dtype."""
        g = real(p.grad).to(real(self.ema[p]).dtype)
        return torch.where(torch.isfinite(g), g, torch.zeros_like(g))

    def _scales(
        self, present: list[torch.Tensor], grads: dict[torch.Tensor, torch.Tensor]
    ) -> dict[torch.Tensor, torch.Tensor]:
        """Each parameter's scale, float64, shaped to broadcast over its real view."""
        if self.granularity == "global":
            g = torch.cat([grads[p].reshape(-1) for p in present])
            m = torch.cat([real(self.ema[p]).reshape(-1) for p in present])
            s = torch.tensor(cosine(g, m, self.min_scale), dtype=torch.float64)
            return dict.fromkeys(present, s)
        scales = {}
        for p in present:
            g, m = grads[p], real(self.ema[p])
            if self.granularity == "row" and p.dim() >= 2:
                rows = [cosine(g[i], m[i], self.min_scale) for i in range(p.shape[0])]
                shape = (p.shape[0],) + (1,) * (g.dim() - 1)
                scales[p] = torch.tensor(rows, dtype=torch.float64).reshape(shape)
            else:
                scales[p] = torch.tensor(cosine(g, m, self.min_scale), dtype=torch.float64)
        return scales


def cosine(g: torch.Tensor, m: torch.Tensor, min_scale: float) -> float:
    """clamp(cos(g, m), min_scale, 1) in float64; 0 when a norm is 0."""
    g, m = g.double().reshape(-1), m.double().reshape(-1)
    ng, nm = float(g.norm()), float(m.norm())
    if ng == 0.0 or nm == 0.0:
        return 0.0
    return min(max(float(g @ m) / (ng * nm), min_scale), 1.0)
