"""Seeded random projections that compress per-record LoRA gradients.

Each LoRA adapter is projected on its large side only: ``lora_A`` (r x d_in) keeps its r rows
and has d_in compressed to ``dim``; ``lora_B`` (d_out x r) has d_out compressed to ``dim``.
P is a random [dim, d] matrix with E[P^T P] = I, so E[<P g_i, P g_j>] = <g_i, g_j>
(Johnson-Lindenstrauss). A side that is already no larger than ``dim`` is kept exact.

The matrix of an adapter depends only on (seed, adapter name, side, sizes): it is drawn on the
CPU from its own generator, so every process and machine, CPU or GPU, gets the same one.
Matrices are cached per device and dtype.
"""

from __future__ import annotations

import hashlib
import math
from typing import Protocol

import torch

from .lora import LoraLayout, LoraLinear

DEFAULT_PROJECTION_DIM = 256


def _seed_of(text: str) -> int:
    """A generator seed that is a pure function of ``text`` (the same on every process and machine)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class RandomProjector:
    """A seeded one-sided random projection per LoRA adapter.

    Args:
        dim: size each adapter's large side is compressed to. A record's projected gradient has
            ``r * dim`` entries per adapter (plus ``dim`` for a ``lora_B`` bias). The error of a
            projected inner product shrinks like 1/sqrt(dim), whatever the model width.
        seed: the projection is a pure function of the seed and the adapter names.
        orthogonal: draw P with orthonormal rows scaled by sqrt(d/dim) (Haar) instead of i.i.d.
            N(0, 1/dim) entries. Both are unbiased; the orthogonal one has lower variance.
    """

    def __init__(self, dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0, orthogonal: bool = True) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"projection dim must be a positive integer, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"projection seed must be an integer, got {seed!r}")
        self.dim = dim
        self.seed = seed
        self.orthogonal = orthogonal
        self._cache: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"RandomProjector(dim={self.dim}, seed={self.seed})"

    def projected_size(self, linear: LoraLinear) -> int:
        """Size of the large side after projection (the side itself when it is small)."""
        return min(self.dim, linear.large_dim)

    def weight_size(self, linear: LoraLinear) -> int:
        small = linear.out_features if linear.side == "A" else linear.in_features
        return small * self.projected_size(linear)

    def output_size(self, layout: LoraLayout) -> int:
        """Length of one projected gradient over all adapters of ``layout``."""
        total = 0
        for linear in layout.linears:
            total += self.weight_size(linear)
            if linear.bias_offset is not None:
                total += self.projected_size(linear)
        return total

    def matrix(self, linear: LoraLinear, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The [k, large_dim] projection of ``linear``, or ``None`` when it is kept exact."""
        d = linear.large_dim
        k = self.projected_size(linear)
        if k == d:
            return None
        key = (linear.name, linear.side, d, k, str(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            generator = torch.Generator(device="cpu").manual_seed(self._module_seed(linear))
            gaussian = torch.randn(d, k, generator=generator, dtype=torch.float64)
            if self.orthogonal:
                q, r = torch.linalg.qr(gaussian)
                q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthonormal columns
                cached = q.T * math.sqrt(d / k)
            else:
                cached = gaussian.T / math.sqrt(k)
            cached = cached.to(device=device, dtype=dtype)
            self._cache[key] = cached
        return cached

    def _module_seed(self, linear: LoraLinear) -> int:
        return _seed_of(
            f"rlhf-influence/{self.seed}/{linear.name}/{linear.side}/{linear.large_dim}/{self.dim}"
        )

    def project(self, layout: LoraLayout, vectors: torch.Tensor) -> torch.Tensor:
        """Project full gradients ``[m, D]`` (or ``[D]``) into the projected space ``[m, D']``."""
        squeeze = vectors.dim() == 1
        vectors = vectors.unsqueeze(0) if squeeze else vectors
        if vectors.shape[-1] != layout.num_params:
            raise ValueError(
                f"gradient has {vectors.shape[-1]} entries but the model's LoRA layout has "
                f"{layout.num_params}"
            )
        m = vectors.shape[0]
        pieces = []
        for linear in layout.linears:
            start = linear.weight_offset
            weight = vectors[:, start : start + linear.weight_numel]
            weight = weight.reshape(m, linear.out_features, linear.in_features)
            proj = self.matrix(linear, vectors.device, vectors.dtype)
            if linear.side == "A":  # [m, r, d_in] -> [m, r, k]
                pieces.append((weight if proj is None else weight @ proj.T).reshape(m, -1))
            else:  # [m, d_out, r] -> [m, k, r]
                pieces.append((weight if proj is None else proj @ weight).reshape(m, -1))
            if linear.bias_offset is not None:
                bias = vectors[:, linear.bias_offset : linear.bias_offset + linear.out_features]
                pieces.append(bias if proj is None else bias @ proj.T)
        out = torch.cat(pieces, dim=1)
        return out[0] if squeeze else out


DEFAULT_SKETCH_DIM = 16384


class SketchedProjector:
    """A per-side projection followed by one seeded sparse sign sketch of the whole vector.

    The per-side stage (:class:`RandomProjector`, ``side_dim``) gives ``D'`` entries per record,
    ``r * side_dim`` for each adapter side: 245,760 for SmolLM2-135M with r=16 on q, k, v, o at
    ``side_dim=64``. The second stage folds them into ``dim`` entries with a count sketch
    (each entry added, with a random sign, into one of ``dim`` buckets chosen by hash), as
    TRAK and LoGra compress a whole model's gradient into one compact vector. Both stages are
    linear and unbiased, so stored vectors dotted with a target projected the same way
    estimate the exact influence; the sketch adds variance of order ``|g| |v| / sqrt(dim)``.
    When ``D'`` is already no larger than ``dim`` the second stage is skipped.
    """

    def __init__(self, dim: int = DEFAULT_SKETCH_DIM, side_dim: int = 64, seed: int = 0) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"sketch dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.seed = seed
        self.per_side = RandomProjector(side_dim, seed=seed)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"SketchedProjector(dim={self.dim}, side_dim={self.per_side.dim}, seed={self.seed})"

    def output_size(self, layout: LoraLayout) -> int:
        return min(self.dim, self.per_side.output_size(layout))

    def project(self, layout: LoraLayout, vectors: torch.Tensor) -> torch.Tensor:
        """Project full gradients ``[m, D]`` (or ``[D]``) to ``[m, dim]``."""
        squeeze = vectors.dim() == 1
        folded = self.fold(self.per_side.project(layout, vectors.unsqueeze(0) if squeeze else vectors))
        return folded[0] if squeeze else folded

    def fold(self, side_projected: torch.Tensor) -> torch.Tensor:
        """The second stage: ``[m, D']`` per-side projected gradients to ``[m, min(dim, D')]``."""
        size = side_projected.shape[1]
        if size <= self.dim:
            return side_projected
        buckets, signs = self._hash(size, side_projected.device, side_projected.dtype)
        out = torch.zeros(
            side_projected.shape[0], self.dim, dtype=side_projected.dtype, device=side_projected.device
        )
        return out.index_add_(1, buckets, side_projected * signs)

    def _hash(self, size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (size, str(device), dtype)
        if key not in self._cache:
            seed = _seed_of(f"rlhf-influence/sketch/{self.seed}/{size}/{self.dim}")
            generator = torch.Generator(device="cpu").manual_seed(seed)
            buckets = torch.randint(0, self.dim, (size,), generator=generator)
            signs = torch.randint(0, 2, (size,), generator=generator) * 2 - 1
            self._cache[key] = (buckets.to(device), signs.to(device=device, dtype=dtype))
        return self._cache[key]


class Projector(Protocol):
    """What scores and the store need of a projection: the projected length of a layout's gradient
    and the projection of flat gradients ``[n, D]`` (RandomProjector, SketchedProjector)."""

    def output_size(self, layout: LoraLayout) -> int: ...

    def project(self, layout: LoraLayout, vectors: torch.Tensor) -> torch.Tensor: ...


def store_projector(side_dim: int, sketch_dim: int | None, seed: int) -> RandomProjector | SketchedProjector:
    """The store's projection of each record's gradient: ``side_dim`` per LoRA adapter side, folded
    by a sparse sign sketch to ``sketch_dim`` entries where given (None: stores before the sketch).
    The trainer writes with it and the audit reads with it, built from the same three numbers."""
    if sketch_dim:
        return SketchedProjector(sketch_dim, side_dim=side_dim, seed=seed)
    return RandomProjector(side_dim, seed=seed)
