"""INT4 KV cache: per-(token, head) asymmetric quantization and decode attention over the packed cache.

Layout of one layer's cache (B batch, Hkv key/value heads, S_cap capacity, D head_dim):

    k_packed, v_packed  uint8 (B, Hkv, S_cap, D // 2)  byte j = code 2j (low nibble) | code 2j+1 (high nibble)
    k_scale, k_zero, v_scale, v_zero  fp32 (B, Hkv, S_cap)   x ~= (code - zero) * scale

Quantization is exactly the fake quantizer of :mod:`flatquant.quantizer` with ``symmetric=False`` (the KV
setting), so ``dequantize_kv(*quantize_kv(x, bits, cmax, cmin))`` equals ``fake_quantize``'s output bit for
bit in fp32 (docs/kernels-decode-attention.md). ``decode_attention`` computes one query token per sequence
against the packed cache; its Triton kernel is flash-decoding: the sequence is split into chunks across
programs, each program handles all G query heads of one KV head (the 4-bit cache is read once per group)
with an online softmax, and a second small kernel merges the chunks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings

import torch

from .. import envflags as _envflags
from ..files import atomic_write_json
from . import kron_quantize as _kq
from . import pdl as _pdl
from . import rows_matmul as _rm

triton, tl = _kq.triton, _kq.tl

__all__ = [
    "append_kv_at",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_triton",
    "dequantize_kv",
    "quantize_dequantize_kv",
    "quantize_kv",
    "quantize_kv_at",
    "quantize_kv_reference",
    "quantize_kv_triton",
]

_EPS = 1e-8  # the fake quantizer's lower bound on (xmax - xmin)
_IMPLS = ("auto", "triton", "torch")
_Q_DTYPES = (torch.bfloat16, torch.float16)
_MAX_SPLITS = 64  # chunks per sequence; the merge kernel holds (splits, D) fp32 in registers
_LOG2E = math.log2(math.e)
# decode kernel launch: tokens per step, warps, pipeline stages, target programs per SM, inline-PTX unpacking
# (and whether the products run on tensor cores, and the one-query-row CUDA-core loop, see _decode_flat_steps)
DEFAULT_CONFIG = {
    "block_n": 64, "num_warps": 4, "num_stages": 2, "progs_per_sm": 4, "asm": False, "mma": True, "flat": False,
    "two_pass": False, "words": False, "prefetch": False,
}  # fmt: skip
# On CUDA the launch config is chosen per shape among CANDIDATE_CONFIGS by timing CUDA-graph replays (set
# False, or FLATQUANT_AUTOTUNE=0, for DEFAULT_CONFIG)
AUTOTUNE = _kq.AUTOTUNE  # FLATQUANT_AUTOTUNE, read once for all kernels
CANDIDATE_CONFIGS = [DEFAULT_CONFIG] + [
    {"block_n": bn, "num_warps": w, "num_stages": st, "progs_per_sm": pps, "asm": asm, "mma": True, "flat": False}
    for bn, w, st, pps, asm in itertools.product((32, 64, 128), (4, 8), (2,), (2, 4, 8), (False, True))
    if (bn, w, st, pps, asm) != (64, 4, 2, 4, False) and (bn, w) != (128, 4)  # 128 x 4 warps spills (sm_90)
]
# CUDA-core products for one or two query heads per KV head (MHA models: a tensor-core tile of 16 query rows
# would be 15/16 padding); tuned only for such shapes
MAX_G_CUDA_CORES = 2
CANDIDATE_CONFIGS += [
    {"block_n": bn, "num_warps": w, "num_stages": 2, "progs_per_sm": pps, "asm": False, "mma": False, "flat": False}
    for bn, w, pps in itertools.product((32, 64), (4, 8), (4, 8))
]
# one query row per KV head only (MHA): no per-step reduction over tokens, fewer instructions per code
CANDIDATE_CONFIGS += [
    {"block_n": bn, "num_warps": w, "num_stages": 2, "progs_per_sm": pps, "asm": asm, "mma": False, "flat": True,
     "two_pass": False}
    for bn, w, pps, asm in itertools.product((32, 64), (4, 8), (4, 8), (False, True))
]  # fmt: skip
# the one-row loop in two passes (scores, then values; see _decode_two_pass_steps): no cross-warp reduction or
# barrier inside either loop, so the loads of successive token blocks can overlap
CANDIDATE_CONFIGS += [
    {"block_n": bn, "num_warps": w, "num_stages": 2, "progs_per_sm": pps, "asm": True, "mma": False, "flat": True,
     "two_pass": True}
    for bn, w, pps in itertools.product((32, 64, 128), (4, 8), (4, 8))
    if (bn, w) != (128, 4)
]  # fmt: skip
# the same on int32 words of codes, and with the next token block loaded while the current one is computed (two
# blocks in flight per program; see _decode_two_pass_words_steps); head_dim a multiple of 8
CANDIDATE_CONFIGS += [
    {"block_n": bn, "num_warps": w, "num_stages": 2, "progs_per_sm": pps, "asm": True, "mma": False, "flat": True,
     "two_pass": True, "words": True, "prefetch": pf}
    for bn, w, pps, pf in itertools.product((32, 64), (4, 8), (4, 8), (False, True))
]  # fmt: skip
# the tensor-core tile loop in two passes (scores, then values; see _decode_mma_two_pass_steps): no reduction over
# the tokens (no cross-warp maximum) inside either loop. Timed on an NVIDIA H200 at LLaMA-3-8B shapes (G = 4) it won
# at batch 1 with an 8192-token context only (14.3 against 16.3 us) and lost 9-31% at batch 16 and 64, so only its
# configs closest to that winner are candidates (docs/kernels-decode-attention.md)
CANDIDATE_CONFIGS += [
    {"block_n": bn, "num_warps": 4, "num_stages": 2, "progs_per_sm": pps, "asm": True, "mma": True, "flat": False,
     "two_pass": True}
    for bn, pps in ((64, 2), (64, 4), (64, 8), (32, 4))
]  # fmt: skip
CANDIDATE_CONFIGS = [{**DEFAULT_CONFIG, **c} for c in CANDIDATE_CONFIGS]  # every key in every candidate
_TUNED: dict[tuple, dict] = {}  # shape key -> the fastest candidate (see _tuned_config)
_SKIPPED: dict[tuple, list[tuple[dict, str]]] = {}  # shape key -> candidates that failed to run, with the error


def applies(config: dict, group: int, head_dim: int | None = None) -> bool:
    """Whether a decode launch config can run ``group`` query heads per KV head (CUDA-core configs take at
    most MAX_G_CUDA_CORES, the one-row ``flat`` loop exactly one; two passes the ``flat`` or the tensor-core
    loop; the ``words`` loop a head_dim that is a multiple of 8, when head_dim is given)."""
    if config.get("two_pass", False) and not (config.get("flat", False) or config.get("mma", True)):
        return False
    if config.get("prefetch", False) and not config.get("words", False):
        return False
    if config.get("words", False) and (
        not (config.get("two_pass", False) and config.get("flat", False)) or (head_dim or 8) % 8
    ):
        return False
    if config.get("flat", False):
        return group == 1 and not config.get("mma", True)
    return config.get("mma", True) or group <= MAX_G_CUDA_CORES


def shape_meta(group: int, head_dim: int, mma: bool) -> dict:
    """The decode kernel's shape constexprs: query rows padded to a power of two (to 16, the tensor-core
    minimum, when ``mma``) and half the head dimension padded to a power of two >= 16."""
    half = head_dim // 2
    block_g = max(16 if mma else 1, triton.next_power_of_2(group))
    return dict(G=group, HALF_D=half, BLOCK_G=block_g, BLOCK_HD=max(16, triton.next_power_of_2(half)))


def _tuning_file() -> str:
    """Where tuning results persist across processes (FLATQUANT_CACHE_DIR, default ~/.cache/flatquant)."""
    root = os.environ.get("FLATQUANT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flatquant")
    return os.path.join(root, "decode_attention_tuning.json")


def _disk_key(key: tuple) -> str:
    """The persistent form of a tuning key: also the GPU, the software and the kernel and candidates' source."""
    device, dtype, *shape = key
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    kernel = getattr(_decode_chunk_kernel, "cache_key", "") if triton is not None else ""
    stamp = hashlib.sha256(f"{kernel}{CANDIDATE_CONFIGS}".encode()).hexdigest()[:16]
    return f"{name}|torch {torch.__version__}|triton {getattr(triton, '__version__', '-')}|{stamp}|{dtype}|{shape}"


def _read_tuning_file() -> dict:
    try:
        with open(_tuning_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or unreadable: tune afresh
        return {}


# ------------------------------------------------------------------------------------ quantize (torch)
def _check_bits(bits: int, d: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits=}")
    if bits == 4 and d % 2:
        raise ValueError(f"4-bit codes are packed two per byte and need an even last dimension, got {d=}")


def quantize_kv_reference(x: torch.Tensor, bits: int = 4, clip_max: float = 1.0, clip_min: float = 1.0):
    """Plain PyTorch :func:`quantize_kv` (any device): the fake quantizer's operations, in fp32."""
    _check_bits(bits, x.shape[-1])
    qmax = 2**bits - 1
    xf = x.float()  # (..., D)
    xmin, xmax = torch.aminmax(xf, dim=-1)  # (...,)
    xmax = xmax.clamp_min(0) * clip_max
    xmin = xmin.clamp_max(0) * clip_min
    scale = (xmax - xmin).clamp_min(_EPS) / qmax
    zero = torch.round(-xmin / scale)
    codes = torch.div(xf, scale[..., None]).round_().add_(zero[..., None]).clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale, zero


def dequantize_kv(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`: ``(code - zero) * scale`` in fp32, then cast to ``dtype``.

    packed: uint8 (..., D // 2) for 4 bits, else uint8 codes (..., D); scale, zero: fp32 (...,).
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype=}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits=}")
    codes = packed
    if bits == 4:
        codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # (..., D)
    out = (codes.float() - zero[..., None].float()) * scale[..., None].float()
    return out.to(dtype)


# ----------------------------------------------------------------------------------- Triton kernels
def _unpack_ptx(lo_shift: str, hi_shift: str, mask: int, magic: int) -> str:
    """PTX for 4 packed bytes ($4) -> 16 + their low nibbles ($0, $1) and 16 + their high nibbles ($2, $3),
    two 16-bit values per register: prmt moves bytes 0, 1 (2, 3) into the two 16-bit lanes, then a shift puts
    the nibble at the mantissa position where it counts units, and / or mask it and add the exponent of 16."""
    body = ["prmt.b32 t0, $4, 0, 0x4140;", "prmt.b32 t1, $4, 0, 0x4342;"]
    for out, src, shift in (
        ("$0", "t0", lo_shift),
        ("$1", "t1", lo_shift),
        ("$2", "t0", hi_shift),
        ("$3", "t1", hi_shift),
    ):
        body += [
            shift.format(out, src) + ";",
            f"and.b32 {out}, {out}, {mask:#010x};",
            f"or.b32 {out}, {out}, {magic:#010x};",
        ]
    return "{ .reg .b32 t0, t1; " + " ".join(body) + " }"


def _unpack_ptx_f32() -> str:
    """PTX for 4 packed bytes ($8) -> 128 + their low nibbles ($0 .. $3) and 128 + their high nibbles ($4 .. $7) as
    fp32. The nibbles of the four bytes are masked out in place (one and; a shift first for the high ones), then
    one prmt per code assembles the fp32 128 + c: byte 3 = 0x43 (sign, exponent of 128), byte 2 = the byte
    holding c (bits 16-19, where one unit of c counts 1 in [128, 256)), bytes 1 and 0 = 0. Eleven instructions
    per eight codes, no conversion; the constant 0x4300 is the prmt's second source (bytes 4-7)."""
    body = ["and.b32 l, $8, 0x0F0F0F0F;", "shr.b32 h, $8, 4;", "and.b32 h, h, 0x0F0F0F0F;"]
    for out, src, j in [(f"${j}", "l", j) for j in range(4)] + [(f"${4 + j}", "h", j) for j in range(4)]:
        body.append(f"prmt.b32 {out}, {src}, 0x4300, {0x5044 + 0x100 * j:#06x};")
    return "{ .reg .b32 l, h; " + " ".join(body) + " }"


if triton is not None:
    # bf16 in [16, 32): one unit is 2^3 mantissa steps; fp16: 2^6. The high nibble sits 4 bits higher.
    _PTX_BF16 = tl.constexpr(_unpack_ptx("shl.b32 {}, {}, 3", "shr.b32 {}, {}, 1", 0x00780078, 0x41804180))
    _PTX_FP16 = tl.constexpr(_unpack_ptx("shl.b32 {}, {}, 6", "shl.b32 {}, {}, 2", 0x03C003C0, 0x4C004C00))
    _PTX_F32 = tl.constexpr(_unpack_ptx_f32())
    F32_BIAS = tl.constexpr(128.0)  # what _unpack_biased_f32 adds to every code
    # the arithmetic rint here: in this kernel's sm_90 build the one-instruction PTX rint comes out longer
    _dot, _round_to, _rint = _kq._dot, _kq._round_to, _kq._rint_arith

    @triton.jit
    def _row_max(v):
        return tl.reduce(v, 1, tl.standard._elementwise_max)

    @triton.jit
    def _row_min(v):
        return tl.reduce(v, 1, tl.standard._elementwise_min)

    @triton.jit
    def _row_sum(v):
        return tl.reduce(v, 1, tl.standard._sum_combine)

    @triton.jit
    def _mm(a, b, MMA: tl.constexpr, INTERPRET: tl.constexpr):
        """a (M, K) @ b (K, N) in fp32: tensor cores (M >= 16) when MMA, else CUDA-core products and sums
        (for one or two query rows, where a tensor-core tile would be mostly padding)."""
        if MMA:
            return _dot(a, b, tl.full((a.shape[0], b.shape[1]), 0.0, tl.float32), INTERPRET)
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1)

    @triton.jit
    def _unpack_ptx_call(p, dt: tl.constexpr):
        """Four bytes per call, the 16-bit results two per register (see _unpack_ptx)."""
        if dt == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(
                _PTX_BF16, "=r,=r,=r,=r,r", [p], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                _PTX_FP16, "=r,=r,=r,=r,r", [p], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
            )
        return lo, hi

    @triton.jit
    def _unpack_biased(p, dt: tl.constexpr, INTERPRET: tl.constexpr, ASM: tl.constexpr):
        """Packed bytes (uint8) -> (16 + low nibble, 16 + high nibble) in dt (bf16/fp16), exactly.

        The code is written into the mantissa of 16.0 (in [16, 32) one unit is 8 bf16 / 64 fp16 mantissa
        steps): integer ops only, no int -> float conversion (a quarter of the ALU rate). ASM does it on two
        codes per 32-bit register (prmt, shift, and, or: ~1.25 instructions per code).
        """
        if ASM and not INTERPRET:
            lo, hi = _unpack_ptx_call(p, dt)
        elif dt == tl.bfloat16:
            p16 = p.to(tl.uint16)
            lo = ((p16 & 15) << 3 | 0x4180).to(dt, bitcast=True)
            hi = ((p16 >> 4) << 3 | 0x4180).to(dt, bitcast=True)
        else:
            p16 = p.to(tl.uint16)
            lo = ((p16 & 15) << 6 | 0x4C00).to(dt, bitcast=True)
            hi = ((p16 >> 4) << 6 | 0x4C00).to(dt, bitcast=True)
        return lo, hi

    @triton.jit
    def _unpack_biased_f32(p, INTERPRET: tl.constexpr, ASM: tl.constexpr):
        """Packed bytes (uint8) -> (F32_BIAS + low nibble, F32_BIAS + high nibble) in fp32, exactly, for the
        CUDA-core loop: the code written into the mantissa of 128.0 (bits 16-19 count units in [128, 256)), so
        no 16-bit stage and no conversion. ASM: four bytes per 32-bit register, 1.375 instructions per code
        (see _unpack_ptx_f32). Products with a 16-bit query or an fp32 weight stay exact or correctly rounded
        (8 + 8 significant bits); the bias is subtracted once per token, as with 16 + c."""
        if ASM and not INTERPRET:
            lo, hi = tl.inline_asm_elementwise(
                _PTX_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [p], dtype=(tl.float32, tl.float32), is_pure=True, pack=4
            )
        else:
            p32 = p.to(tl.uint32)
            lo = ((p32 & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
            hi = ((p32 >> 4) << 16 | 0x43000000).to(tl.float32, bitcast=True)
        return lo, hi

    @triton.jit
    def _load_rows(
        x_ptr, n_rows, stride_x, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, RAW: tl.constexpr = 0
    ):
        """This program's BLOCK_R rows of x (rows of D elements, row stride stride_x) in fp32 (in x's dtype when
        RAW), zero-padded to BLOCK_D; also the int64 row indices, the column indices, the row mask and the
        element mask. :func:`_load_rows3` with one level of rows."""
        x, r64, rd, mr, m, _, _, _ = _load_rows3(x_ptr, n_rows, 1, 1, stride_x, 0, 0, D, BLOCK_R, BLOCK_D, RAW)
        return x, r64, rd, mr, m

    @triton.jit
    def _load_rows3(
        x_ptr, n_rows, H, T, sxb, sxh, sxt, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
        RAW: tl.constexpr = 0,
    ):  # fmt: skip
        """As :func:`_load_rows` for rows r = (b, h, t) = (r // (H*T), r // T % H, r % T) at strides sxb, sxh,
        sxt (e.g. a head-transposed view, whose rows no single stride reaches); also returns (b, h, t)."""
        rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rd = tl.arange(0, BLOCK_D)
        mr = rr < n_rows
        m = mr[:, None] & (rd[None, :] < D)
        r64 = rr.to(tl.int64)
        rb, rh, rt = r64 // (H * T), (r64 // T) % H, r64 % T
        x = tl.load(x_ptr + (rb * sxb + rh * sxh + rt * sxt)[:, None] + rd[None, :], mask=m, other=0.0)
        return (x if RAW else x.to(tl.float32)), r64, rd, mr, m, rb, rh, rt

    @triton.jit
    def _quantize_rows(
        x_ptr,  # (B, H, T, D) rows at strides sxb, sxh, sxt; row r is (b, h, t) = (r // (H*T), r // T % H, r % T)
        code_ptr,  # uint8 (B, H, T, D // 2) packed when PACK, else (..., D); strides csb, csh, cst, 1
        scale_ptr,  # fp32 (B, H, T), strides ssb, ssh, sst; zero_ptr alike
        zero_ptr,
        deq_ptr,  # (R, D) contiguous, the dequantized values in its dtype when DEQ (else unused)
        pos_ptr,  # int32 (B,) when POS: row (b, h, t) goes to position pos[b] + t of the outputs (else unused)
        t_ptr,  # (D, D) in x's dtype when TRANSFORM: rows are quantized as x @ T rounded to x's dtype (else unused)
        clip_max,
        clip_min,
        inv_qmax,  # fp32 1 / (2**BITS - 1), used when RECIP
        n_rows,
        sxb,
        sxh,
        sxt,
        H,
        T,
        csb,
        csh,
        cst,
        ssb,
        ssh,
        sst,
        D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BITS: tl.constexpr,
        PACK: tl.constexpr,
        RECIP: tl.constexpr,
        DEQ: tl.constexpr,
        POS: tl.constexpr,
        TRANSFORM: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """The quantize kernels' body: this program's BLOCK_R rows (see :func:`_quantize_kv_kernel`)."""
        if TRANSFORM:  # K P_h of the runtime, fused: the 16-bit product rounded as the matmul's output
            xr, r64, rd, mr, m, rb, rh_, rt = _load_rows3(x_ptr, n_rows, H, T, sxb, sxh, sxt, D, BLOCK_R, BLOCK_D, 1)
            mt = (rd[:, None] < D) & (rd[None, :] < D)
            t = tl.load(t_ptr + rd[:, None] * D + rd[None, :], mask=mt, other=0.0)  # (BLOCK_D, BLOCK_D)
            y = _dot(xr, t, tl.full((BLOCK_R, BLOCK_D), 0.0, tl.float32), INTERPRET)
            x = _round_to(y, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        else:
            x, r64, rd, mr, m, rb, rh_, rt = _load_rows3(x_ptr, n_rows, H, T, sxb, sxh, sxt, D, BLOCK_R, BLOCK_D)
        if POS:  # device-side append positions (a static cache's decode step: no host value)
            rt += tl.load(pos_ptr + rb, mask=mr, other=0).to(tl.int64)
        c_row = rb * csb + rh_ * csh + rt * cst  # where the row's codes and scale go (e.g. a cache slice)
        s_row = rb * ssb + rh_ * ssh + rt * sst
        # the fake quantizer's fp32 operations, in its order (no fp contraction: see the launch)
        xmax = tl.maximum(_row_max(tl.where(m, x, -float("inf"))), 0.0) * clip_max
        xmin = tl.minimum(_row_min(tl.where(m, x, float("inf"))), 0.0) * clip_min
        if RECIP:  # PyTorch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal
            scale = tl.maximum(xmax - xmin, 1e-8) * inv_qmax
        else:  # on the CPU it divides
            scale = tl.math.div_rn(tl.maximum(xmax - xmin, 1e-8), 2.0**BITS - 1)
        zero = _rint(tl.math.div_rn(-xmin, scale))
        s = scale[:, None]
        q = _rint(_kq._div_exact(x, s, _kq._recip(s))) + zero[:, None]  # the IEEE quotient
        q = tl.minimum(tl.maximum(q, 0.0), 2.0**BITS - 1)
        if DEQ:  # dequantize_kv's (code - zero) * scale in fp32, one rounding to the output dtype
            deq = (q - zero[:, None]) * scale[:, None]
            deq_rows = deq_ptr + r64[:, None] * D + rd[None, :]
            tl.store(deq_rows, _round_to(deq, deq_ptr.dtype.element_ty, INTERPRET), mask=m)
        q = q.to(tl.int32)
        if PACK:
            lo, hi = tl.split(tl.reshape(q, (BLOCK_R, BLOCK_D // 2, 2)))  # even / odd channels
            rh = tl.arange(0, BLOCK_D // 2)
            mh = mr[:, None] & (rh[None, :] < D // 2)
            tl.store(code_ptr + c_row[:, None] + rh[None, :], (lo | (hi << 4)).to(tl.uint8), mask=mh)
        else:
            tl.store(code_ptr + c_row[:, None] + rd[None, :], q.to(tl.uint8), mask=m)
        tl.store(scale_ptr + s_row, scale, mask=mr)
        tl.store(zero_ptr + s_row, zero, mask=mr)

    @triton.jit
    def _quantize_kv_kernel(
        x_ptr, code_ptr, scale_ptr, zero_ptr, deq_ptr, pos_ptr, t_ptr, clip_max, clip_min, inv_qmax, n_rows,
        sxb, sxh, sxt, H, T, csb, csh, cst, ssb, ssh, sst,
        D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr,
        RECIP: tl.constexpr, DEQ: tl.constexpr, POS: tl.constexpr, TRANSFORM: tl.constexpr,
        INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Rows of K or V quantized (arguments as :func:`_quantize_rows`), after the previous kernel (PDL)."""
        _pdl.wait_previous(PDL)
        _quantize_rows(
            x_ptr, code_ptr, scale_ptr, zero_ptr, deq_ptr, pos_ptr, t_ptr, clip_max, clip_min, inv_qmax, n_rows,
            sxb, sxh, sxt, H, T, csb, csh, cst, ssb, ssh, sst, D, BLOCK_R, BLOCK_D, BITS, PACK, RECIP, DEQ, POS,
            TRANSFORM, INTERPRET,
        )  # fmt: skip

    @triton.jit
    def _append_kv_kernel(
        k_ptr, v_ptr,  # (B, H, T, D) at strides skb, skh, skt and svb, svh, svt
        kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,  # the whole caches (codes, scale, zero), one set of strides
        pos_ptr,  # int32 (B,): row (b, h, t) goes to position pos[b] + t
        t_ptr,  # (D, D) P_h in k's dtype when TRANSFORM (K is quantized as k @ P_h)
        k_clip_max, k_clip_min, v_clip_max, v_clip_min, inv_qmax, n_rows, skb, skh, skt, svb, svh, svt, H, T,
        csb, csh, cst, ssb, ssh, sst,
        D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr,
        RECIP: tl.constexpr, TRANSFORM: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """A decode step's K and V appended to the cache in one launch: programs (row block, 0) quantize K,
        (row block, 1) V, each as :func:`_quantize_kv_kernel` with POS (same arithmetic, same bits)."""
        _pdl.wait_previous(PDL)
        if tl.program_id(1) == 0:
            _quantize_rows(
                k_ptr, kc_ptr, ks_ptr, kz_ptr, k_ptr, pos_ptr, t_ptr, k_clip_max, k_clip_min, inv_qmax, n_rows,
                skb, skh, skt, H, T, csb, csh, cst, ssb, ssh, sst, D, BLOCK_R, BLOCK_D, BITS, PACK, RECIP, False, True,
                TRANSFORM, INTERPRET,
            )  # fmt: skip
        else:
            _quantize_rows(
                v_ptr, vc_ptr, vs_ptr, vz_ptr, v_ptr, pos_ptr, t_ptr, v_clip_max, v_clip_min, inv_qmax, n_rows,
                svb, svh, svt, H, T, csb, csh, cst, ssb, ssh, sst, D, BLOCK_R, BLOCK_D, BITS, PACK, RECIP, False, True,
                False, INTERPRET,
            )  # fmt: skip

    @triton.jit
    def _token_block(
        c_ptr, s_ptr, z_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr,
        HALF_D: tl.constexpr,
    ):  # fmt: skip
        """Packed codes (BLOCK_N, BLOCK_HD) uint8 and fp32 scales and zero points of the tokens t0 + (0..BLOCK_N),
        those at or beyond ``end`` masked (never read: they may hold garbage); also the token mask, the element
        mask and the codes' offsets, which V shares (see :func:`_same_block`)."""
        t = t0 + tl.arange(0, BLOCK_N)
        rj = tl.arange(0, BLOCK_HD)
        mt = t < end
        mkv = mt[:, None] & (rj < HALF_D)[None, :]
        off = kv_base + t.to(tl.int64)[:, None] * stride_kt + rj[None, :]
        codes = tl.load(c_ptr + off, mask=mkv, other=0)
        scale = tl.load(s_ptr + sc_base + t, mask=mt, other=0.0)
        zero = tl.load(z_ptr + sc_base + t, mask=mt, other=0.0)
        return codes, scale, zero, mt, mkv, off

    @triton.jit
    def _same_block(c_ptr, s_ptr, z_ptr, off, mkv, sc_base, t0, mt, BLOCK_N: tl.constexpr):
        """V's codes, scales and zero points of the token block that :func:`_token_block` read for K."""
        t = t0 + tl.arange(0, BLOCK_N)
        codes = tl.load(c_ptr + off, mask=mkv, other=0)
        return codes, tl.load(s_ptr + sc_base + t, mask=mt, other=0.0), tl.load(z_ptr + sc_base + t, mask=mt, other=0.0)

    @triton.jit
    def _row_dot4(k_lo, k_hi, qe, qo, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr):
        """sum(k_lo * qe + k_hi * qo, 1) for (BLOCK_N, BLOCK_HD) tiles: four codes per element of a chain of
        fmas (neighbouring bytes, split off in registers) before the row sum, instead of a multiply, an fma
        and an add per two codes."""
        kl_a, kl_b = tl.split(tl.reshape(k_lo, (BLOCK_N, BLOCK_HD // 2, 2)))
        kh_a, kh_b = tl.split(tl.reshape(k_hi, (BLOCK_N, BLOCK_HD // 2, 2)))
        qe_a, qe_b = tl.split(tl.reshape(qe, (BLOCK_HD // 2, 2)))
        qo_a, qo_b = tl.split(tl.reshape(qo, (BLOCK_HD // 2, 2)))
        t = kl_a * qe_a[None, :]
        t = tl.fma(kh_a, qo_a[None, :], t)
        t = tl.fma(kl_b, qe_b[None, :], t)
        t = tl.fma(kh_b, qo_b[None, :], t)
        return tl.sum(t, 1)

    @triton.jit
    def _row_scores(
        k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, t0, end, stride_kt, qe, qo, qs, qk_scale, BLOCK_N: tl.constexpr,
        BLOCK_HD: tl.constexpr, HALF_D: tl.constexpr, INTERPRET: tl.constexpr, ASM: tl.constexpr,
    ):  # fmt: skip
        """One query row's scores (base 2) over the token block at t0, from the packed K codes on CUDA cores:
        (BLOCK_N,) scores (finite garbage beyond ``end``), the token mask, the element mask and the codes'
        offsets (V shares them)."""
        kb, ks, kz, mt, mkv, kv_off = _token_block(
            k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N, BLOCK_HD, HALF_D
        )
        k_lo, k_hi = _unpack_biased_f32(kb, INTERPRET, ASM)
        qc = _row_dot4(k_lo, k_hi, qe, qo, BLOCK_N, BLOCK_HD)  # (BLOCK_N,)
        return (qc - qs * (kz + F32_BIAS)) * (ks * qk_scale), mt, mkv, kv_off

    @triton.jit
    def _decode_flat_steps(
        k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, q_e, q_o, q_sum, m_i, l_i, kv_base, sc_base, start, end,
        stride_kt, qk_scale, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr, HALF_D: tl.constexpr,
        INTERPRET: tl.constexpr, ASM: tl.constexpr,
    ):  # fmt: skip
        """The token loop for one query row (MHA) on CUDA cores; returns (acc_e, acc_o, m, l) as the tile loop.

        Scores are row sums over a token's codes (mostly within a thread: a token row spans a few threads), V is
        accumulated per token row in a (BLOCK_N, D/2) tile and summed over the tokens once, after the loop, and
        the running maximum is raised only when a step's maximum exceeds it by more than 8 (base 2): the weights
        stay below 2^8, and the rescale of the tile runs in few steps instead of every step. All fp32, the codes
        unpacked straight to F32_BIAS + c (:func:`_unpack_biased_f32`), the bias removed once per token."""
        qe = tl.sum(q_e.to(tl.float32), 0)  # (BLOCK_HD,): the one query row
        qo = tl.sum(q_o.to(tl.float32), 0)
        qs = tl.sum(q_sum, 0)
        m_f = tl.max(m_i, 0)  # -inf
        l_f = tl.sum(l_i, 0)  # 0
        pz = l_f
        tile_e = tl.zeros((BLOCK_N, BLOCK_HD), tl.float32)
        tile_o = tl.zeros((BLOCK_N, BLOCK_HD), tl.float32)
        for t0 in range(start, end, BLOCK_N):
            s, mt, mkv, kv_off = _row_scores(
                k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, t0, end, stride_kt, qe, qo, qs, qk_scale, BLOCK_N, BLOCK_HD,
                HALF_D, INTERPRET, ASM,
            )  # fmt: skip
            s = tl.where(mt, s, -float("inf"))
            m_step = tl.max(s, 0)  # finite: every step has a valid token
            if m_step > m_f + 8.0:  # raise the reference maximum (the first step always does)
                alpha = tl.exp2(m_f - m_step)
                tile_e = tile_e * alpha
                tile_o = tile_o * alpha
                l_f = l_f * alpha
                pz = pz * alpha
                m_f = m_step
            p = tl.exp2(s - m_f)  # < 2^8
            l_f += tl.sum(p, 0)
            vb, vs, vz = _same_block(v_ptr, vs_ptr, vz_ptr, kv_off, mkv, sc_base, t0, mt, BLOCK_N)
            pv = p * vs  # p . ((c - z) * s) = sum(p * s * (B + c)) - sum(p * s * (B + z)), B = F32_BIAS
            pz += tl.sum(pv * (vz + F32_BIAS), 0)
            v_lo, v_hi = _unpack_biased_f32(vb, INTERPRET, ASM)
            tile_e += pv[:, None] * v_lo
            tile_o += pv[:, None] * v_hi
        acc_e = (tl.sum(tile_e, 0) - pz)[None, :]  # (1, BLOCK_HD)
        acc_o = (tl.sum(tile_o, 0) - pz)[None, :]
        return acc_e, acc_o, tl.zeros_like(m_i) + m_f, tl.zeros_like(l_i) + l_f

    @triton.jit
    def _store_in_place(ptr, value, mask, INTERPRET: tl.constexpr, ASM: tl.constexpr):
        """``tl.store(ptr, value, mask)`` for fp32 in the layout ``value`` already has (inline PTX): a plain store
        of a row-reduced vector first moves it to a coalesced layout through shared memory, with barriers. The
        threads that hold copies of one element store the same value to the same address. Without ASM (or in the
        interpreter) it is the plain store."""
        if INTERPRET or not ASM:
            tl.store(ptr, value, mask=mask)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.f32 [$1], $2; mov.b32 $0, 0; }",
                "=r,l,r,r", [ptr.to(tl.int64), value, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip

    @triton.jit
    def _keep_scores(ptrs, s, mask, m_slot, INTERPRET: tl.constexpr, ASM: tl.constexpr):
        """The end of a pass-1 step: the block's scores (where ``mask``) to their scratch addresses ``ptrs``,
        folded into the per-slot maxima (one scratch row, or one per query row of the tile loop)."""
        _store_in_place(ptrs, s, mask, INTERPRET, ASM)
        return tl.maximum(m_slot, tl.where(mask, s, -float("inf")))

    @triton.jit
    def _chunk_max(m_slot, AXIS: tl.constexpr = 0):
        """Between the passes: the chunk's maximum score over the token slots (axis AXIS; -inf for an empty chunk,
        where no step ran) and the one pass 2 subtracts (0 then); then a barrier, since pass 2 reads scores other
        threads of the block wrote."""
        m_f = tl.max(m_slot, AXIS)
        m_use = tl.where(m_f > -float("inf"), m_f, 0.0)
        tl.debug_barrier()
        return m_f, m_use

    @triton.jit
    def _decode_two_pass_steps(
        k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, sc_ptr, q_e, q_o, q_sum, m_i, l_i, kv_base, sc_base, s_base,
        start, end, stride_kt, qk_scale, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr, HALF_D: tl.constexpr,
        INTERPRET: tl.constexpr, ASM: tl.constexpr,
    ):  # fmt: skip
        """The one-row loop (as :func:`_decode_flat_steps`) in two passes over the chunk, with no reduction over
        tokens inside either loop: pass 1 reads K, writes each token's score (base 2) to the fp32 scratch row
        ``sc_ptr + s_base`` and keeps a running maximum per token slot of the block; one reduction gives the
        chunk's maximum m; pass 2 reads V and the scores and accumulates exp2(s - m)-weighted values per token
        row, with no rescaling at all. The one-pass loop needs a maximum over the block's tokens (spread over all
        warps: a shared-memory round trip and barriers) every step, which serialises its K load, its softmax and
        its V load; here every step's loads are independent of the previous step's results. Costs 8 bytes of
        scratch traffic per token (against 144 of K and V codes and scales at head_dim 128)."""
        qe = tl.sum(q_e.to(tl.float32), 0)  # (BLOCK_HD,): the one query row
        qo = tl.sum(q_o.to(tl.float32), 0)
        qs = tl.sum(q_sum, 0)
        m_slot = tl.full((BLOCK_N,), -float("inf"), tl.float32)
        for t0 in range(start, end, BLOCK_N):
            s, mt, _, _ = _row_scores(
                k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, t0, end, stride_kt, qe, qo, qs, qk_scale, BLOCK_N, BLOCK_HD,
                HALF_D, INTERPRET, ASM,
            )  # fmt: skip
            m_slot = _keep_scores(sc_ptr + s_base + t0 + tl.arange(0, BLOCK_N), s, mt, m_slot, INTERPRET, ASM)
        m_f, m_use = _chunk_max(m_slot)
        l_slot = tl.zeros((BLOCK_N,), tl.float32)
        pz_slot = tl.zeros((BLOCK_N,), tl.float32)
        tile_e = tl.zeros((BLOCK_N, BLOCK_HD), tl.float32)
        tile_o = tl.zeros((BLOCK_N, BLOCK_HD), tl.float32)
        for t0 in range(start, end, BLOCK_N):
            vb, vs, vz, mt, _, _ = _token_block(
                v_ptr, vs_ptr, vz_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N, BLOCK_HD, HALF_D
            )
            s = tl.load(sc_ptr + s_base + t0 + tl.arange(0, BLOCK_N), mask=mt, other=-float("inf"))
            p = tl.exp2(s - m_use)  # <= 1; 0 beyond the sequence
            l_slot += p
            pv = p * vs  # p . ((c - z) * s) = sum(p * s * (B + c)) - sum(p * s * (B + z)), B = F32_BIAS
            pz_slot += pv * (vz + F32_BIAS)
            v_lo, v_hi = _unpack_biased_f32(vb, INTERPRET, ASM)
            tile_e += pv[:, None] * v_lo
            tile_o += pv[:, None] * v_hi
        pz = tl.sum(pz_slot, 0)
        acc_e = (tl.sum(tile_e, 0) - pz)[None, :]  # (1, BLOCK_HD)
        acc_o = (tl.sum(tile_o, 0) - pz)[None, :]
        return acc_e, acc_o, tl.zeros_like(m_i) + m_f, tl.zeros_like(l_i) + tl.sum(l_slot, 0)

    @triton.jit
    def _decode_mma_two_pass_steps(
        k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, sc_ptr, q_e, q_o, q_sum, kv_base, sc_base, s_base, s_cap,
        start, end, stride_kt, qk_scale, dt: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr, HALF_D: tl.constexpr, INTERPRET: tl.constexpr,
        ASM: tl.constexpr,
    ):  # fmt: skip
        """The tensor-core tile loop (grouped query heads) in two passes, as :func:`_decode_two_pass_steps` does
        for one row: pass 1 computes the G rows' scores on the tensor cores, writes them to G scratch rows
        (``sc_ptr + s_base + g * s_cap``) and keeps per-slot maxima of the scores and of the value scales; one
        reduction gives the chunk's maxima; pass 2 reads V and the scores and accumulates exp2(s - m)-weighted
        values on the tensor cores with no rescale, the sums of the weights per slot. No reduction over tokens
        inside either loop (the one-pass loop takes a row maximum over the warps and a value-scale maximum
        every step)."""
        rg = tl.arange(0, BLOCK_G)
        mg = rg < G
        rows = s_base + rg.to(tl.int64) * s_cap  # (BLOCK_G,): each query row's scratch row
        m_slot = tl.full((BLOCK_G, BLOCK_N), -float("inf"), tl.float32)
        vs_slot = tl.zeros((BLOCK_N,), tl.float32)
        for t0 in range(start, end, BLOCK_N):
            kb, ks, kz, mt, _, _ = _token_block(
                k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N, BLOCK_HD, HALF_D
            )
            k_lo, k_hi = _unpack_biased(kb, dt, INTERPRET, ASM)
            qc = _mm(q_e, tl.trans(k_lo), 1, INTERPRET) + _mm(q_o, tl.trans(k_hi), 1, INTERPRET)
            s = (qc - q_sum[:, None] * (kz + 16.0)[None, :]) * (ks * qk_scale)[None, :]  # (BLOCK_G, BLOCK_N)
            t = t0 + tl.arange(0, BLOCK_N)
            ms = mg[:, None] & mt[None, :]
            m_slot = _keep_scores(sc_ptr + rows[:, None] + t[None, :], s, ms, m_slot, INTERPRET, ASM)
            vs_slot = tl.maximum(vs_slot, tl.load(vs_ptr + sc_base + t, mask=mt, other=0.0))
        vs_max = tl.maximum(tl.max(vs_slot, 0), 1e-30)  # > 0: pv = p * vs / vs_max lies in [0, 1]
        m_f, m_use = _chunk_max(m_slot, 1)  # (BLOCK_G,): -inf for an empty chunk and padded rows
        l_slot = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        pz_slot = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        acc_e = tl.zeros((BLOCK_G, BLOCK_HD), tl.float32)
        acc_o = tl.zeros((BLOCK_G, BLOCK_HD), tl.float32)
        for t0 in range(start, end, BLOCK_N):
            vb, vs, vz, mt, _, _ = _token_block(
                v_ptr, vs_ptr, vz_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N, BLOCK_HD, HALF_D
            )
            t = t0 + tl.arange(0, BLOCK_N)
            s = tl.load(sc_ptr + rows[:, None] + t[None, :], mask=mg[:, None] & mt[None, :], other=-float("inf"))
            p = tl.exp2(s - m_use[:, None])  # <= 1; 0 beyond the sequence and on padded rows
            l_slot += p
            # p . ((c - z) * s) = vs_max * (p * s / vs_max) . (16 + c) - sum(p * s * (16 + z)); p * s / vs_max is
            # in [0, 1] and goes to the tensor cores as two fp16 halves (~22 significant bits, products exact)
            pv = p * (vs / vs_max)[None, :]
            pz_slot += p * (vs * (vz + 16.0))[None, :]
            v_lo, v_hi = _unpack_biased(vb, tl.float16, INTERPRET, ASM)
            p_hi = pv.to(tl.float16)
            p_lo = (pv - p_hi.to(tl.float32)).to(tl.float16)
            acc_e = _dot(p_lo, v_lo, _dot(p_hi, v_lo, acc_e, INTERPRET), INTERPRET)
            acc_o = _dot(p_lo, v_hi, _dot(p_hi, v_hi, acc_o, INTERPRET), INTERPRET)
        pz = _row_sum(pz_slot)
        acc_e = vs_max * acc_e - pz[:, None]  # (BLOCK_G, BLOCK_HD)
        acc_o = vs_max * acc_o - pz[:, None]
        return acc_e, acc_o, m_f, _row_sum(l_slot)

    @triton.jit
    def _unpack_words_f32(w, INTERPRET: tl.constexpr, ASM: tl.constexpr):
        """int32 words of four packed bytes -> eight fp32 tensors of w's shape: F32_BIAS + the low nibble of byte
        i (i = 0..3), then F32_BIAS + the high nibble of byte i. The same PTX as :func:`_unpack_biased_f32`, one
        word per call (its eight output registers, in their order) instead of four uint8 elements per register."""
        if ASM and not INTERPRET:
            l0, l1, l2, l3, h0, h1, h2, h3 = tl.inline_asm_elementwise(
                _PTX_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1
            )
        else:
            u = w.to(tl.uint32, bitcast=True)
            l0 = ((u & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
            l1 = ((u >> 8 & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
            l2 = ((u >> 16 & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
            l3 = ((u >> 24 & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
            h0 = ((u >> 4 & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
            h1 = ((u >> 12 & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
            h2 = ((u >> 20 & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
            h3 = ((u >> 28 & 15) << 16 | 0x43000000).to(tl.float32, bitcast=True)
        return l0, l1, l2, l3, h0, h1, h2, h3

    @triton.jit
    def _split4(x, BLOCK_W: tl.constexpr):
        """(4 * BLOCK_W,) -> the four (BLOCK_W,) tensors x[4w + i], i = 0..3."""
        b0, b1 = tl.split(tl.reshape(x, (BLOCK_W, 2, 2)))  # [w, a]: x[4w + 2a + b]
        x0, x2 = tl.split(b0)
        x1, x3 = tl.split(b1)
        return x0, x1, x2, x3

    @triton.jit
    def _join4(x0, x1, x2, x3, BLOCK_W: tl.constexpr):
        """The inverse of :func:`_split4`: (4 * BLOCK_W,) with element 4w + i = x_i[w]."""
        return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (4 * BLOCK_W,))

    @triton.jit
    def _word_block(
        c_ptr, s_ptr, z_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
        HALF_W: tl.constexpr,
    ):  # fmt: skip
        """As :func:`_token_block`, the codes read as int32 words (four bytes, eight codes each: HALF_W per
        token), which a loop can carry in one register per word; tokens at or beyond ``end`` are not read."""
        t = t0 + tl.arange(0, BLOCK_N)
        rw = tl.arange(0, BLOCK_W)
        mt = t < end
        words = c_ptr.to(tl.pointer_type(tl.int32))
        off = (kv_base + t.to(tl.int64)[:, None] * stride_kt) // 4 + rw[None, :]
        codes = tl.load(words + off, mask=mt[:, None] & (rw < HALF_W)[None, :], other=0)
        scale = tl.load(s_ptr + sc_base + t, mask=mt, other=0.0)
        zero = tl.load(z_ptr + sc_base + t, mask=mt, other=0.0)
        return codes, scale, zero, mt

    @triton.jit
    def _decode_two_pass_words_steps(
        k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, sc_ptr, q_e, q_o, q_sum, m_i, l_i, kv_base, sc_base, s_base,
        start, end, stride_kt, qk_scale, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr, HALF_D: tl.constexpr,
        INTERPRET: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
    ):  # fmt: skip
        """:func:`_decode_two_pass_steps` on int32 words of codes (HALF_D a multiple of 4): the query and the
        value accumulators are split four ways by byte position, so no step regroups bytes. PREFETCH: each step
        loads the next token block (codes, scales, zero points; pass 2 also the scores) before it computes on
        the current one, so two blocks' loads are in flight per program (Triton pipelines loads only into dots;
        these are plain loads). Carried as words, the prefetched codes stay one register per four bytes (uint8
        tensors carried by a loop are split into a register per byte and regrouped for the unpack). A block
        past ``end`` is fully masked and reads nothing."""
        BLOCK_W: tl.constexpr = BLOCK_HD // 4
        HALF_W: tl.constexpr = HALF_D // 4
        qe0, qe1, qe2, qe3 = _split4(tl.sum(q_e.to(tl.float32), 0), BLOCK_W)  # the one query row, by byte
        qo0, qo1, qo2, qo3 = _split4(tl.sum(q_o.to(tl.float32), 0), BLOCK_W)
        qs = tl.sum(q_sum, 0)
        m_slot = tl.full((BLOCK_N,), -float("inf"), tl.float32)
        if PREFETCH:
            kw, ks, kz, mt = _word_block(
                k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, start, end, stride_kt, BLOCK_N, BLOCK_W, HALF_W
            )
        for t0 in range(start, end, BLOCK_N):
            if PREFETCH:
                kw_c, ks_c, kz_c, mt_c = kw, ks, kz, mt
                kw, ks, kz, mt = _word_block(
                    k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, t0 + BLOCK_N, end, stride_kt, BLOCK_N, BLOCK_W, HALF_W
                )
            else:
                kw_c, ks_c, kz_c, mt_c = _word_block(
                    k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N, BLOCK_W, HALF_W
                )
            l0, l1, l2, l3, h0, h1, h2, h3 = _unpack_words_f32(kw_c, INTERPRET, ASM)
            d = l0 * qe0[None, :]
            d = tl.fma(h0, qo0[None, :], d)
            d = tl.fma(l1, qe1[None, :], d)
            d = tl.fma(h1, qo1[None, :], d)
            d = tl.fma(l2, qe2[None, :], d)
            d = tl.fma(h2, qo2[None, :], d)
            d = tl.fma(l3, qe3[None, :], d)
            d = tl.fma(h3, qo3[None, :], d)
            s = (tl.sum(d, 1) - qs * (kz_c + F32_BIAS)) * (ks_c * qk_scale)
            m_slot = _keep_scores(sc_ptr + s_base + t0 + tl.arange(0, BLOCK_N), s, mt_c, m_slot, INTERPRET, ASM)
        m_f, m_use = _chunk_max(m_slot)
        l_slot = tl.zeros((BLOCK_N,), tl.float32)
        pz_slot = tl.zeros((BLOCK_N,), tl.float32)
        a_l0 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        a_l1 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        a_l2 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        a_l3 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        a_h0 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        a_h1 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        a_h2 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        a_h3 = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        rn = tl.arange(0, BLOCK_N)
        if PREFETCH:
            vw, vs, vz, mt = _word_block(
                v_ptr, vs_ptr, vz_ptr, kv_base, sc_base, start, end, stride_kt, BLOCK_N, BLOCK_W, HALF_W
            )
            sv = tl.load(sc_ptr + s_base + start + rn, mask=mt, other=-float("inf"))
        for t0 in range(start, end, BLOCK_N):
            if PREFETCH:
                vw_c, vs_c, vz_c, sv_c = vw, vs, vz, sv
                vw, vs, vz, mt = _word_block(
                    v_ptr, vs_ptr, vz_ptr, kv_base, sc_base, t0 + BLOCK_N, end, stride_kt, BLOCK_N, BLOCK_W, HALF_W
                )
                sv = tl.load(sc_ptr + s_base + t0 + BLOCK_N + rn, mask=mt, other=-float("inf"))
            else:
                vw_c, vs_c, vz_c, mt_c = _word_block(
                    v_ptr, vs_ptr, vz_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N, BLOCK_W, HALF_W
                )
                sv_c = tl.load(sc_ptr + s_base + t0 + rn, mask=mt_c, other=-float("inf"))
            p = tl.exp2(sv_c - m_use)  # <= 1; 0 beyond the sequence
            l_slot += p
            pv = p * vs_c  # p . ((c - z) * s) = sum(p * s * (B + c)) - sum(p * s * (B + z)), B = F32_BIAS
            pz_slot += pv * (vz_c + F32_BIAS)
            l0, l1, l2, l3, h0, h1, h2, h3 = _unpack_words_f32(vw_c, INTERPRET, ASM)
            a_l0 += pv[:, None] * l0
            a_l1 += pv[:, None] * l1
            a_l2 += pv[:, None] * l2
            a_l3 += pv[:, None] * l3
            a_h0 += pv[:, None] * h0
            a_h1 += pv[:, None] * h1
            a_h2 += pv[:, None] * h2
            a_h3 += pv[:, None] * h3
        pz = tl.sum(pz_slot, 0)
        acc_e = _join4(tl.sum(a_l0, 0), tl.sum(a_l1, 0), tl.sum(a_l2, 0), tl.sum(a_l3, 0), BLOCK_W) - pz
        acc_o = _join4(tl.sum(a_h0, 0), tl.sum(a_h1, 0), tl.sum(a_h2, 0), tl.sum(a_h3, 0), BLOCK_W) - pz
        return acc_e[None, :], acc_o[None, :], tl.zeros_like(m_i) + m_f, tl.zeros_like(l_i) + tl.sum(l_slot, 0)

    @triton.jit
    def _decode_chunk_kernel(
        # inputs
        q_ptr,  # (B, Hq, D) bf16/fp16
        k_ptr,  # uint8 (B, Hkv, S_cap, D // 2); v_ptr has the same strides
        v_ptr,
        ks_ptr,  # fp32 (B, Hkv, S_cap), token stride 1; the four scale/zero tensors share strides
        kz_ptr,
        vs_ptr,
        vz_ptr,
        lens_ptr,  # int32 (B,)
        sc_ptr,  # fp32 (B * HKV * G, S_cap) scratch for the two-pass loops' scores (unused otherwise)
        # outputs: the final (B, Hq, D) when SINGLE, else per-chunk acc (B * Hq, splits, D), m and l
        out_ptr,
        acc_ptr,
        m_ptr,
        l_ptr,
        # runtime scalars
        qk_scale,  # sm_scale * log2(e): the softmax runs in base 2
        s_cap,
        n_splits,  # programs per sequence: each takes an equal share of its token blocks (see below)
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_sb,
        stride_sh,
        stride_ob,
        stride_oh,
        # shapes
        HKV: tl.constexpr,
        G: tl.constexpr,  # query heads per KV head
        HALF_D: tl.constexpr,
        BLOCK_G: tl.constexpr,  # G padded to >= 16 (tensor-core M)
        BLOCK_HD: tl.constexpr,  # HALF_D padded to a power of two
        BLOCK_N: tl.constexpr,  # tokens per step
        SINGLE: tl.constexpr,
        ASM: tl.constexpr,  # unpack codes with inline PTX
        INTERPRET: tl.constexpr,
        MMA: tl.constexpr = 1,  # tensor-core products (BLOCK_G >= 16); 0: CUDA cores, BLOCK_G = G padded (G <= 2)
        FLAT: tl.constexpr = 0,  # G == 1 on CUDA cores: per-token row sums, V accumulated per token row (see below)
        TWO_PASS: tl.constexpr = 0,  # scores first, then values (_decode_two_pass_steps, with MMA _decode_mma_...)
        WORDS: tl.constexpr = 0,  # with TWO_PASS: the codes as int32 words (_decode_two_pass_words_steps)
        PREFETCH: tl.constexpr = 0,  # with WORDS: load the next token block before computing on this one
        PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
    ):
        _pdl.wait_previous(PDL)
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HKV
        kvh = bh % HKV
        seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), s_cap)
        # the chunks divide the sequence's real length, read on the device, not the capacity: a cache filled to
        # half its capacity still gives every program an equal share (no host synchronisation either way)
        chunk = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), n_splits) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
        dt = q_ptr.dtype.element_ty

        rg = tl.arange(0, BLOCK_G)
        rj = tl.arange(0, BLOCK_HD)
        mj = rj < HALF_D
        mq = (rg[:, None] < G) & mj[None, :]
        # even and odd channels apart: q . k = q_even . k_low_nibbles + q_odd . k_high_nibbles
        q_rows = q_ptr + b.to(tl.int64) * stride_qb + (kvh * G + rg)[:, None] * stride_qh + 2 * rj[None, :]
        q_e = tl.load(q_rows, mask=mq, other=0.0)  # (BLOCK_G, BLOCK_HD)
        q_o = tl.load(q_rows + 1, mask=mq, other=0.0)
        q_sum = _row_sum(q_e.to(tl.float32) + q_o.to(tl.float32))  # q.(c - z) = q.(16 + c) - (16 + z) sum(q)

        kv_base = b.to(tl.int64) * stride_kb + kvh * stride_kh
        sc_base = b.to(tl.int64) * stride_sb + kvh * stride_sh
        m_i = tl.full((BLOCK_G,), -float("inf"), tl.float32)
        l_i = tl.full((BLOCK_G,), 0.0, tl.float32)
        acc_e = tl.full((BLOCK_G, BLOCK_HD), 0.0, tl.float32)
        acc_o = tl.full((BLOCK_G, BLOCK_HD), 0.0, tl.float32)
        if MMA and TWO_PASS:
            acc_e, acc_o, m_i, l_i = _decode_mma_two_pass_steps(
                k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, sc_ptr, q_e, q_o, q_sum, kv_base, sc_base,
                bh.to(tl.int64) * G * s_cap, s_cap, start, end, stride_kt, qk_scale, dt, G, BLOCK_G, BLOCK_N,
                BLOCK_HD, HALF_D, INTERPRET, ASM,
            )  # fmt: skip
        elif FLAT and TWO_PASS and WORDS:
            acc_e, acc_o, m_i, l_i = _decode_two_pass_words_steps(
                k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, sc_ptr, q_e, q_o, q_sum, m_i, l_i, kv_base, sc_base,
                bh.to(tl.int64) * s_cap, start, end, stride_kt, qk_scale, BLOCK_N, BLOCK_HD, HALF_D, INTERPRET, ASM,
                PREFETCH,
            )  # fmt: skip
        elif FLAT and TWO_PASS:
            acc_e, acc_o, m_i, l_i = _decode_two_pass_steps(
                k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, sc_ptr, q_e, q_o, q_sum, m_i, l_i, kv_base, sc_base,
                bh.to(tl.int64) * s_cap, start, end, stride_kt, qk_scale, BLOCK_N, BLOCK_HD, HALF_D, INTERPRET, ASM,
            )  # fmt: skip
        elif FLAT:  # one query row: no 16-row tensor-core tile, no per-step reduction over tokens
            acc_e, acc_o, m_i, l_i = _decode_flat_steps(
                k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, q_e, q_o, q_sum, m_i, l_i, kv_base, sc_base, start, end,
                stride_kt, qk_scale, BLOCK_N, BLOCK_HD, HALF_D, INTERPRET, ASM,
            )  # fmt: skip
        else:
            for t0 in range(start, end, BLOCK_N):
                kb, ks, kz, mt, mkv, kv_off = _token_block(
                    k_ptr, ks_ptr, kz_ptr, kv_base, sc_base, t0, end, stride_kt, BLOCK_N, BLOCK_HD, HALF_D
                )
                k_lo, k_hi = _unpack_biased(kb, dt, INTERPRET, ASM)
                # biased codes 16 + c are exact in 16 bits; products exact, fp32 accumulation
                qc = _mm(q_e, tl.trans(k_lo), MMA, INTERPRET) + _mm(q_o, tl.trans(k_hi), MMA, INTERPRET)
                # scores (BLOCK_G, BLOCK_N), base 2
                s = (qc - q_sum[:, None] * (kz + 16.0)[None, :]) * (ks * qk_scale)[None, :]
                s = tl.where(mt[None, :], s, -float("inf"))
                m_new = tl.maximum(m_i, _row_max(s))  # finite: every step has a valid token
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + _row_sum(p)

                vb, vs, vz = _same_block(v_ptr, vs_ptr, vz_ptr, kv_off, mkv, sc_base, t0, mt, BLOCK_N)
                # p . ((c - z) * s) = vs_max * (p * s / vs_max) . (16 + c) - sum(p * s * (16 + z)); p * s / vs_max
                # is in [0, 1] and goes to the tensor cores as two fp16 halves (~22 significant bits, products
                # exact)
                vs_max = tl.reduce(vs, 0, tl.standard._elementwise_max)  # > 0: every step has a valid token
                pv = p * (vs / vs_max)[None, :]
                pz = _row_sum(p * (vs * (vz + 16.0))[None, :])
                v_lo, v_hi = _unpack_biased(vb, tl.float16, INTERPRET, ASM)
                if MMA:
                    p_hi = pv.to(tl.float16)
                    p_lo = (pv - p_hi.to(tl.float32)).to(tl.float16)
                    zero_acc = tl.full((BLOCK_G, BLOCK_HD), 0.0, tl.float32)
                    pv_e = _dot(p_lo, v_lo, _dot(p_hi, v_lo, zero_acc, INTERPRET), INTERPRET)
                    pv_o = _dot(p_lo, v_hi, _dot(p_hi, v_hi, zero_acc, INTERPRET), INTERPRET)
                else:  # fp32 throughout: p needs no split
                    pv_e = _mm(pv, v_lo, 0, INTERPRET)
                    pv_o = _mm(pv, v_hi, 0, INTERPRET)
                acc_e = acc_e * alpha[:, None] + vs_max * pv_e - pz[:, None]
                acc_o = acc_o * alpha[:, None] + vs_max * pv_o - pz[:, None]
                m_i = m_new

        h = kvh * G + rg
        if SINGLE:
            inv = 1.0 / tl.maximum(l_i, 1.0)  # l >= 1 once a token is seen (its max term is 1); else acc = 0
            o_rows = out_ptr + b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + 2 * rj[None, :]
            o_dt = out_ptr.dtype.element_ty
            tl.store(o_rows, _round_to(acc_e * inv[:, None], o_dt, INTERPRET), mask=mq)
            tl.store(o_rows + 1, _round_to(acc_o * inv[:, None], o_dt, INTERPRET), mask=mq)
        else:
            row = ((b * (HKV * G) + h) * n_splits + split).to(tl.int64)  # (BLOCK_G,)
            a_rows = acc_ptr + row[:, None] * (2 * HALF_D) + 2 * rj[None, :]
            tl.store(a_rows, acc_e, mask=mq)
            tl.store(a_rows + 1, acc_o, mask=mq)
            tl.store(m_ptr + row, m_i, mask=rg < G)
            tl.store(l_ptr + row, l_i, mask=rg < G)

    @triton.jit
    def _decode_merge_kernel(
        acc_ptr,  # fp32 (B * Hq, splits, D)
        m_ptr,  # fp32 (B * Hq, splits)
        l_ptr,
        out_ptr,  # (B, Hq, D)
        n_splits,
        stride_ob,
        stride_oh,
        HQ: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        _pdl.wait_previous(PDL)
        row = tl.program_id(0)
        rs = tl.arange(0, BLOCK_S)
        rd = tl.arange(0, BLOCK_D)
        ms = rs < n_splits
        base = row.to(tl.int64) * n_splits
        m = tl.load(m_ptr + base + rs, mask=ms, other=-float("inf"))
        l = tl.load(l_ptr + base + rs, mask=ms, other=0.0)
        m_max = tl.reduce(m, 0, tl.standard._elementwise_max)
        m_max = tl.where(m_max > -float("inf"), m_max, 0.0)  # an empty sequence: all weights 0, no NaN
        w = tl.exp2(m - m_max)  # empty chunks (m = -inf) weigh 0
        denom = tl.maximum(tl.reduce(w * l, 0, tl.standard._sum_combine), 1.0)  # >= 1 unless empty (acc = 0)
        acc = tl.load(acc_ptr + (base + rs)[:, None] * D + rd[None, :], mask=ms[:, None] & (rd[None, :] < D), other=0.0)
        o = tl.reduce(acc * w[:, None], 0, tl.standard._sum_combine)  # (BLOCK_D,)
        o = o / denom
        b = row // HQ
        h = row % HQ
        o_dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + rd, _round_to(o, o_dt, INTERPRET), mask=rd < D)


def _interpreting() -> bool:
    """Whether the kernels were built for the CPU interpreter (TRITON_INTERPRET=1 when imported)."""
    return triton is not None and type(_decode_chunk_kernel).__name__ == "InterpretedFunction"


def _no_fp_fusion() -> dict:
    return {} if _interpreting() else {"enable_fp_fusion": False}  # keep the reference's roundings


def triton_unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``x``, or None when they can."""
    if triton is None:
        return f"triton is not importable ({_kq._TRITON_IMPORT_ERROR}); install triton>=3.0"
    if x.device.type != "cuda" and not _interpreting():
        return f"x is on {x.device}, the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    return None


def _pick(impl: str, x: torch.Tensor) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl=}")
    if impl == "auto":
        return "triton" if x.device.type == "cuda" and triton is not None else "torch"
    return impl


# --------------------------------------------------------------------------------------- quantize
def _check_out(out, x: torch.Tensor, bits: int) -> None:
    """``out`` = (codes, scale, zero) to write into: shapes of x's result, uint8 / fp32, x's device."""
    if len(out) != 3:
        raise ValueError(f"out must be (codes, scale, zero), got {len(out)} tensors")
    width = x.shape[-1] // 2 if bits == 4 else x.shape[-1]
    want = ((*x.shape[:-1], width), tuple(x.shape[:-1]), tuple(x.shape[:-1]))
    dtypes = (torch.uint8, torch.float32, torch.float32)
    for name, t, shape, dtype in zip(("codes", "scale", "zero"), out, want, dtypes, strict=True):
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != x.device:
            raise ValueError(
                f"out {name} must be {dtype} {shape} on {x.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if out[0].stride(-1) != 1:
        raise ValueError("out codes must have unit stride over the code bytes")


def _transform_operand(transform: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The (D, D) transform of x's rows (K's P_h) as the quantize kernels read it: x's device and dtype,
    contiguous; None stays None."""
    if transform is None:
        return None
    d = x.shape[-1]
    if transform.shape != (d, d):
        raise ValueError(f"transform must be ({d}, {d}), got {tuple(transform.shape)}")
    return transform.to(device=x.device, dtype=x.dtype).contiguous()


def _row_blocks(d: int, transform: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of the quantize kernels for rows of d elements (tl.dot with a transform: dims >= 16)."""
    block_d = max(16 if transform else 2, triton.next_power_of_2(d))
    return max(16 if transform else 1, min(16, 4096 // block_d)), block_d


def quantize_kv_triton(
    x: torch.Tensor,
    bits: int = 4,
    clip_max: float = 1.0,
    clip_min: float = 1.0,
    *,
    out: tuple | None = None,
    dequantized: torch.dtype | None = None,
    positions: torch.Tensor | None = None,
    transform: torch.Tensor | None = None,
):
    """One Triton launch for :func:`quantize_kv` (the cache's append path); same results, bit for bit
    (with ``transform``: up to the summation order of the product, see :func:`quantize_kv`).

    out: (codes, scale, zero) tensors to write into instead of new ones, e.g. the slice of a cache at the
    append position (any strides over x's leading dimensions, at most three of them); returned as given.
    dequantized: also return ``dequantize_kv`` of the result in this dtype, computed in the same launch
    (a fourth return value, shaped like x). positions: see :func:`quantize_kv_at` (``out`` is then the whole
    cache, checked there)."""
    reason = triton_unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f"quantize_kv triton kernel cannot run: {reason}")
    d = x.shape[-1]
    _check_bits(bits, d)
    lead = x.shape[:-1]
    if out is not None:
        if positions is None:
            _check_out(out, x, bits)
        if len(lead) > 3:
            raise ValueError(f"out= takes x with at most three leading dimensions, got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if len(lead) > 3:  # rows flat (out= is refused above for such x)
        x2 = x.reshape(-1, d)
        dims = (x2.shape[0],)
    else:  # read in place at x's strides, e.g. a head-transposed view of a projection's output: no copy
        x2, dims = x, tuple(lead)
    n_rows = x.numel() // d if d else 0
    pack = bits == 4
    if out is None:  # new tensors over x's leading dimensions
        codes = torch.empty((*dims, d // 2 if pack else d), device=x.device, dtype=torch.uint8)
        scale = torch.empty(dims, device=x.device, dtype=torch.float32)
        zero = torch.empty_like(scale)
    else:
        codes, scale, zero = out
    deq = None if dequantized is None else torch.empty((n_rows, d), device=x.device, dtype=dequantized)
    if zero.stride() != scale.stride():
        zero_w = torch.empty_like(scale)  # the kernel writes scale and zero with one set of strides
    else:
        zero_w = zero
    # rows as (b, h, t) over the output's leading dimensions, padded to three at the front
    shape3 = (1,) * (3 - len(dims)) + dims
    xs = (0,) * (3 - len(dims)) + tuple(x2.stride()[:-1])
    cs = (0,) * (3 - len(dims)) + tuple(codes.stride()[:-1])
    ss = (0,) * (3 - len(dims)) + tuple(scale.stride())
    transform = _transform_operand(transform, x)
    if n_rows:
        block_r, block_d = _row_blocks(d, transform is not None)
        grid = (triton.cdiv(n_rows, block_r),)
        # the reference's ``range / qmax`` is a true division on the CPU and a multiply by the fp32
        # reciprocal on CUDA (PyTorch's scalar-divisor path); follow the device so the results are equal
        _quantize_kv_kernel[grid](
            x2, codes, scale, zero_w, x2 if deq is None else deq, x2 if positions is None else positions,
            x2 if transform is None else transform, float(clip_max), float(clip_min), _kq._INV_QMAX[(bits, False)],
            n_rows, *xs, shape3[1], shape3[2], *cs, *ss, D=d, BLOCK_R=block_r, BLOCK_D=block_d,
            BITS=bits, PACK=pack, RECIP=x.is_cuda, DEQ=deq is not None, POS=positions is not None,
            TRANSFORM=transform is not None, INTERPRET=_interpreting(), num_warps=4, **_no_fp_fusion(),
            **_pdl.launch_options(_pdl.pdl_on(x2)),
        )  # fmt: skip
        if zero_w is not zero:
            zero.copy_(zero_w)
    extra = () if deq is None else (deq.reshape(x.shape),)
    if out is not None:
        return codes, scale, zero, *extra
    return codes.reshape(*lead, codes.shape[-1]), scale.reshape(lead), zero.reshape(lead), *extra


def quantize_kv(
    x: torch.Tensor,
    bits: int = 4,
    clip_max: float = 1.0,
    clip_min: float = 1.0,
    *,
    impl: str = "auto",
    out: tuple | None = None,
    transform: torch.Tensor | None = None,
):
    """Asymmetric per-row quantization of K or V, exactly the fake quantizer (``symmetric=False``).

    x: (..., D) float, one (token, head) per row (K after RoPE and P_h, or V in P_v space).
    clip_max, clip_min: clipping ratios (``ActivationQuantizer.clip_ratios()``; 1.0 = no clipping).
      xmax = max(x.max(-1), 0) * clip_max ; xmin = min(x.min(-1), 0) * clip_min        (fp32)
      scale = max(xmax - xmin, 1e-8) / (2**bits - 1) ; zero = round(-xmin / scale)
      code = clamp(round(x / scale) + zero, 0, 2**bits - 1)                        (round half to even)
    Returns (codes, scale fp32 (...,), zero fp32 (...,)); codes are uint8 (..., D // 2) packed for 4 bits
    (byte j: code 2j low nibble, code 2j + 1 high nibble), else uint8 (..., D).
    impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "torch" (forced; RuntimeError when
    the forced kernel cannot run).
    out: (codes, scale, zero) to write the results into (e.g. a cache slice; one launch on CUDA, no copies).
    transform: (D, D); quantize ``x @ transform`` (in x's dtype, as a 16-bit matmul returns it: K P_h of the
    runtime) instead of x. The kernel forms the product in the same launch (fp32 sums of the exact 16-bit
    products, one rounding), so its rows can differ from a separate matmul's at a rounding boundary.
    """
    if _pick(impl, x) == "triton":
        return quantize_kv_triton(x, bits, clip_max, clip_min, out=out, transform=transform)
    if transform is not None:
        x = x @ transform.to(x.dtype)
    result = quantize_kv_reference(x, bits, clip_max, clip_min)
    if out is None:
        return result
    _check_out(out, x, bits)
    for dst, src in zip(out, result, strict=True):
        dst.copy_(src)
    return tuple(out)


def _check_cache(x: torch.Tensor, bits: int, cache: tuple, positions: torch.Tensor) -> None:
    """``cache`` = (codes (B, H, S_cap, W), scale, zero (B, H, S_cap)) and int32 ``positions`` (B,) for x (B, H,
    T, D), as :func:`quantize_kv_at` takes them."""
    b, h, _, d = x.shape
    codes, scale, zero = cache
    width = d // 2 if bits == 4 else d
    if (
        codes.dtype != torch.uint8
        or codes.shape[:2] != (b, h)
        or codes.shape[3] != width
        or codes.stride(-1) != 1
        or any(u.dtype != torch.float32 or u.shape != codes.shape[:3] for u in (scale, zero))
        or scale.stride() != zero.stride()
    ):
        raise ValueError(
            f"cache must be uint8 codes ({b}, {h}, S_cap, {width}) with unit stride and float32 scale / zero "
            f"({b}, {h}, S_cap) of equal strides, got {[(u.dtype, tuple(u.shape)) for u in cache]}"
        )
    if positions.shape != (b,) or positions.dtype != torch.int32 or positions.device != x.device:
        raise ValueError(
            f"positions must be int32 ({b},) on {x.device}, got {positions.dtype} {tuple(positions.shape)}"
        )


# append_kv_at: K and V in one launch (FLATQUANT_FUSE_KV_APPEND=0 or False here: two, for same-job comparisons)
APPEND_PAIR = _envflags.switch("FLATQUANT_FUSE_KV_APPEND", True, "two launches", "one launch")


def append_kv_at(
    k: torch.Tensor,
    v: torch.Tensor,
    bits: int,
    k_clip: tuple[float, float],
    v_clip: tuple[float, float],
    k_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    v_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    *,
    impl: str = "auto",
    transform: torch.Tensor | None = None,
) -> None:
    """:func:`quantize_kv_at` of K (with ``transform``: P_h) into ``k_cache`` and of V into ``v_cache`` (clip
    ratios (max, min) each): one launch on CUDA where K and V have one shape and dtype and their caches one set of
    strides (a decode step's append: one kernel per layer fewer), with the same bits as two; two launches (or
    the reference) otherwise."""
    _check_cache(k, bits, k_cache, positions)
    _check_cache(v, bits, v_cache, positions)
    pair = APPEND_PAIR and _pick(impl, k) == "triton" and k.shape == v.shape and k.dtype == v.dtype
    pair = pair and all(a.stride() == b.stride() for a, b in zip(k_cache, v_cache, strict=True))
    if not pair or triton_unavailable_reason(k) is not None:
        _quantize_kv_at(k, bits, *k_clip, k_cache, positions, impl, transform)
        _quantize_kv_at(v, bits, *v_clip, v_cache, positions, impl, None)
        return
    b, h, t, d = k.shape
    n_rows = b * h * t
    if not n_rows:
        return
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    transform = _transform_operand(transform, k)
    codes, scale, _ = k_cache
    block_r, block_d = _row_blocks(d, transform is not None)  # as quantize_kv_triton's launches: the same bits
    _append_kv_kernel[(triton.cdiv(n_rows, block_r), 2)](
        k, v, *k_cache, *v_cache, positions, k if transform is None else transform, float(k_clip[0]),
        float(k_clip[1]), float(v_clip[0]), float(v_clip[1]), _kq._INV_QMAX[(bits, False)], n_rows,
        *k.stride()[:3], *v.stride()[:3], h, t, *codes.stride()[:3], *scale.stride(), D=d, BLOCK_R=block_r,
        BLOCK_D=block_d, BITS=bits, PACK=bits == 4, RECIP=k.is_cuda, TRANSFORM=transform is not None,
        INTERPRET=_interpreting(), num_warps=4, **_no_fp_fusion(), **_pdl.launch_options(_pdl.pdl_on(k)),
    )  # fmt: skip


def quantize_kv_at(
    x: torch.Tensor,
    bits: int,
    clip_max: float,
    clip_min: float,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    *,
    impl: str = "auto",
    transform: torch.Tensor | None = None,
) -> None:
    """Quantize x (B, H, T, D) as :func:`quantize_kv` into ``cache`` = (codes (B, H, S_cap, W), scale, zero
    (B, H, S_cap)) at positions ``positions[b] + t`` (int32 (B,) on x's device): a static cache's decode step
    appends at device-side lengths, so that it can be captured in a CUDA graph. One launch on CUDA; the
    reference and a scatter elsewhere. Positions past S_cap are not checked (the caller keeps them in range).
    transform: as for :func:`quantize_kv`."""
    _check_cache(x, bits, cache, positions)
    _quantize_kv_at(x, bits, clip_max, clip_min, cache, positions, impl, transform)


def _quantize_kv_at(x, bits, clip_max, clip_min, cache, positions, impl, transform) -> None:
    """:func:`quantize_kv_at` for a cache and positions already checked (:func:`_check_cache`)."""
    b, t = x.shape[0], x.shape[2]
    if _pick(impl, x) == "triton":
        quantize_kv_triton(x, bits, clip_max, clip_min, out=cache, positions=positions, transform=transform)
        return
    pos = positions.long().view(b, 1, 1) + torch.arange(t, device=x.device).view(1, 1, t)  # (B, 1, T)
    for buf, value in zip(
        cache, quantize_kv(x, bits, clip_max, clip_min, impl="torch", transform=transform), strict=True
    ):
        index = pos.expand(value.shape[:3]) if value.dim() == 3 else pos[..., None].expand(value.shape)
        buf.scatter_(2, index, value)


def quantize_dequantize_kv(
    x: torch.Tensor,
    bits: int = 4,
    clip_max: float = 1.0,
    clip_min: float = 1.0,
    dtype: torch.dtype | None = None,
    *,
    impl: str = "auto",
    out: tuple | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`quantize_kv` and the :func:`dequantize_kv` of its result, ``((codes, scale, zero), values)``.

    values are in ``dtype`` (default x's), equal bit for bit to ``dequantize_kv(codes, scale, zero, bits,
    dtype)``; on CUDA both come from one launch that reads x once (the prefill through the INT4 cache, the
    fake-quant KV of a cacheless forward), elsewhere from the two reference functions. impl, out: as for
    :func:`quantize_kv`."""
    dtype = dtype or x.dtype
    if _pick(impl, x) == "triton":
        *codes, values = quantize_kv_triton(x, bits, clip_max, clip_min, out=out, dequantized=dtype)
        return tuple(codes), values
    codes = quantize_kv(x, bits, clip_max, clip_min, impl="torch", out=out)
    return tuple(codes), dequantize_kv(*codes, bits, dtype)


# ------------------------------------------------------------------------------------------ decode
def _check_decode_args(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens, q_dtypes=_Q_DTYPES
) -> tuple[int, ...]:
    """Validate shapes, dtypes and devices; return (B, Hq, Hkv, S_cap, D)."""
    if q.dtype not in q_dtypes or q.dim() != 3:
        names = "/".join(str(t).removeprefix("torch.") for t in q_dtypes)
        raise TypeError(f"q must be (B, Hq, D) {names}, got {q.dtype=} shape={tuple(q.shape)}")
    b, hq, d = q.shape
    for name, t in (("k_packed", k_packed), ("v_packed", v_packed)):
        if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[0] != b or 2 * t.shape[3] != d:
            raise ValueError(f"{name} must be uint8 (B={b}, Hkv, S_cap, D//2={d // 2}), got {t.dtype} {tuple(t.shape)}")
    if v_packed.shape != k_packed.shape:
        raise ValueError(f"v_packed {tuple(v_packed.shape)} must have k_packed's shape {tuple(k_packed.shape)}")
    hkv, s_cap = k_packed.shape[1], k_packed.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads must be a multiple of KV heads, got Hq={hq}, Hkv={hkv}")
    for name, t in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        if t.dtype != torch.float32 or t.shape != k_packed.shape[:3]:
            raise ValueError(f"{name} must be float32 {tuple(k_packed.shape[:3])}, got {t.dtype} {tuple(t.shape)}")
    if seq_lens.shape != (b,) or seq_lens.dtype.is_floating_point or seq_lens.dtype == torch.bool:
        raise ValueError(f"seq_lens must be integer ({b},), got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    devices = {t.device for t in (q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return b, hq, hkv, s_cap, d


def decode_attention_reference(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens, sm_scale, q_transform=None
):
    """Plain PyTorch :func:`decode_attention`: dequantize, then scores, softmax and P @ V in fp32.

    Positions >= seq_lens[b] are ignored (they may hold anything, NaN included); seq_len 0 gives zeros.
    q_transform: (D, D); the queries are ``q @ q_transform`` in q's dtype (a 16-bit matmul).
    """
    q = _transformed_queries(q, q_transform)
    b, hq, hkv, s_cap, d = _check_decode_args(
        q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens, _Q_DTYPES + (torch.float32,)
    )
    lens = seq_lens.to(device="cpu", dtype=torch.int64)
    if (lens < 0).any() or (lens > s_cap).any():
        raise ValueError(f"seq_lens must lie in [0, S_cap={s_cap}], got {lens.tolist()}")
    s = int(lens.max()) if b else 0  # positions beyond every sequence are never touched
    k = dequantize_kv(k_packed[:, :, :s], k_scale[:, :, :s], k_zero[:, :, :s])  # (B, Hkv, s, D) fp32
    v = dequantize_kv(v_packed[:, :, :s], v_scale[:, :, :s], v_zero[:, :, :s])
    valid = torch.arange(s, device=q.device)[None, :] < lens.to(q.device)[:, None]  # (B, s)
    v = torch.where(valid[:, None, :, None], v, 0.0)
    qg = q.float().reshape(b, hkv, hq // hkv, d)  # (B, Hkv, G, D): query head h reads KV head h // G
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k) * sm_scale
    scores = scores.masked_fill(~valid[:, None, None, :], -float("inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty sequence: all -inf -> NaN -> 0
    out = torch.einsum("bhgs,bhsd->bhgd", p, v)
    return out.reshape(b, hq, d).to(q.dtype)


def _transformed_queries(q: torch.Tensor, q_transform: torch.Tensor | None, impl: str = "torch") -> torch.Tensor:
    """``q @ q_transform`` in q's dtype (a 16-bit matmul), or q without a transform. impl: as for
    :func:`~flatquant.kernels.rows_matmul.rows_matmul` ("auto": its PDL-launched kernel where it
    applies, unless FLATQUANT_QUERY_KERNEL=0)."""
    if q_transform is None:
        return q
    d = q.shape[-1]
    if q_transform.shape != (d, d):
        raise ValueError(f"q_transform must be ({d}, {d}), got {tuple(q_transform.shape)}")
    return _rm.rows_matmul(q, q_transform, impl=impl)


def _launch_splits(n_kv_programs, s_cap, block_n, device, progs_per_sm, splits=None) -> int:
    """Programs per sequence: enough to fill the GPU (or the given splits), at most _MAX_SPLITS and at most one
    per token block of the capacity. From shapes only; the kernel divides each sequence's real length among
    them (chunks of whole token blocks)."""
    blocks = max(1, -(-s_cap // block_n))
    if splits is None:
        splits = -(-progs_per_sm * _kq._sm_count(device) // max(1, n_kv_programs))
    return max(1, min(_MAX_SPLITS, blocks, splits))


def _tuning_key(q, k_packed) -> tuple:
    b, hq, _ = q.shape
    hkv, s_cap = k_packed.shape[1], k_packed.shape[2]
    return (q.device, q.dtype, b * hkv, hq // hkv, q.shape[2], _kq._next_pow2(s_cap))


def _graph_time(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=10)


def _tuned_config(q, k_packed, run) -> dict:
    """The fastest of CANDIDATE_CONFIGS for this shape (batch x KV heads, group size, head dim, dtype, cache
    capacity rounded up to a power of two), timed once as CUDA-graph replays of ``run(config)`` and remembered.
    While a stream is being captured (no timing possible) an untuned shape runs DEFAULT_CONFIG; warm-up steps
    before a capture (GraphedDecoder's) tune it. Candidates that fail to launch are skipped; a failure other than
    running out of resources (a compile error: a Triton version that rejects the code) also warns, since the
    tuner would otherwise silently settle for a slower candidate (:func:`skipped_configs`)."""
    key = _tuning_key(q, k_packed)
    best = _TUNED.get(key)
    if best is not None:
        return best
    disk_key = _disk_key(key) if _kq.AUTOTUNE_CACHE else None
    if disk_key is not None:
        cached = _read_tuning_file().get(disk_key)
        if cached in CANDIDATE_CONFIGS:  # tuned by an earlier process on this GPU and software
            _TUNED[key] = cached
            return cached
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return DEFAULT_CONFIG
    timed, skipped = [], []
    group = q.shape[1] // k_packed.shape[1]
    for cfg in (c for c in CANDIDATE_CONFIGS if applies(c, group, q.shape[-1])):
        try:
            timed.append((_graph_time(lambda c=cfg: run(c)), len(timed), cfg))
        except Exception as err:  # e.g. out of shared memory for a large token block
            skipped.append((cfg, f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:300]}"))
    _SKIPPED.pop(key, None)  # a shape tuned afresh keeps only this tuning's failures
    if skipped:
        _SKIPPED[key] = skipped
        errors = [(c, e) for c, e in skipped if not e.startswith("OutOfResources")]
        if errors:
            warnings.warn(
                f"decode attention tuning: {len(errors)} of {len(skipped) + len(timed)} candidates failed to run "
                f"and were skipped, e.g. {errors[0][0]}: {errors[0][1]}",
                RuntimeWarning,
                stacklevel=2,
            )
    _TUNED[key] = best = min(timed)[2] if timed else DEFAULT_CONFIG
    if disk_key is not None and timed:
        try:
            atomic_write_json(_tuning_file(), {**_read_tuning_file(), disk_key: best})
        except OSError:  # a read-only home: keep the result for this process only
            pass
    return best


def skipped_configs() -> dict[tuple, list[tuple[dict, str]]]:
    """Per tuned shape, the candidates that failed to run during tuning and why (empty when all ran)."""
    return {key: list(v) for key, v in _SKIPPED.items()}


def last_config(q, k_packed) -> dict | None:
    """The config tuning chose for this shape (None before the first call or without tuning)."""
    return _TUNED.get(_tuning_key(q, k_packed))


def _word_aligned(*caches: torch.Tensor) -> bool:
    """Whether every token row of these packed caches starts at a multiple of 4 bytes (the words loop reads
    int32): the data pointer and every stride but the last (1) a multiple of 4. A contiguous view with an odd
    storage offset is not, and ``.contiguous()`` would return it unchanged."""
    return all(t.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in t.stride()[:-1]) for t in caches)


def decode_attention_triton(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens, sm_scale, *, config: dict | None = None,
    q_transform: torch.Tensor | None = None,
):  # fmt: skip
    """The flash-decoding Triton kernels; same contract as :func:`decode_attention_reference`, except that
    seq_lens are clamped to [0, S_cap] on the device instead of checked (no host synchronisation).

    config: overrides of DEFAULT_CONFIG (and ``splits``: chunks per sequence), for tests and benchmarks. Without
    it, on CUDA (``AUTOTUNE``), the config is tuned per shape among CANDIDATE_CONFIGS (``_tuned_config``).
    q_transform: (D, D): the queries are ``q @ q_transform`` in q's dtype (one 16-bit matmul before the kernel).
    """
    b, hq, hkv, s_cap, d = _check_decode_args(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens)
    reason = triton_unavailable_reason(q)  # after the argument checks: bad input gets the same error anywhere
    if reason is not None:
        raise RuntimeError(f"decode_attention triton kernel cannot run: {reason}")
    out = torch.empty((b, hq, d), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    # a separate matmul: formed in the kernel's query load instead (an earlier version), q @ T cost 70-100 us per
    # call at LLaMA-2-7B batch 16 on an H100, more than half the attention itself
    q = _transformed_queries(q, q_transform, impl="auto")
    unknown = sorted(set(config or {}) - set(DEFAULT_CONFIG) - {"splits"})  # the caller's config, not a tuned one
    if unknown:
        raise ValueError(f"config takes the keys {sorted(DEFAULT_CONFIG)} and 'splits', got {unknown}")
    if config is None and AUTOTUNE and not _interpreting():
        args = (k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens)

        def run(c):
            return decode_attention_triton(q, *args, sm_scale, config=c)

        config = _tuned_config(q, k_packed, run)
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if cfg["block_n"] < 16 or cfg["block_n"] & (cfg["block_n"] - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {cfg['block_n']}")
    if not applies(cfg, hq // hkv, d):
        if cfg.get("two_pass", False) and not (cfg["flat"] or cfg["mma"]):
            raise ValueError("two_pass=True takes flat=True (the one-row loop) or mma=True (the tensor-core loop)")
        if cfg.get("prefetch", False) and not cfg.get("words", False):
            raise ValueError("prefetch=True takes words=True (the two-pass loop on int32 words)")
        if cfg.get("words", False) and not (cfg.get("two_pass", False) and cfg["flat"]):
            raise ValueError("words=True takes two_pass=True and flat=True")
        if cfg.get("words", False) and d % 8:
            raise ValueError(f"words=True takes a head_dim that is a multiple of 8, got {d}")
        if cfg["flat"]:
            raise ValueError(f"flat=True takes mma=False and one query head per KV head, got {hq // hkv}")
        raise ValueError(f"mma=False takes at most {MAX_G_CUDA_CORES} query heads per KV head, got {hq // hkv}")
    if k_packed.stride(-1) != 1 or v_packed.stride() != k_packed.stride():
        k_packed, v_packed = k_packed.contiguous(), v_packed.contiguous()
    words = bool(cfg["flat"] and cfg.get("two_pass", False) and cfg.get("words", False))
    if words and not _word_aligned(k_packed, v_packed):  # checked on the tensors the kernel reads
        words = False  # the same two-pass loop on bytes: int32 loads need 4-byte aligned rows (a copy would not do)
    scales = (k_scale, k_zero, v_scale, v_zero)
    if k_scale.stride(-1) != 1 or any(t.stride() != k_scale.stride() for t in scales):
        k_scale, k_zero, v_scale, v_zero = (t.contiguous() for t in scales)
    lens = seq_lens.to(torch.int32).contiguous()
    g, bn = hq // hkv, cfg["block_n"]
    splits = _launch_splits(b * hkv, s_cap, bn, q.device, cfg["progs_per_sm"], cfg.get("splits"))
    single = splits == 1
    f32 = dict(device=q.device, dtype=torch.float32)
    acc = out if single else torch.empty((b * hq, splits, d), **f32)
    m = out if single else torch.empty((b * hq, splits), **f32)
    l = out if single else torch.empty((b * hq, splits), **f32)
    interpret = _interpreting()
    two_pass = bool((cfg["flat"] or cfg["mma"]) and cfg.get("two_pass", False))
    scores = torch.empty((b * hq, s_cap), **f32) if two_pass else k_scale  # any fp32 pointer when unused
    pdl = _pdl.launch_options(_pdl.pdl_on(q))
    _decode_chunk_kernel[(b * hkv, splits)](
        q, k_packed, v_packed, k_scale, k_zero, v_scale, v_zero, lens, scores,
        out, acc, m, l, float(sm_scale) * _LOG2E, s_cap, splits,
        q.stride(0), q.stride(1), k_packed.stride(0), k_packed.stride(1), k_packed.stride(2),
        k_scale.stride(0), k_scale.stride(1), out.stride(0), out.stride(1),
        HKV=hkv, **shape_meta(g, d, cfg["mma"]), BLOCK_N=bn, SINGLE=single, ASM=cfg["asm"],
        INTERPRET=interpret, MMA=cfg["mma"], FLAT=cfg["flat"], TWO_PASS=two_pass, WORDS=words,
        PREFETCH=bool(words and cfg.get("prefetch", False)), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **pdl,
    )  # fmt: skip
    if not single:
        _decode_merge_kernel[(b * hq,)](
            acc, m, l, out, splits, out.stride(0), out.stride(1),
            HQ=hq, D=d, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=triton.next_power_of_2(d),
            INTERPRET=interpret, num_warps=4, **pdl,
        )  # fmt: skip
    return out


def decode_attention(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens, sm_scale, *, impl: str = "auto",
    q_transform: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One new query token per sequence against a 4-bit cache (layout in the module doc).

    q: (B, Hq, D) bf16/fp16, Hq = Hkv * G; query head h reads KV head h // G (KV heads never duplicated).
    k_packed, v_packed: uint8 (B, Hkv, S_cap, D // 2); k_scale, k_zero, v_scale, v_zero: fp32 (B, Hkv, S_cap).
    seq_lens: (B,) integer, valid positions per sequence (<= S_cap); later positions are ignored.
    sm_scale: float (usually D ** -0.5).
    Returns (B, Hq, D) in q.dtype: softmax(q K^T * sm_scale) V with K, V dequantized, fp32 math.
    impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "torch" (forced; RuntimeError
    saying why when the forced kernel cannot run).
    q_transform: (D, D); attend with ``q @ q_transform`` (the runtime's P_h^-T), a 16-bit matmul of the queries.
    """
    cache = (k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, seq_lens)
    if _pick(impl, q) == "triton" and (impl == "triton" or q.dtype in _Q_DTYPES):  # float32 q: the reference
        return decode_attention_triton(q, *cache, sm_scale, q_transform=q_transform)
    return decode_attention_reference(q, *cache, sm_scale, q_transform)
