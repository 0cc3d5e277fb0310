"""Compile every autotune candidate of the Hopper kernels for sm_90 on the CPU and report their resources.

No GPU needed: Triton compiles to a cubin with its bundled ptxas, and cuobjdump reads registers, stack
(spills) and the tensor-core instructions (HGMMA/IGMMA = wgmma, HMMA/IMMA = mma.sync) from it; shared memory
comes from the compiler's metadata. Use it to drop candidates that spill or exceed shared memory before a
GPU run. Takes a few seconds per kernel.

    PYTHONPATH=src python benchmarks/sm90_report.py [--kron 112x128,64x64] [--gemm small,medium,large] [--gemv 1,2,4]
        [--rope 64,128]
        [--decode 1,4] [--silu 11008] [--int8-head 128,0] [--dense-unpack 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kernels import gemm_dense as gd  # noqa: E402
from flatquant.kernels import gemm_w4a4 as gw  # noqa: E402
from flatquant.kernels import gemv_w4a4 as gv  # noqa: E402
from flatquant.kernels import int8_linear as il  # noqa: E402
from flatquant.kernels import kron_pieces as kp  # noqa: E402
from flatquant.kernels import kron_quantize as kq  # noqa: E402
from flatquant.kernels import kv_quant as kv  # noqa: E402
from flatquant.kernels import rope as rp  # noqa: E402
from flatquant.kernels import rows_matmul as rm  # noqa: E402
from flatquant.kernels import silu_mul as sm  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on H100 (227 KB)
# every kernel is built as sm_90 launches it: with programmatic dependent launch (kernels/pdl.py), and the GEMM's
# decode sets with the L2 weight prefetch when FLATQUANT_PREFETCH_L2 turns it on (off by default)
PDL = {"PDL": True}
DECODE_PREFETCH = gw.PREFETCH_L2_FRACTION > 0


def _pdl_early(bucket: int) -> bool:
    """Whether a transform launch of token bucket 0 (latency path) or 1 (throughput path) lets its successor launch
    right after its wait, as kron_quantize launches it (``kron_quantize.pdl_early`` of a token count in the bucket)."""
    return kq.pdl_early(1 if bucket == 0 else kq.SMALL_TOKENS + 1)


def _jit(fn):
    """The @triton.jit function under autotuners / heuristics."""
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    return fn


def compile_sm90(fn, sig: dict, const: dict, div16: list[str], options: dict):
    """Compile a @triton.jit function for sm_90: sig maps argument name -> type, const the constexprs;
    div16 names the arguments to assume 16-divisible (as Triton does for aligned pointers and strides)."""
    fn = _jit(fn)
    names = fn.arg_names
    full = {n: "constexpr" if n in const else sig[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn, full, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _loops(sass: str) -> list[list[str]]:
    """The instructions of each loop (the span of each backward branch), longest first."""
    lines = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;\n]*);", sass)]
    spans = [
        (int(to, 16), int(at, 16))
        for at, to in re.findall(r"/\*([0-9a-f]{4,})\*/[^;\n]*?\bBRA\s+0x([0-9a-f]+)", sass)
        if int(to, 16) < int(at, 16)
    ]
    bodies = [[op for a, op in lines if lo <= a <= hi] for lo, hi in spans]
    return sorted(bodies, key=len, reverse=True)


def _count(body: list[str], prefix: str) -> int:
    """Instructions of a loop body whose opcode (after any predicate) starts with prefix."""
    return sum(re.sub(r"^@!?U?P\w+\s+", "", op).startswith(prefix) for op in body)


def resources(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout  # fmt: skip
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter(m.split(".")[0] for m in re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]+)", sass))
    loops = _loops(sass)  # longest first
    ptx = kernel.asm["ptx"]
    return {
        # grid dependency control: the wait for the previous kernel; the early launch of the next one (the transform
        # leaves it to its programs' exit above kron_quantize.PDL_EARLY_TOKENS)
        "pdl": "griddepcontrol.wait" in ptx,
        "pdl_early": "griddepcontrol.launch_dependents" in ptx,
        "l2_prefetch": "cp.async.bulk.prefetch.L2" in ptx,
        # the longest loop's instructions: per iteration of a warp, a static proxy for an issue-bound kernel's cost
        "loop_instructions": len(loops[0]) if loops else 0,
        "loop_sizes": [len(body) for body in loops],
        "loop_barriers": [_count(body, "BAR") for body in loops],  # block barriers in each loop, same order
        "loop_stores": [_count(body, "STG") for body in loops],  # global stores in each loop
        "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "smem": kernel.metadata.shared,
        "wgmma": ops["HGMMA"] + ops["IGMMA"] + ops["QGMMA"],
        "mma_sync": ops["HMMA"] + ops["IMMA"],
        "instructions": sum(ops.values()),
    }


def _kron_options(cfg: dict) -> dict:
    """Compile options of a transform candidate as the kernels launch it: no fp contraction, the register cap
    where the candidate sets one."""
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False)
    return opts | ({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] is not None else {})


def kron_reports(pairs: list[tuple[int, int]]) -> list[dict]:
    """Every candidate of each factor pair and token bucket; for pairs that fit a fused RMSNorm (hidden sizes)
    also the candidates with the norm (``NORM``, whole token rows)."""
    sig = dict.fromkeys(["x_ptr", "p1_ptr", "p2_ptr", "nw_ptr"], "*bf16") | {"q_ptr": "*i8"}
    sig |= dict.fromkeys(["scale_ptr", "zero_ptr"], "*fp32")
    sig |= dict.fromkeys(["clip_max", "clip_min", "inv_qmax", "eps"], "fp32")
    sig |= dict.fromkeys(["n_tokens", "stride_xt", "T_BUCKET"], "i32")
    out = []
    for n1, n2 in pairs:
        bn1, bn2 = max(16, kq._next_pow2(n1)), max(16, kq._next_pow2(n2))
        for bucket, norm in itertools.product((0, 1), (False, True) if kq.fuses_norm(n1, n2) else (False,)):
            cands = [c for c in kq.candidate_configs(bn1, bn2, bucket) if not norm or c["BC"] == bn2]
            # every candidate with int8 codes; the first also with e4m3 codes (the dense GEMM path's operand),
            # symmetric and asymmetric (centred codes)
            for cfg, codes, sym in [(c, "*i8", True) for c in cands] + [
                (cands[0], "*fp8e4nv", b) for b in (True, False)
            ]:
                const = dict(N1=n1, N2=n2, BN1=bn1, BN2=bn2, HAS_P1=True, HAS_P2=True, SPLIT_Y=True)
                const |= dict(SYMMETRIC=sym, BITS=4, PACK=False, INTERPRET=False, RECIP=True, NORM=norm)
                const |= {k: cfg[k] for k in ("BLOCK_T", "PROGS_PER_SM", "P1_FIRST", "FAST_DIV", "BC")} | PDL
                const["PDL_EARLY"] = _pdl_early(bucket)
                opts = _kron_options(cfg)
                div16 = ["x_ptr", "p1_ptr", "p2_ptr", "q_ptr", "stride_xt", "nw_ptr"]
                rec = {"kernel": "kron_quantize", "n1": n1, "n2": n2, "bucket": bucket, "norm": norm, **cfg}
                rec["codes"], rec["symmetric"] = "e4m3" if codes == "*fp8e4nv" else "int8", sym
                g = sig | {"q_ptr": codes}
                build = lambda c=const, o=opts, d=div16, g=g: compile_sm90(kq._kron_quantize_kernel, g, c, d, o)  # noqa: E731
                out.append(_report(rec, build))
    return out


def kron_pieces_reports(pairs: list[tuple[int, int]]) -> list[dict]:
    """Every candidate of the pieces kernel (n1 cut in power-of-two pieces) for the pairs it applies to, in both
    token buckets."""
    sig = dict.fromkeys(["x_ptr", "p1_ptr", "p2_ptr"], "*bf16") | {"q_ptr": "*i8"}
    sig |= dict.fromkeys(["scale_ptr", "zero_ptr"], "*fp32")
    sig |= dict.fromkeys(["clip_max", "clip_min", "inv_qmax"], "fp32")
    sig |= dict.fromkeys(["n_tokens", "stride_xt", "T_BUCKET"], "i32")
    fn = kp._kron_quantize_pieces_kernel
    out = []
    for n1, n2 in pairs:
        pieces = kp.pieces_of(n1, n2)
        if pieces is None:
            continue
        r = pieces + (0,) * (3 - len(pieces))
        for bucket in (0, 1):
            cands = kp.pieces_candidate_configs(bucket)
            # e4m3: the first only, symmetric and asymmetric
            for cfg, codes, sym in [(c, "*i8", True) for c in cands] + [
                (cands[0], "*fp8e4nv", b) for b in (True, False)
            ]:
                const = dict(N1=n1, N2=n2, R0=r[0], R1=r[1], R2=r[2], SYMMETRIC=sym, BITS=4, PACK=False)
                const |= dict(INTERPRET=False, RECIP=True) | {k: cfg[k] for k in ("PROGS_PER_SM", "FAST_DIV")} | PDL
                const["PDL_EARLY"] = _pdl_early(bucket)
                opts = _kron_options(cfg)
                div16 = ["x_ptr", "p1_ptr", "p2_ptr", "q_ptr", "stride_xt"]
                rec = {"kernel": "kron_quantize_pieces", "n1": n1, "n2": n2, "bucket": bucket, **cfg}
                rec["codes"], rec["symmetric"] = "e4m3" if codes == "*fp8e4nv" else "int8", sym
                g = sig | {"q_ptr": codes}
                out.append(_report(rec, lambda c=const, o=opts, d=div16, g=g: compile_sm90(fn, g, c, d, o)))
    return out


def dense_unpack_reports() -> list[dict]:
    """The dense FP8 path's weight unpacking (packed int4 -> e4m3), as ``gemm_dense`` launches it."""
    sig = {"src": "*u8", "dst": "*fp8e4nv", "total": "i32"}
    rec = {"kernel": "dense_unpack", "BLOCK": 4096, "num_warps": 8}
    build = lambda: compile_sm90(gd._unpack_e4m3_kernel, sig, {"BLOCK": 4096}, ["src", "dst"], {"num_warps": 8})  # noqa: E731
    return [_report(rec, build)]


def gemm_reports(sets: list[str]) -> list[dict]:
    ptrs = ["x_ptr", "w_ptr", "out_ptr", "xs_ptr", "ws_ptr", "xz_ptr", "zc_ptr", "bias_ptr", "gs_ptr"]
    types = {"x_ptr": "*i8", "w_ptr": "*u8", "out_ptr": "*bf16", "part_ptr": "*i32", "cnt_ptr": "*i32"}
    types["res_ptr"] = "*bf16"
    sig = {p: types.get(p, "*fp32") for p in ptrs + ["part_ptr", "cnt_ptr", "res_ptr"]}
    ints = ["M", "N", "K", "K2", "M_KEY", "group_size", "stride_xm", "stride_wn", "stride_om", "stride_gn"]
    ints += ["stride_rm", "pf_bytes"]
    sig |= dict.fromkeys(ints, "i32")
    div16 = ["x_ptr", "w_ptr", "out_ptr", "K", "K2", "N", "stride_xm", "stride_wn", "stride_om"]
    configs = {"large": gw.LARGE_CONFIGS, "small": gw.SMALL_CONFIGS, "large_fp8": gw.LARGE_CONFIGS_FP8}
    configs["small_fp8"], configs["medium"] = gw.SMALL_CONFIGS_FP8, gw.MEDIUM_CONFIGS
    out = []
    for name, res in itertools.product(sets, (False, True)):
        # with the residual epilogue (o_proj, down_proj) only the candidates the autotuner keeps for it
        for c in gw._prune_residual(configs[name], {"HAS_RES": res}):
            fp8 = name.endswith("fp8")
            const = dict(HAS_ZERO=False, HAS_BIAS=False, HAS_GROUP=False, HAS_RES=res, USE_FP8=fp8, X_FP8=fp8)
            prefetch = DECODE_PREFETCH and name in ("small", "medium", "small_fp8")
            const |= dict(
                USE_ASM=True,
                EVEN_K=True,
                MASK_M=name in ("small", "small_fp8", "medium"),
                **c.kwargs,
                **PDL,
                PREFETCH=prefetch,
            )
            opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
            rec = {"kernel": "w4a4_gemm", "set": name, "residual": res, **c.kwargs, "num_warps": c.num_warps}
            rec["num_stages"] = c.num_stages
            out.append(_report(rec, lambda c=const, o=opts: compile_sm90(gw._w4a4_gemm_kernel, sig, c, div16, o)))
    return out


def gemv_reports(tokens: list[int], residual: bool = False) -> list[dict]:
    """The CUDA-core decode GEMM (dp4a) for 1, 2 or 4 accumulated tokens, every candidate the autotuner keeps for
    that many (``gemv_w4a4._prune``); with ``residual`` also built with the residual epilogue (after the loop: the
    loop's registers, where spills would hurt, are the same)."""
    ptrs = ["out_ptr", "xs_ptr", "ws_ptr", "xz_ptr", "zc_ptr", "bias_ptr"]
    sig = {"x_ptr": "*i64", "w_ptr": "*i32", "part_ptr": "*i32", "cnt_ptr": "*i32", "res_ptr": "*bf16"}
    sig |= {p: "*fp32" for p in ptrs} | {"out_ptr": "*bf16"}
    ints = ["M", "N", "KW", "M_KEY", "stride_xm", "stride_wn", "stride_om", "stride_rm", "pf_bytes"]
    sig |= dict.fromkeys(ints, "i32")
    div16 = ["x_ptr", "w_ptr", "out_ptr", "KW", "N", "stride_xm", "stride_wn", "stride_om"]
    out = []
    for bm, res in itertools.product(tokens, (False, True) if residual else (False,)):
        for c in gv._prune(gv.CONFIGS, {"M": bm}):  # the candidates the autotuner keeps for bm tokens
            out.append(_gemv_report(bm, res, c, sig, div16))
    return out


def _gemv_report(bm: int, res: bool, c, sig: dict, div16: list[str]) -> dict:
    const = dict(HAS_ZERO=False, HAS_BIAS=False, HAS_RES=res, USE_ASM=True, FULL_HEAD=True, ALIGN=4, BLOCK_M=bm)
    const |= dict(**c.kwargs, **PDL, PREFETCH=False)
    opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    rec = {"kernel": "w4a4_gemv", "BLOCK_M": bm, "residual": res, **c.kwargs, "num_warps": c.num_warps}
    return _report(rec, lambda: compile_sm90(gv._w4a4_gemv_kernel, sig, const, div16, opts))


def rope_reports(head_dims: list[int]) -> list[dict]:
    ptrs = ["q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr"]
    ints = ["T", "HQ", "HK", "NQB", "sqb", "sqh", "sqt", "skb", "skh", "skt", "scb", "sct"]
    ints += ["soqb", "soqh", "soqt", "sokb", "sokh", "sokt"]
    sig = dict.fromkeys(ptrs, "*bf16") | dict.fromkeys(ints, "i32")
    out = []
    for d in head_dims:
        const = rp.kernel_meta(d) | {"INTERPRET": False} | PDL
        opts = dict(num_warps=4, enable_fp_fusion=False)
        rec = {"kernel": "rope", "head_dim": d, "BLOCK_H": const["BLOCK_H"]}
        out.append(_report(rec, lambda c=const, o=opts: compile_sm90(rp._rope_kernel, sig, c, ptrs, o)))
    return out


def silu_mul_reports(widths: list[int]) -> list[dict]:
    """The SiLU(gate) * up kernel at the launch config of each row width (intermediate size)."""
    ptrs = ["g_ptr", "u_ptr", "out_ptr"]
    sig = dict.fromkeys(ptrs, "*bf16") | dict.fromkeys(["n_rows", "n_cols", "stride_g", "stride_u", "stride_o"], "i32")
    out = []
    for n in widths:
        block_r, block_c = sm.launch_meta(n)
        const = {"BLOCK_R": block_r, "BLOCK_C": block_c, "INTERPRET": False} | PDL
        rec = {"kernel": "silu_mul", "n": n, "BLOCK_R": block_r, "BLOCK_C": block_c}
        opts = dict(num_warps=4)
        div16 = ptrs + ["stride_g", "stride_u", "stride_o"]
        out.append(_report(rec, lambda c=const, o=opts, d=div16: compile_sm90(sm._silu_mul_kernel, sig, c, d, o)))
    return out


def query_transform_reports(head_dims: list[int]) -> list[dict]:
    """The decode step's query transform (rows_matmul) at each head dim and row block it launches with."""
    ptrs = ["x_ptr", "m_ptr", "o_ptr"]
    sig = dict.fromkeys(ptrs, "*bf16") | {"R": "i32"}
    out = []
    for d, block_r in itertools.product(head_dims, (16, 32, 64)):
        const = {"D": d, "BLOCK_R": block_r, "INTERPRET": False} | PDL
        rec = {"kernel": "query_transform", "head_dim": d, "BLOCK_R": block_r}
        opts = dict(num_warps=4)
        out.append(_report(rec, lambda c=const, o=opts: compile_sm90(rm._rows_matmul_kernel, sig, c, ptrs, o)))
    return out


def int8_head_reports(groups: list[int]) -> list[dict]:
    """The 8-bit head's matmul (bf16 x, int8 codes, fp32 scales), every candidate that applies to each scale
    group (0 = per row) at decode and prefill sizes."""
    fn = _jit(il._int8_linear_kernel)
    types = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*bf16"}
    sig = {n: types.get(n, "i32") for n in fn.arg_names}
    div16 = list(types) + ["K", "stride_xm", "stride_wn", "stride_om"]
    out = []
    for group, bucket in itertools.product(groups, (0, 1)):
        meta = {"GROUP": group or 4096, "GROUPED": bool(group), "M_BUCKET": bucket}
        for c in il._prune(il._configs(), meta):
            const = dict(meta, INTERPRET=False, **c.kwargs, **PDL)
            opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
            rec = {"kernel": "int8_head", "group": group, "bucket": bucket, **c.kwargs, "num_warps": c.num_warps}
            rec["num_stages"] = c.num_stages
            out.append(_report(rec, lambda k=const, o=opts: compile_sm90(fn, sig, k, div16, o)))
    return out


# pointers and the integer arguments that are multiples of 16 at run time (Triton specialises those; unmarked,
# the loads of a token row would not be vectorised and the figures would be pessimistic)
DECODE_DIV16 = ["q_ptr", "k_ptr", "v_ptr", "ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr", "out_ptr", "acc_ptr"]
DECODE_DIV16 += ["s_cap", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kt", "stride_sb"]
DECODE_DIV16 += ["stride_sh", "stride_ob", "stride_oh"]


def decode_reports(groups: list[int], head_dim: int = 128) -> list[dict]:
    """The decode attention kernel, every tuning candidate that applies to each group size (query heads per KV
    head), multi-chunk."""
    fn = _jit(kv._decode_chunk_kernel)
    types = dict.fromkeys(["q_ptr", "out_ptr"], "*bf16") | {"k_ptr": "*u8", "v_ptr": "*u8"}
    types["lens_ptr"] = "*i32"
    sig = {n: types.get(n, "*fp32") if n.endswith("_ptr") else "i32" for n in fn.arg_names} | {"qk_scale": "fp32"}
    out = []
    for g in groups:
        for cfg in (c for c in kv.CANDIDATE_CONFIGS if kv.applies(c, g, head_dim)):
            const = dict(HKV=32 // g, **kv.shape_meta(g, head_dim, cfg["mma"]), BLOCK_N=cfg["block_n"], SINGLE=False)
            const |= dict(ASM=cfg["asm"], INTERPRET=False, MMA=cfg["mma"], FLAT=cfg["flat"], TWO_PASS=cfg["two_pass"])
            const |= dict(WORDS=cfg["words"], PREFETCH=cfg["prefetch"], **PDL)
            opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])  # as launched: fp fusion on
            rec = {"kernel": "decode_attention", "G": g, "head_dim": head_dim, **cfg}
            out.append(_report(rec, lambda c=const, o=opts: compile_sm90(fn, sig, c, DECODE_DIV16, o)))
            if out[-1].get("loop_instructions"):  # thread instructions per K or V code of a token block
                codes = cfg["block_n"] * head_dim * 2
                # the two-pass loop runs two loops over the same blocks (scores, then values)
                per_block = sum(out[-1]["loop_sizes"][:2]) if cfg["two_pass"] else out[-1]["loop_instructions"]
                out[-1]["instructions_per_code"] = round(per_block * cfg["num_warps"] * 32 / codes, 2)
    return out


def _report(rec: dict, build) -> dict:
    try:
        rec.update(resources(build()))
        # a spill is a defect, except in a candidate that caps its registers on purpose (maxnreg: two CTAs per SM)
        rec["ok"] = (rec["stack"] == 0 or bool(rec.get("maxnreg"))) and rec["smem"] <= SMEM_LIMIT
    except Exception as err:  # a candidate that does not compile is a finding, not a crash
        rec.update(ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
    flag = "ok " if rec["ok"] else "BAD"
    detail = rec.get("error") or (
        f"regs {rec['regs']:3d} stack {rec['stack']:4d} smem {rec['smem']:6d} wgmma {rec['wgmma']:3d} "
        f"mma.sync {rec['mma_sync']:3d} loop {rec['loop_instructions']:5d}"
    )
    measured = ("regs", "stack", "smem", "wgmma", "mma_sync", "instructions", "loop_instructions", "loop_sizes")
    measured += ("loop_barriers", "loop_stores", "ok", "pdl", "pdl_early", "l2_prefetch")
    cfg = {k: v for k, v in rec.items() if k not in measured}
    print(f"{flag} {detail}  {cfg}", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kron", default="24x24,64x64,64x128,86x128,112x128,128x148", help="n1xn2 factor pairs")
    ap.add_argument("--gemm", default="large,medium,small,large_fp8,small_fp8", help="GEMM config sets")
    ap.add_argument("--gemv", default="1,2,4", help="tokens (accumulators) of the CUDA-core decode GEMM")
    ap.add_argument("--gemv-residual", type=int, default=0, help="1: also build the decode GEMM's residual epilogue")
    ap.add_argument("--rope", default="64,128", help="head dims of the RoPE kernel")
    ap.add_argument("--decode", default="1,4", help="query heads per KV head of the decode attention kernel (D=128)")
    ap.add_argument("--silu", default="11008", help="row widths (intermediate sizes) of the SiLU * up kernel")
    ap.add_argument("--int8-head", default="128,0", help="scale groups of the 8-bit head's matmul (0 = per row)")
    ap.add_argument("--query", default="64,128", help="head dims of the decode step's query transform kernel")
    ap.add_argument("--dense-unpack", type=int, default=1, help="1: also the dense FP8 path's unpacking kernel")
    ap.add_argument("--json", default=None, help="also write the records here")
    args = ap.parse_args()
    pairs = [tuple(int(v) for v in p.split("x")) for p in args.kron.split(",") if p]
    records = kron_reports(pairs) + kron_pieces_reports(pairs) + gemm_reports([s for s in args.gemm.split(",") if s])
    records += gemv_reports([int(m) for m in args.gemv.split(",") if m], bool(args.gemv_residual))
    records += rope_reports([int(d) for d in args.rope.split(",") if d])
    records += decode_reports([int(g) for g in args.decode.split(",") if g])
    records += silu_mul_reports([int(n) for n in args.silu.split(",") if n])
    records += int8_head_reports([int(g) for g in args.int8_head.split(",") if g])
    records += query_transform_reports([int(d) for d in args.query.split(",") if d])
    records += dense_unpack_reports() if args.dense_unpack else []
    bad = [r for r in records if not r["ok"]]
    print(f"{len(records)} kernels, {len(bad)} with spills, too much shared memory or compile errors")
    if args.json:
        atomic_write_json(args.json, {"target": "sm_90", "triton": triton.__version__, "records": records})


if __name__ == "__main__":
    main()
