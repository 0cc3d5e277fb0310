"""n1 x 128 tokens with a non-power-of-two n1 (86, 108, 112) transformed and quantized in power-of-two pieces.

Triton's tiles are powers of two, so :mod:`flatquant.kernels.kron_quantize`'s kernel pads n1 = 86 (LLaMA-2-7B's
down projection input, 11008 = 86 x 128) and 112 (14336) to 128: 1.6x and 1.25x the products of the real sizes.
The kernel here handles the token as X^T (128, n1), cut along n1 into two or three power-of-two pieces
(86 -> 64 + 32, 112 -> 64 + 32 + 16), so that every product keeps the 128 rows of n2, the long side of a wgmma,
and only the last piece carries padding: X'^T = (P2^T X^T) P1, with P2^T X^T = (X P2)^T exact and split into hi + lo
16-bit halves (the fp32 intermediate of the contract), the register operand of the products with P1's blocks.
Same contract, codes and scales as the padded kernel (the quantizer is the same jit helpers); ``kron_quantize_triton``
dispatches here (``uses_pieces``). Design and timings: docs/kernels-kron-quantize.md.
"""

from __future__ import annotations

import functools

from .. import envflags as _envflags
from . import kron_quantize as _kq
from . import pdl as _pdl
from .kron_quantize import tl, triton

__all__ = ["PIECES", "launch_pieces", "piece_sizes", "pieces_candidate_configs", "pieces_of", "uses_pieces"]

# On by default where it applies (uses_pieces); FLATQUANT_KRON_PIECES=0 keeps the padded tile
PIECES = _envflags.switch("FLATQUANT_KRON_PIECES", True, "padded power-of-two tiles", "pieces where they apply")


@functools.cache  # asked on every launch
def piece_sizes(n: int) -> tuple[int, ...] | None:
    """Powers of two >= 16, largest first, at most three, covering n with less padding than the next power of
    two (86 -> (64, 32), 112 -> (64, 32, 16)); None where they would not (powers of two, n <= 16)."""
    if n <= 16 or n & (n - 1) == 0:
        return None
    m = -(-n // 16) * 16
    pieces = [1 << b for b in range(m.bit_length() - 1, 3, -1) if m >> b & 1]
    if len(pieces) > 3:
        pieces = pieces[:2] + [2 * pieces[2]]
    return tuple(pieces) if sum(pieces) < _kq._next_pow2(n) else None


PIECES_N2 = 128  # the pieces kernel's n2: the LLaMA-family intermediate sizes (86, 108, 112 x 128)


def pieces_of(n1: int, n2: int) -> tuple[int, ...] | None:
    """The pieces kernel's cut of n1 for n1 x n2 tokens, or None where it does not apply: n2 must be
    ``PIECES_N2`` (every product then has 128 rows, wgmma's long side; the cut has run on a GPU only there) and
    n1 must save padding within the register budget of 128 x 128 elements (86 -> (64, 32), 112 -> (64, 32, 16))."""
    pieces = piece_sizes(n1)
    if n2 != PIECES_N2 or pieces is None or n2 * sum(pieces) > _kq._MAX_TILE:
        return None
    return pieces


def uses_pieces(n1: int, n2: int, has_p1: bool, has_p2: bool, intermediate: str, norm) -> bool:
    """Whether a launch without a fixed config takes the pieces kernel: both factors, fp32 intermediate, no fused
    norm, and two pieces (86 x 128). Three pieces (112 x 128: 64 + 32 + 16) measured no faster
    than the padded tile (docs/kernels-kron-quantize.md), so they stay on it."""
    pieces = pieces_of(n1, n2)
    if not PIECES or pieces is None or len(pieces) != 2:
        return False
    return has_p1 and has_p2 and intermediate == "fp32" and not norm


def _pieces_default_config(bucket: int) -> dict:
    """Fixed launch config of the pieces kernel (interpreter, FLATQUANT_AUTOTUNE=0)."""
    return {"PROGS_PER_SM": 1, "FAST_DIV": 0, "num_warps": 8, "num_stages": 1 if bucket == 0 else 2, "maxnreg": None}


def pieces_candidate_configs(bucket: int) -> list[dict]:
    """Launch configs the autotuner chooses among for the pieces kernel: 8 warps (the 128-row products), IEEE
    divisions or the reciprocal multiply, and above SMALL_TOKENS pipeline stages and programs per SM; with
    ``maxnreg=128`` two programs fit on an SM (166-175 registers a thread otherwise), so that one's products can
    overlap the other's quantizer, at the price of spilling (128 bytes a thread in the sm_90 build)."""
    default = _pieces_default_config(bucket)
    if bucket == 0:
        return [default, dict(default, FAST_DIV=1)]
    two = [dict(default, PROGS_PER_SM=2, maxnreg=128, num_stages=s) for s in (1, 2)]
    return [default, dict(default, FAST_DIV=1), dict(default, num_stages=3), dict(default, PROGS_PER_SM=2)] + two


if triton is not None:
    from .kron_quantize import _code_bytes, _codes, _dot, _halves, _real, _scale_zero, _tile_max, _tile_min

    @triton.jit
    def _piece(x_ptr, xrow, O0: tl.constexpr, R: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr):
        """Rows O0 .. O0 + R of the token's X as X^T columns, (N2, R) in x's dtype, zero past row N1."""
        rm = tl.arange(0, N2)
        ro = O0 + tl.arange(0, R)
        mask = (ro[None, :] < N1) & (rm[:, None] < N2)
        return tl.load(x_ptr + xrow + rm[:, None] + ro[None, :] * N2, mask=mask, other=0.0)

    @triton.jit
    def _block(p1_ptr, OJ: tl.constexpr, OI: tl.constexpr, RJ: tl.constexpr, RI: tl.constexpr, N1: tl.constexpr):
        """Block [OJ : OJ + RJ, OI : OI + RI] of P1 (N1, N1), zero-padded."""
        rj = OJ + tl.arange(0, RJ)
        ri = OI + tl.arange(0, RI)
        return tl.load(p1_ptr + rj[:, None] * N1 + ri[None, :], mask=(rj[:, None] < N1) & (ri[None, :] < N1), other=0.0)

    @triton.jit
    def _split_dot(hi, lo, r, acc, INTERPRET: tl.constexpr):
        """acc + (hi + lo) @ r, the low half first (as the main kernel)."""
        return _dot(hi, r, _dot(lo, r, acc, INTERPRET), INTERPRET)

    @triton.jit
    def _piece_range(z, O0: tl.constexpr, R: tl.constexpr, N1: tl.constexpr, SYMMETRIC: tl.constexpr):
        """(max, min) of piece z (N2, R) over its real columns."""
        real = (O0 + tl.arange(0, R))[None, :] < N1  # (1, R), broadcast over the rows
        return _tile_max(_real(z, real, -float("inf"), SYMMETRIC)), _tile_min(_real(z, real, float("inf"), SYMMETRIC))

    @triton.jit
    def _store_piece(
        z,
        scale,
        zero,
        q_ptr,
        qrow,
        O0: tl.constexpr,
        R: tl.constexpr,
        N1: tl.constexpr,
        N2: tl.constexpr,
        SYMMETRIC: tl.constexpr,
        BITS: tl.constexpr,
        PACK: tl.constexpr,
        FAST_DIV: tl.constexpr,
    ):
        """Quantize piece z (N2, R) of the token's X'^T and store its codes (code of X'[o, m] at qrow + o * N2 + m;
        packed pairs are neighbours in m, i.e. along the piece's rows)."""
        qi = _codes(z, scale, zero, SYMMETRIC, BITS, FAST_DIV)
        ro = O0 + tl.arange(0, R)
        if PACK:
            lo, hi = tl.split(tl.permute(tl.reshape(qi, (N2 // 2, 2, R)), (0, 2, 1)))  # (N2 // 2, R): even / odd m
            byte = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
            rh = tl.arange(0, N2 // 2)
            mask = (ro[None, :] < N1) & (rh[:, None] < N2 // 2)
            tl.store(q_ptr + qrow // 2 + rh[:, None] + ro[None, :] * (N2 // 2), byte, mask=mask)
        else:
            rm = tl.arange(0, N2)
            mask = (ro[None, :] < N1) & (rm[:, None] < N2)
            tl.store(q_ptr + qrow + rm[:, None] + ro[None, :] * N2, _code_bytes(qi, zero, q_ptr, SYMMETRIC), mask=mask)

    @triton.jit(do_not_specialize=["n_tokens", "T_BUCKET"])
    def _kron_quantize_pieces_kernel(
        # pointers: x (T, n) row stride stride_xt; p1 (N1, N1); p2 (N2, N2); q codes; scale / zero (T,)
        x_ptr,
        p1_ptr,
        p2_ptr,
        q_ptr,
        scale_ptr,
        zero_ptr,
        # runtime scalars
        clip_max,
        clip_min,
        inv_qmax,  # fp32 1 / qmax, used when RECIP
        n_tokens,
        stride_xt,
        T_BUCKET,  # token-count bucket: an autotune key, unused in the body
        # shapes: N2 a power of two (128), N1 <= R0 + R1 + R2 (pieces, powers of two, R2 = 0: two pieces)
        N1: tl.constexpr,
        N2: tl.constexpr,
        R0: tl.constexpr,
        R1: tl.constexpr,
        R2: tl.constexpr,
        # variants (both factors, fp32 intermediate)
        SYMMETRIC: tl.constexpr,
        BITS: tl.constexpr,
        PACK: tl.constexpr,
        INTERPRET: tl.constexpr,
        RECIP: tl.constexpr,
        # launch config (autotuned)
        PROGS_PER_SM: tl.constexpr,
        FAST_DIV: tl.constexpr = 0,
        PDL: tl.constexpr = False,
        PDL_EARLY: tl.constexpr = True,  # as in _kron_quantize_kernel
    ):
        # X'^T = (P2^T X^T) P1 = (X P2)^T P1: W_j = P2^T @ (piece j of X^T) is exact (16-bit products, fp32 sums)
        # and is split into hi + lo halves, the left (register) operand of the products with P1's blocks.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        dt = x_ptr.dtype.element_ty
        O1: tl.constexpr = R0
        O2: tl.constexpr = R0 + R1
        rm = tl.arange(0, N2)
        p2t = tl.load(p2_ptr + rm[None, :] * N2 + rm[:, None])  # (N2, N2), p2t[a, b] = P2[b, a]
        r00 = _block(p1_ptr, 0, 0, R0, R0, N1)
        r01 = _block(p1_ptr, 0, O1, R0, R1, N1)
        r10 = _block(p1_ptr, O1, 0, R1, R0, N1)
        r11 = _block(p1_ptr, O1, O1, R1, R1, N1)
        if R2 > 0:
            r02 = _block(p1_ptr, 0, O2, R0, R2, N1)
            r12 = _block(p1_ptr, O1, O2, R1, R2, N1)
            r20 = _block(p1_ptr, O2, 0, R2, R0, N1)
            r21 = _block(p1_ptr, O2, O1, R2, R1, N1)
            r22 = _block(p1_ptr, O2, O2, R2, R2, N1)
        _pdl.wait_previous(PDL, PDL_EARLY)
        for i in range(0, (n_tokens - pid + nprog - 1) // nprog):
            t64 = (pid + i * nprog).to(tl.int64)
            xrow = t64 * stride_xt
            w0 = _dot(p2t, _piece(x_ptr, xrow, 0, R0, N1, N2), tl.full((N2, R0), 0.0, tl.float32), INTERPRET)
            w1 = _dot(p2t, _piece(x_ptr, xrow, O1, R1, N1, N2), tl.full((N2, R1), 0.0, tl.float32), INTERPRET)
            h0, l0 = _halves(w0, dt, INTERPRET)
            h1, l1 = _halves(w1, dt, INTERPRET)
            z0 = _split_dot(h0, l0, r00, tl.full((N2, R0), 0.0, tl.float32), INTERPRET)  # X'^T, columns of piece 0
            z0 = _split_dot(h1, l1, r10, z0, INTERPRET)
            z1 = _split_dot(h0, l0, r01, tl.full((N2, R1), 0.0, tl.float32), INTERPRET)
            z1 = _split_dot(h1, l1, r11, z1, INTERPRET)
            if R2 > 0:
                w2 = _dot(p2t, _piece(x_ptr, xrow, O2, R2, N1, N2), tl.full((N2, R2), 0.0, tl.float32), INTERPRET)
                h2, l2 = _halves(w2, dt, INTERPRET)
                z0 = _split_dot(h2, l2, r20, z0, INTERPRET)
                z1 = _split_dot(h2, l2, r21, z1, INTERPRET)
                z2 = _split_dot(h0, l0, r02, tl.full((N2, R2), 0.0, tl.float32), INTERPRET)
                z2 = _split_dot(h2, l2, r22, _split_dot(h1, l1, r12, z2, INTERPRET), INTERPRET)
            zmax, zmin = _piece_range(z0, 0, R0, N1, SYMMETRIC)
            zmax1, zmin1 = _piece_range(z1, O1, R1, N1, SYMMETRIC)
            zmax, zmin = tl.maximum(zmax, zmax1), tl.minimum(zmin, zmin1)
            if R2 > 0:
                zmax2, zmin2 = _piece_range(z2, O2, R2, N1, SYMMETRIC)
                zmax, zmin = tl.maximum(zmax, zmax2), tl.minimum(zmin, zmin2)
            scale, zero = _scale_zero(zmax, zmin, clip_max, clip_min, inv_qmax, SYMMETRIC, BITS, RECIP)
            qrow = t64 * (N1 * N2)
            _store_piece(z0, scale, zero, q_ptr, qrow, 0, R0, N1, N2, SYMMETRIC, BITS, PACK, FAST_DIV)
            _store_piece(z1, scale, zero, q_ptr, qrow, O1, R1, N1, N2, SYMMETRIC, BITS, PACK, FAST_DIV)
            if R2 > 0:
                _store_piece(z2, scale, zero, q_ptr, qrow, O2, R2, N1, N2, SYMMETRIC, BITS, PACK, FAST_DIV)
            tl.store(scale_ptr + t64, scale)
            if not SYMMETRIC:
                tl.store(zero_ptr + t64, zero)


if triton is not None:
    _ALL_PIECES_CONFIGS = {tuple(sorted(c.items())): c for bucket in (0, 1) for c in pieces_candidate_configs(bucket)}

    def _prune_pieces(configs, named_args, **kwargs):
        return _kq._keep(configs, pieces_candidate_configs({**named_args, **kwargs}["T_BUCKET"]))

    _TUNE_PIECES = dict(
        configs=[_kq._as_triton_config(c) for c in _ALL_PIECES_CONFIGS.values()],
        key=["N1", "N2", "T_BUCKET", "SYMMETRIC", "PACK"],
        prune_configs_by={"early_config_prune": _prune_pieces},
    )
    _kron_quantize_pieces_tuned = _kq.graph_autotune(_kron_quantize_pieces_kernel, **_TUNE_PIECES)


def launch_pieces(x2, p1c, p2c, codes, scale, zero, scalars, n1, n2, symmetric, bits, pack, fixed, config, meta):
    """Launch the pieces kernel (``_kron_quantize_pieces_kernel``) for both factors and the fp32 intermediate.

    x2 (T, n), p1c / p2c the factors in x's dtype (x2 itself where a factor is absent: refused), codes / scale / zero
    the outputs ``kron_quantize_triton`` allocated; scalars = (clip_max, clip_min, inv_qmax, eps, T, row stride);
    fixed: the caller's fixed config without ``PIECES`` (``config`` None: autotuned); meta: compile and PDL
    options of the launch."""
    pieces = pieces_of(n1, n2)
    if pieces is None or p1c is x2 or p2c is x2:
        raise ValueError(
            f"PIECES=1 needs both factors, n2 = {PIECES_N2} and an n1 that power-of-two pieces cover with less "
            f"padding (e.g. 86 x 128), got {n1}x{n2}"
        )
    clip_max, clip_min, inv_qmax, _eps, n_tokens, stride = scalars
    bucket = _kq._token_bucket(n_tokens)
    args = (x2, p1c, p2c, codes, scale, zero if zero is not None else scale)
    args += (clip_max, clip_min, inv_qmax, n_tokens, stride, bucket)
    args += (n1, n2, *(pieces + (0,) * (3 - len(pieces))), symmetric, bits, pack, _kq._interpreting(), x2.is_cuda)
    sms = _kq._sm_count(x2.device)

    def grid(m):
        return (max(1, min(n_tokens, sms * m["PROGS_PER_SM"])),)

    if _kq._use_autotuner(config):
        _kron_quantize_pieces_tuned[grid](*args, **meta)
        return
    cfg = _kq._fixed_config(_pieces_default_config(bucket), fixed, "the pieces kernel", "and PIECES")
    _kron_quantize_pieces_kernel[grid(cfg)](*args, **meta, **_kq._compile_options(cfg))
