"""Frozen random bases that everyone can rebuild from a public seed, bit for bit.

Orthogonal Adaptation, VeRA and NOLA train only small coefficients on top of *frozen* random matrices. Those
matrices are never saved: a checkpoint stores the seed, and whoever loads it (another machine, another torch
version, another thread count) must regenerate exactly the same numbers, or the adapter means something else.
``torch.randn`` and ``torch.linalg.qr`` give no such promise (generators, vectorized math and BLAS change between
versions and builds), so everything here is built from two deterministic pieces only:

- **a byte stream**: SHAKE-256 of ``"deltatune/<version>/<seed>/<name>"`` (``hashlib``, specified by FIPS 202),
  read as little-endian 64-bit words. Uniforms are ``(word >> 11) * 2^-53`` (exact in float64);
- **IEEE arithmetic**: elementwise float64 ``+ - * / sqrt``, which are correctly rounded on every platform, and
  indexing. No reductions, no transcendental functions, no matrix products.

**Orthogonal basis** (:func:`orthogonal_columns`). ``O = G_T ... G_2 G_1`` (n x n) is a product of ``T`` rounds of
Givens rotations (Kac's random walk, run in rounds): each round pairs all coordinates by a random permutation
and rotates every pair ``(i, j)`` by a random angle given as ``(c, s) = (a, b) / sqrt(a^2 + b^2)``::

    x_i' = c x_i - s x_j,      x_j' = s x_i + c x_j

Each round is orthogonal, so ``O`` is orthogonal up to float64 rounding (about 1e-15), whatever the random numbers.
Columns are independent: ``O[:, J] = G_T ... G_1 I[:, J]``, so a slot of ``r`` columns costs ``T n r`` operations
and never needs the whole matrix. ``T = 4 ceil(log2 n)`` rounds spread every column over all coordinates (Kac's walk
mixes in ``O(n log n)`` rotations). The result is cast to float32 at the end.
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch

VERSION = "v1"


# -- the byte stream -------------------------------------------------------------------------------------------
def words(seed: int | str, name: str, count: int) -> torch.Tensor:
    """``count`` pseudo-random unsigned 64-bit words (as int64 bit patterns) for ``(seed, name)``."""
    data = hashlib.shake_256(f"deltatune/{VERSION}/{seed}/{name}".encode()).digest(8 * count)
    return torch.frombuffer(bytearray(data), dtype=torch.int64).clone()


def uniform(seed: int | str, name: str, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers on ``[low, high)`` of ``shape``, identical on every machine (computed in float64)."""
    n = math.prod(shape)
    w = words(seed, name, n)
    top53 = torch.bitwise_right_shift(w, 11) & ((1 << 53) - 1)  # logical shift of the unsigned word
    u = top53.to(torch.float64) * 2.0 ** -53
    return (u * (high - low) + low).reshape(shape).to(dtype)


def permutation(seed: int | str, name: str, n: int) -> torch.Tensor:
    """A random permutation of ``range(n)``: stable argsort of random keys (ties broken by position)."""
    keys = words(seed, name, n)  # signed int64 keys: any fixed total order of random keys will do
    return torch.argsort(keys, stable=True)


# -- orthogonal basis ------------------------------------------------------------------------------------------
def rounds(n: int) -> int:
    """Number of Givens rounds for an ``n``-dimensional basis."""
    return 4 * max(1, math.ceil(math.log2(max(n, 2))))


def orthogonal_columns(seed: int | str, key: str, n: int, columns, dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor:
    """Columns ``columns`` of the shared orthogonal ``O`` (n x n) for ``(seed, key)``, as an (n x len(columns))
    tensor. The same ``(seed, key, n)`` always gives the same ``O``; see the module docstring."""
    columns = torch.as_tensor(list(columns), dtype=torch.long)
    if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= n):
        raise ValueError(f"basis columns must lie in [0, {n}), got {columns.tolist()}")
    X = torch.zeros(n, columns.numel(), dtype=torch.float64)
    X[columns, torch.arange(columns.numel())] = 1.0
    half = n // 2
    name = f"orthogonal/{key}/{n}"
    for t in range(rounds(n)):
        p = permutation(seed, f"{name}/perm{t}", n)
        i, j = p[:half], p[half:2 * half]
        ab = uniform(seed, f"{name}/angle{t}", (2, half), -1.0, 1.0, torch.float64)
        norm = torch.sqrt(ab[0] * ab[0] + ab[1] * ab[1])
        c = (ab[0] / norm)[:, None]
        s = (ab[1] / norm)[:, None]
        xi, xj = X[i], X[j]
        X[i] = c * xi - s * xj
        X[j] = s * xi + c * xj
    return X.to(dtype)


@lru_cache(maxsize=512)
def _cached_columns(seed, key, n, columns, dtype):
    return orthogonal_columns(seed, key, n, columns, dtype)


def basis_slot(seed: int | str, key: str, n: int, columns, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`orthogonal_columns` as (len(columns) x n) rows, cached per ``(seed, key, n, columns)`` so that a layer's
    basis is built once per process. Returns a fresh copy (the cache is never handed out)."""
    return _cached_columns(seed, key, int(n), tuple(int(c) for c in columns), dtype).t().clone(
        memory_format=torch.contiguous_format)


def slot_columns(slot: int | str, r: int, n: int, seed: int | str = 0, key: str = "") -> list[int]:
    """The basis columns of a slot: ``slot=k`` takes the k-th disjoint block ``[k r, (k+1) r)`` (mutually orthogonal
    across slots); ``slot="random"`` draws ``r`` distinct columns from ``(seed, key)``."""
    if slot == "random":
        return sorted(permutation(seed, f"slot/{key}/{n}", n)[:r].tolist())
    if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
        raise ValueError(f"slot must be a non-negative integer or 'random', got {slot!r}")
    if (slot + 1) * r > n:
        raise ValueError(f"slot {slot} of rank {r} needs basis columns [{slot * r}, {(slot + 1) * r}), but the layer "
                         f"has only {n} inputs (room for {n // r} slots of rank {r}); use a smaller slot or rank, or "
                         "slot='random'")
    return list(range(slot * r, (slot + 1) * r))


# -- shared random matrices (VeRA, NOLA) -------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _shared(seed, name, shape, bound):
    return uniform(seed, name, shape, -bound, bound)


def shared_uniform(seed: int | str, name: str, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """A frozen ``U(-bound, bound)`` tensor for ``(seed, name, shape)``. Every caller in a process gets the *same*
    tensor object, read-only by contract: layers of one shape share one basis in memory (on the CPU in float32;
    moving or casting a model gives each layer its own copy)."""
    return _shared(seed, name, tuple(int(s) for s in shape), float(bound))
