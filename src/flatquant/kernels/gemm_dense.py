"""Dense FP8 prefill path of the W4A4 GEMM: packed int4 weights unpacked to e4m3, then cuBLAS's FP8 GEMM.

From a few hundred tokens on, the W4A4 GEMM is bound by its tensor-core loop, and our INT8 Triton kernel sits at
the INT8 ceiling that cuBLAS's own INT8 GEMM also reaches on Hopper (~1000 TOP/s); cuBLAS's FP8 GEMM runs ~1.5x
faster. 4-bit integers are exact in e4m3, and cuBLAS's FP8 GEMM with its default accumulation
(``use_fast_accum=False``: partial sums promoted to fp32 at short intervals) sums their products exactly for
every K a LLaMA layer has (checked on the GPU against a float64 reference, random and worst-case codes up to
K = 14336, and centred asymmetric codes in [-15, 15], products up to 120, up to K = 28672;
``use_fast_accum=True`` is not exact). So for M >= ``DENSE_M`` tokens one call is:

1. ``unpack_int4_e4m3``: the packed weights (N, K/2) become a dense e4m3 copy (N, K) in a scratch buffer (one
   pass, bandwidth-bound: 7-24 us for the LLaMA layers on an NVIDIA H200);
2. ``torch._scaled_mm(x_e4m3, w_e4m3.T, x_scale[:, None], w_scale[None, :], bias)``: row-wise scales and bias in
   cuBLAS's epilogue, one rounding to the output dtype;
3. with a residual, ``residual + out`` (rounded once more, as the Triton kernel's epilogue does).

The weights stay packed in memory; only the layer being computed has a dense copy, freed after the call. The
activation codes come as e4m3 from the transform kernel (``kron_quantize(..., codes_dtype=float8_e4m3fn)``),
asymmetric ones centred (code - zero), so that no zero point is left to correct for; int8 codes are converted
first (exact, one more pass). int8 codes with a zero point, group scales, K or N not multiples of 16 and GPUs
without FP8 tensor cores take the Triton kernel. docs/kernels-gemm.md has the measurements.
"""

from __future__ import annotations

import torch

from .. import envflags as _envflags

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

__all__ = ["DENSE_M", "dense_gemm", "dense_unavailable_reason", "takes_dense", "unpack_int4_e4m3", "wants_e4m3_codes"]

_E4M3 = torch.float8_e4m3fn
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dense_m_from_env() -> int:
    """FLATQUANT_DENSE_M (default 512; 0 turns the dense path off)."""
    return _envflags.number("FLATQUANT_DENSE_M", 512, int, 0, 2**31 - 1, "an integer (0 = off)")


# from this many tokens on, path="auto" takes the dense FP8 path where it can run (measured crossover on an NVIDIA
# H200: at 256 tokens the INT8 kernel is faster at every LLaMA shape, from 512 the dense path wins or ties at most
# shapes, from 1024 at every shape timed; docs/kernels-gemm.md)
DENSE_M = _dense_m_from_env()


if triton is not None:

    @triton.jit
    def _unpack_e4m3_kernel(src, dst, total, BLOCK: tl.constexpr):
        """Bytes src[0:total] (two two's-complement nibbles each, low = even index) -> 2 * total e4m3 codes."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        b = tl.load(src + offs, mask=offs < total, other=0).to(tl.int32)
        lo = (b << 28) >> 28  # arithmetic shifts sign-extend the nibble
        hi = (b << 24) >> 28
        codes = tl.reshape(tl.join(lo, hi), [2 * BLOCK])  # lo, hi interleaved: the k order
        o = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(dst + o, codes.to(tl.float32).to(tl.float8e4nv), mask=o < 2 * total)


def _triton_runs(t: torch.Tensor) -> bool:
    """Whether the unpacking kernel can run on ``t``: a CUDA tensor, or any when it was built for the interpreter
    (TRITON_INTERPRET=1 at import, as the other kernel modules decide)."""
    if triton is None:
        return False
    return t.is_cuda or type(_unpack_e4m3_kernel).__name__ == "InterpretedFunction"


def unpack_int4_e4m3(
    w_packed: torch.Tensor, k: int, out: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """Packed int4 weights uint8 (N, K/2) -> their codes as float8_e4m3fn (N, K) (exact), in ``out`` if given.

    impl: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch". K must be even (two codes a byte).
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl=}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(f"w_packed must be uint8 (N, K/2), got {w_packed.dtype} {tuple(w_packed.shape)}")
    if k % 2 or w_packed.shape[1] != k // 2:
        raise ValueError(f"w_packed (N, K/2) does not hold an even K={k}: shape {tuple(w_packed.shape)}")
    n = w_packed.shape[0]
    if out is None:
        out = torch.empty(n, k, device=w_packed.device, dtype=_E4M3)
    elif out.shape != (n, k) or out.dtype != _E4M3 or not out.is_contiguous() or out.device != w_packed.device:
        raise ValueError(f"out must be a contiguous float8_e4m3fn ({n}, {k}) tensor on {w_packed.device}")
    if impl == "auto":
        impl = "triton" if triton is not None and w_packed.is_cuda else "torch"
    if impl == "triton" and not _triton_runs(w_packed):
        raise RuntimeError("unpack_int4_e4m3(impl='triton') needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    if impl == "torch":
        from .gemm_w4a4 import unpack_int4

        return out.copy_(unpack_int4(w_packed, k).to(_E4M3))
    total = w_packed.numel()
    if total:
        block = 4096
        _unpack_e4m3_kernel[(triton.cdiv(total, block),)](w_packed.contiguous(), out, total, BLOCK=block, num_warps=8)
    return out


def _fp8_device(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)  # FP8 tensor cores: Ada and Hopper on
    return device.type == "cpu"  # PyTorch's CPU _scaled_mm (tests)


def _auto_device(device: torch.device) -> bool:
    """Whether ``path="auto"`` may take the dense path on this device (a CUDA GPU with FP8 tensor cores)."""
    return device.type == "cuda" and _fp8_device(device)


def wants_e4m3_codes(m: int, k: int, device: torch.device) -> bool:
    """Whether the transform should write e4m3 codes for a GEMM of ``m`` tokens with K = ``k``: exactly when
    ``path="auto"`` will take the dense path there (the token count, the device, K % 16). Asymmetric codes come
    centred (code - zero, in [-15, 15]), so they need no zero point here."""
    return 0 < DENSE_M <= m and k % 16 == 0 and _auto_device(device)


def dense_unavailable_reason(x_codes, w_packed, bias, x_zero, w_group_scale, out_dtype) -> str | None:
    """Why the dense FP8 path cannot compute this GEMM (None when it can), whatever the token count."""
    n, k = w_packed.shape[0], x_codes.shape[1]
    if not hasattr(torch, "_scaled_mm"):
        return "this PyTorch has no torch._scaled_mm"
    if not _fp8_device(x_codes.device):
        return f"{x_codes.device} has no FP8 tensor cores (compute capability 8.9 or later)"
    if x_zero is not None:
        return (
            "int8 codes with a zero point need the Triton kernel's rank-1 correction (the transform writes "
            "asymmetric codes for this path centred, kron_quantize(..., codes_dtype=torch.float8_e4m3fn))"
        )
    if w_group_scale is not None:
        return "group scales are applied per K tile by the Triton kernel"
    if k % 16 or n % 16:
        return f"cuBLAS FP8 needs K and N divisible by 16, got K={k}, N={n}"
    if out_dtype not in _OUT_DTYPES:
        return f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}"
    if bias is not None and bias.dtype != out_dtype:
        return f"bias must be in out_dtype ({out_dtype}) for cuBLAS's epilogue, got {bias.dtype}"
    return None


def takes_dense(x_codes, w_packed, bias, x_zero, w_group_scale, out_dtype) -> bool:
    """Whether ``path="auto"`` runs this GEMM on the dense FP8 path: M >= DENSE_M on a CUDA device where it can."""
    m = x_codes.shape[0]
    if not (0 < DENSE_M <= m and _auto_device(x_codes.device)):
        return False
    return dense_unavailable_reason(x_codes, w_packed, bias, x_zero, w_group_scale, out_dtype) is None


def dense_gemm(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The W4A4 GEMM on the dense FP8 path (operands as ``w4a4_gemm``'s, already checked; no zero point: symmetric
    codes, or asymmetric ones centred by the transform)."""
    m, k = x_codes.shape
    x = x_codes if x_codes.dtype == _E4M3 else x_codes.to(_E4M3)  # exact for 4-bit codes
    w = unpack_int4_e4m3(w_packed, k, impl="triton" if _triton_runs(w_packed) else "torch")
    sa = x_scale.to(torch.float32).reshape(m, 1).contiguous()
    sb = w_scale.to(torch.float32).reshape(1, -1).contiguous()
    out = torch._scaled_mm(x.contiguous(), w.T, sa, sb, bias=bias, out_dtype=out_dtype, use_fast_accum=False)
    return out if residual is None else residual + out
