"""Moving cached keys to new RoPE positions, in place in vLLM's paged cache.

vLLM caches keys after RoPE. To move a cached key ``d`` positions to the left
(the window when a stream's RoPE offset drops back; the sinks move the other
way at every eviction, see :mod:`vllm_sink.worker.eviction`), rotations compose:
``R(p - d) k = R(-d) R(p) k``, so the cached key is rotated by ``-d``. The
angles come from the table the layer's own rotary module rotates by (so its
base, scaling and rotary dims stay right; read by
:func:`vllm_sink.worker.vllm_runner.rope_deltas`), normalised to unit length so
that scalings which also scale the magnitude (YaRN's mscale) are not applied
twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeDeltas:
    """cos/sin of ``delta * theta_i`` for every delta the rotary table covers."""

    cos: torch.Tensor  # [max_position, rotary_dim // 2], float32
    sin: torch.Tensor
    rotary_dim: int
    is_neox_style: bool

    @classmethod
    def from_position_table(
        cls, table: torch.Tensor, rotary_dim: int, is_neox_style: bool, source: str
    ) -> RopeDeltas:
        """From the ``[positions, rotary_dim]`` cos|sin table a rotary module rotates by.

        ``source`` names the module in the error raised for a table of another shape.
        """
        table = table.to(torch.float64)
        if table.dim() != 2 or table.shape[1] != rotary_dim:
            raise ValueError(
                f"{source} has a rotary table of shape "
                f"{tuple(table.shape)}; only plain [positions, rotary_dim] tables "
                "can be re-rotated"
            )
        cos, sin = table.chunk(2, dim=-1)
        norm = torch.sqrt(cos * cos + sin * sin)
        return cls(
            cos=(cos / norm).to(torch.float32),
            sin=(sin / norm).to(torch.float32),
            rotary_dim=rotary_dim,
            is_neox_style=is_neox_style,
        )

    def to(self, device: torch.device | str) -> RopeDeltas:
        """The same table on ``device`` (the KV cache's)."""
        return dataclasses.replace(self, cos=self.cos.to(device), sin=self.sin.to(device))

    def rotate_back(self, keys: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys[i, ...]`` (float32, last dim = head size) by ``-deltas[i]``.

        A negative delta moves keys to a later position.
        """
        deltas = deltas.to(self.cos.device)
        magnitude = deltas.abs()
        cos = self.cos[magnitude]
        sin = -self.sin[magnitude] * deltas.sign().unsqueeze(-1).to(self.sin.dtype)
        shape = (keys.shape[0],) + (1,) * (keys.dim() - 2) + (cos.shape[-1],)
        cos, sin = cos.view(shape), sin.view(shape)
        rot = keys[..., : self.rotary_dim]
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            rotated = rotated.flatten(-2)
        return torch.cat((rotated, keys[..., self.rotary_dim :]), dim=-1)
