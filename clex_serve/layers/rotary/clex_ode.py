"""The learned ODE of CLEX: how log inverse frequencies move as the length scale ``t`` grows.

The arithmetic follows the official implementation operation by operation (float32, the constant base 10000
in the NTK term whatever the model's ``rope_theta``), because the golden outputs pin it to 1e-4 and another
order of operations drifts. ``torchdiffeq``'s fixed-grid ``rk4`` (the 3/8 rule) integrates it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchdiffeq import odeint

# The official ODE passes no base to its NTK term, so it is always 10000, even for rope_theta = 1e6 (Mixtral).
NTK_BASE = 10000.0

_ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh}


class ClexODE(nn.Module):
    """``dz/dt = act((z + log ntk(t)) @ up) @ down + ntk'(t) / ntk(t)`` with ``z = log(inv_freq)``."""

    def __init__(self, rotary_dim: int, param_factor: int, act: str, time_dt: float) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"CLEX act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        self.rotary_dim = rotary_dim
        self.time_dt = time_dt
        self.ode_up_proj = nn.Parameter(torch.zeros(rotary_dim // 2, param_factor * rotary_dim))
        self.ode_down_proj = nn.Parameter(torch.zeros(param_factor * rotary_dim, rotary_dim // 2))
        self.act = _ACTIVATIONS[act]()
        self._constant_cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def reset_parameters(self) -> None:
        """The official initialisation: the ODE starts as pure NTK scaling (down projection zero)."""
        nn.init.kaiming_uniform_(self.ode_up_proj, a=5**0.5)
        nn.init.zeros_(self.ode_down_proj)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The parts of the NTK terms that do not depend on t, computed once per device. They are the same
        float32 values the full expressions compute at every call, so the solution stays bit-identical."""
        cached = self._constant_cache.get(device)
        if cached is None:
            dim = self.rotary_dim
            index = torch.arange(0, dim, 2, dtype=torch.float32, device=device)
            cached = (index / dim, -2 * index / (dim - 2) * 1, NTK_BASE ** (index / dim), index / (dim - 2) + 1)
            self._constant_cache[device] = cached
        return cached

    def _ntk_terms(self, t: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.rotary_dim
        exponents, d_numerator, base_powers, d_exponents = self._constants(device)
        alpha = 1 if t < 1 else 2 * t - 1
        ntk_base = NTK_BASE * alpha ** (dim / (dim - 2))
        ntk_inv_freq = 1.0 / (ntk_base**exponents)
        d_ntk_inv_freq = d_numerator / (base_powers * (alpha**d_exponents))
        return d_ntk_inv_freq, ntk_inv_freq

    def forward(self, t: torch.Tensor, log_inv_freq: torch.Tensor) -> torch.Tensor:
        d_ntk, ntk = self._ntk_terms(t.to(log_inv_freq.device), log_inv_freq.device)
        x = log_inv_freq + torch.log(ntk)
        learned = self.act(x @ self.ode_up_proj.float()) @ self.ode_down_proj.float()
        return learned + d_ntk / ntk

    def solve(self, inv_freq: torch.Tensor, time_grid: torch.Tensor) -> torch.Tensor:
        """``exp`` of the solution at each point of ``time_grid`` (which starts at 1), shape [len, d/2]."""
        solution = odeint(
            self,
            torch.log(inv_freq.float()),
            time_grid.float(),
            method="rk4",
            options={"step_size": self.time_dt},
        )
        return torch.exp(solution)
