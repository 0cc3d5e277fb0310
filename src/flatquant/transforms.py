"""Learnable invertible transforms: Kronecker-factored affine maps and per-channel scaling.

An invertible transform P before a linear layer leaves its output unchanged,
``y = x W^T = (x P)(P^-1 W^T)``; FlatQuant learns P so that ``x P`` and ``P^-1 W^T`` quantize well.
P = P1 ⊗ P2 keeps the online cost small: a token x (n,) viewed row-major as X (n1, n2) maps to
``P1^T X P2``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .fusion import fusable

PARAMETRISATIONS = ("svd", "plain")
INITS = ("random", "identity", "hadamard")


def kron_factors(n: int) -> tuple[int, int]:
    """The factor pair (n1, n2), n1 * n2 = n, n1 <= n2, closest to sqrt(n) (minimal n1 + n2).

    Always terminates: a prime n gives (1, n).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"kron_factors needs a positive integer size, got n={n!r}")
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ (a ⊗ b)`` without forming the Kronecker product.

    x: (..., n1 * n2); a: (n1, n1); b: (n2, n2) or None for the identity. Returns (..., n1 * n2).
    """
    n1 = a.shape[0]
    shape = x.shape
    xr = x.reshape(*shape[:-1], n1, shape[-1] // n1)  # (..., n1, n2)
    if b is not None:
        xr = xr @ b  # X P2
    xr = a.transpose(0, 1) @ xr  # P1^T X P2
    return xr.reshape(shape)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got n={n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64), by QR of a Gaussian matrix with sign correction."""
    g = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def initial_matrix(n: int, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The starting orthogonal matrix (float64) for a factor of size n.

    ``hadamard`` falls back to a random orthogonal matrix where n is not a power of two.
    """
    if init == "identity" or n == 1:
        return torch.eye(n, dtype=torch.float64)
    if init == "hadamard" and not n & (n - 1):
        return hadamard_matrix(n)
    if init in ("random", "hadamard"):
        return random_orthogonal(n, generator)
    raise ValueError(f"transform init={init!r} is not one of {INITS}")


_CACHE: dict | None = None


@contextlib.contextmanager
def factor_cache():
    """Compute each LearnableMatrix's (M, M^-1) once within the block; use around one forward pass."""
    global _CACHE
    outer, _CACHE = _CACHE, {}
    try:
        yield
    finally:
        _CACHE = outer


def precompute_factors(module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Fill the :func:`factor_cache` with every SVD-parametrised factor of ``module`` at once.

    The Cayley maps of all factors run as one batched solve: each skew matrix is zero-padded to the
    largest size, and the Cayley map of diag(S, 0) is exactly diag(C(S), I). One solve instead of one per
    factor matters because each small solve costs far more host time than GPU time.
    """
    if _CACHE is None:
        raise RuntimeError("precompute_factors must run inside factor_cache()")
    mats = [m for m in module.modules() if isinstance(m, LearnableMatrix) and m.parametrisation == "svd"]
    if not mats:
        return
    size = max(m.n for m in mats)
    eye = torch.eye(size, dtype=dtype, device=mats[0].sigma.device)

    def pad(t: torch.Tensor, n: int, fill_identity: bool) -> torch.Tensor:
        if n == size:
            return t
        if t.dim() == 1:  # sigma: padded with ones
            return torch.nn.functional.pad(t - 1, (0, size - n)) + 1
        padded = torch.nn.functional.pad(t, (0, size - n, 0, size - n))
        if not fill_identity:
            return padded
        # diag(0_n, I) made on the device: a host tensor copied here would stall the host on the GPU every
        # step (a pageable copy waits for the stream) and cannot be captured in a CUDA graph
        return padded + torch.diag((torch.arange(size, device=eye.device) >= n).to(dtype))

    q0 = torch.stack([pad(m.q0.to(dtype), m.n, True) for m in mats])  # (B, N, N)
    su = torch.stack([pad(m.skew_u.to(dtype), m.n, False) for m in mats])
    sv = torch.stack([pad(m.skew_v.to(dtype), m.n, False) for m in mats])
    sigma = torch.stack([pad(m.sigma.to(dtype), m.n, False) for m in mats])  # (B, N)
    p, p_inv = _svd_pairs_batched(q0, su, sv, sigma)
    for i, m in enumerate(mats):
        _CACHE[(id(m), dtype)] = (p[i, : m.n, : m.n], p_inv[i, : m.n, : m.n])


@fusable
def _svd_pairs_batched(q0, skew_u, skew_v, sigma):
    """Batched (U diag(sigma) V^T, V diag(1/sigma) U^T) for (B, N, N) inputs and sigma (B, N).

    U = q0 C(skew_u), V = C(skew_v), with C(A) = (I - S)^-1 (I + S) the Cayley map of S, the skew part of A.
    I - S is always invertible; ``solve_ex`` skips the error check, which would synchronise with the GPU.
    """
    s = torch.cat([skew_u, skew_v])
    s = 0.5 * (s - s.transpose(-1, -2))
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    c = torch.linalg.solve_ex(eye - s, eye + s)[0]
    cu, cv = c.chunk(2)
    u = q0 @ cu
    sig = sigma.unsqueeze(-2)  # (B, 1, N): scales columns
    return (u * sig) @ cv.transpose(-1, -2), (cv / sig) @ u.transpose(-1, -2)


class LearnableMatrix(nn.Module):
    """One invertible n x n factor.

    ``svd``: M = (Q0 C(A)) diag(sigma) C(B)^T with C the Cayley map, Q0 a fixed orthogonal start;
    its inverse C(B) diag(1/sigma) (Q0 C(A))^T is exact in closed form.
    ``plain``: M is a free matrix; its inverse is taken in float64.
    """

    def __init__(self, n: int, parametrisation: str = "svd", init: str = "random", generator=None):
        super().__init__()
        if parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"parametrisation={parametrisation!r} is not one of {PARAMETRISATIONS}")
        self.n = n
        self.parametrisation = parametrisation
        q0 = initial_matrix(n, init, generator)  # float64: orthogonal to 1e-16 for the float64 merge
        if parametrisation == "svd":
            self.register_buffer("q0", q0)
            self.skew_u = nn.Parameter(torch.zeros(n, n))
            self.skew_v = nn.Parameter(torch.zeros(n, n))
            self.sigma = nn.Parameter(torch.ones(n))
        else:
            self.matrix = nn.Parameter(q0.float())

    def pair(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, M^-1) as (n, n) tensors of ``dtype``, differentiable in the parameters.

        Inside :func:`factor_cache` a factor shared by several layers (P_a feeds q, k, v and its own
        online transform) is computed once per forward pass.
        """
        if _CACHE is None:
            return self._compute_pair(dtype)
        key = (id(self), dtype)
        if key not in _CACHE:
            _CACHE[key] = self._compute_pair(dtype)
        return _CACHE[key]

    def _compute_pair(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.parametrisation == "svd":
            args = (self.q0, self.skew_u, self.skew_v, self.sigma)
            m, m_inv = _svd_pairs_batched(*(t.to(dtype).unsqueeze(0) for t in args))
            return m[0], m_inv[0]
        m = self.matrix.to(dtype)
        return m, torch.linalg.inv(self.matrix.double()).to(dtype)


class KroneckerTransform(nn.Module):
    """P = P1 ⊗ P2 over a size n = n1 * n2; ``n2_identity`` makes P2 a fixed identity (P_o)."""

    def __init__(
        self,
        n1: int,
        n2: int,
        parametrisation: str = "svd",
        init: str = "random",
        n2_identity: bool = False,
        generator=None,
    ):
        super().__init__()
        self.n1, self.n2 = n1, n2
        self.p1 = LearnableMatrix(n1, parametrisation, init, generator)
        self.p2 = None if n2_identity or n2 == 1 else LearnableMatrix(n2, parametrisation, init, generator)

    @classmethod
    def for_size(cls, n: int, **kwargs) -> KroneckerTransform:
        return cls(*kron_factors(n), **kwargs)

    def factors(self, dtype=torch.float32):
        """((P1, P1^-1), (P2, P2^-1) or None)."""
        return self.p1.pair(dtype), None if self.p2 is None else self.p2.pair(dtype)
