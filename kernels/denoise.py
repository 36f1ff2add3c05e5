"""Triton kernels of the denoising MLP (MAR's SimpleMLPAdaLN, LTH14/mar models/diffloss.py):
LayerNorm + AdaLN modulate (forward, backward), a tl.dot GEMM with fused epilogues (bias, SiLU,
gate + residual, dSiLU), the gate backward, the per-step SiLU(cond + time) and the diffusion
step's elementwise update. djepa.ops.denoise launches them (its _Triton runner) under the
contract its module docstring states for both fast backends.
"""
import os
from typing import NamedTuple

import triton
import triton.language as tl

from djepa.backends import version_tuple

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# A LayerNorm program works on tiles of about LN_TILE elements (rows x BLOCK_W), 16 per thread.
LN_TILE = 4096
# Elements per program of the elementwise kernels (gate_bwd, add_silu): 8 per thread of 4 warps.
ELEMENTWISE_BLOCK = 1024
# Elements per program of denoise_update_kernel: its state is small (B x C with C = 16: 32768
# elements at 2048 rows), so smaller programs spread it over more SMs.
UPDATE_BLOCK = 512

# The GEMM's epilogue codes (djepa.ops.denoise's contract, csrc/denoise_kernels.cuh's Epilogue).
EPI_NONE, EPI_SILU, EPI_GATE_RES, EPI_DSILU = (tl.constexpr(code) for code in range(4))


@triton.jit
def ln_mod_fwd_kernel(x_ptr, mod_ptr, lnw_ptr, lnb_ptr, h_ptr, stats_ptr, M, W, mod_ld, eps,
                      HAS_AFFINE: tl.constexpr, HAS_STATS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    """LayerNorm and AdaLN modulation of BLOCK_M rows of x [M, W] (DiT's adaLN, Peebles & Xie
    2023; MAR's ResBlock): with mean and rstd = 1 / sqrt(var + eps) of each row (biased variance),

        y = (x - mean) * rstd [* ln_w + ln_b]      (HAS_AFFINE)
        h = y * (1 + scale) + shift                (shift, scale: row r of mod at r * mod_ld, + W)

    h in h's dtype, fp32 math; HAS_STATS stores (mean, rstd) per row for the backward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < M
    cmask = cols < W
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * W + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / W
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / W
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_AFFINE:
        w = tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(lnb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :] + b[None, :]
    mrow = mod_ptr + r64[:, None] * mod_ld + cols[None, :]
    shift = tl.load(mrow, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(mrow + W, mask=mask, other=0.0).to(tl.float32)
    h = y * (1.0 + scale) + shift
    tl.store(h_ptr + r64[:, None] * W + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_STATS:
        tl.store(stats_ptr + r64 * 2, mean, mask=rmask)
        tl.store(stats_ptr + r64 * 2 + 1, rstd, mask=rmask)


@triton.jit
def ln_mod_bwd_kernel(x_ptr, mod_ptr, lnw_ptr, lnb_ptr, stats_ptr, dh_ptr, dres_ptr, dx_ptr, dmod_ptr,
                      dw_part_ptr, db_part_ptr, M, W,
                      HAS_AFFINE: tl.constexpr, HAS_DRES: tl.constexpr,
                      ROWS: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Backward of ln_mod_fwd_kernel for ROWS rows per program, TILE_ROWS at a time: with
    xhat = (x - mean) * rstd, y = xhat [* w + b] and dh the gradient of h,

        dshift = dh,   dscale = dh * y,   dy = dh * (1 + scale),   dxhat = dy [* w]
        dx     = rstd * (dxhat - xhat * mean(dxhat * xhat) - mean(dxhat))   [+ dres]
        dw_part, db_part = this program's sums of dy * xhat and dy (HAS_AFFINE)

    the LayerNorm backward of Ba et al. 2016 (as in Triton's layer-norm tutorial); the partial
    sums (ROWS rows each) are added up by the caller, so no atomics."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_W)
    cmask = cols < W
    if HAS_AFFINE:
        w = tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(lnb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_W], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for r0 in range(0, ROWS, TILE_ROWS):
        rows = pid * ROWS + r0 + tl.arange(0, TILE_ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        off = r64[:, None] * W + cols[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + off, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + r64 * 2, mask=rmask, other=0.0)
        rstd = tl.load(stats_ptr + r64 * 2 + 1, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        mrow = r64[:, None] * (3 * W) + cols[None, :]
        scale = tl.load(mod_ptr + mrow + W, mask=mask, other=0.0).to(tl.float32)
        if HAS_AFFINE:
            y = xhat * w[None, :] + b[None, :]
        else:
            y = xhat
        dy = dh * (1.0 + scale)
        tl.store(dmod_ptr + mrow, dh.to(dmod_ptr.dtype.element_ty), mask=mask)
        tl.store(dmod_ptr + mrow + W, (dh * y).to(dmod_ptr.dtype.element_ty), mask=mask)
        if HAS_AFFINE:
            dw_acc += tl.sum(dy * xhat, axis=0)
            db_acc += tl.sum(dy, axis=0)
            dxhat = dy * w[None, :]
        else:
            dxhat = dy
        c1 = tl.sum(dxhat * xhat, axis=1) / W
        c2 = tl.sum(dxhat, axis=1) / W
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(dres_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_AFFINE:
        tl.store(dw_part_ptr + pid.to(tl.int64) * W + cols, dw_acc, mask=cmask)
        tl.store(db_part_ptr + pid.to(tl.int64) * W + cols, db_acc, mask=cmask)


class LnTile(NamedTuple):
    """The launch configuration of the LayerNorm kernels: block_w (BLOCK_W, the row padded to a
    power of two), rows (rows per tile), warps (num_warps)."""
    block_w: int
    rows: int
    warps: int


def ln_config(W, element_size=2) -> LnTile:
    """The LnTile of the LayerNorm kernels at width W: tiles of about
    LN_TILE elements, 16 per thread where 16-byte vectors serve the rows (16-bit, W a multiple
    of 16), else 8 (scalar accesses hold an address per element), so registers stay flat from
    W = 64 to 8192 (checked by tools/static_check.py)."""
    block_w = triton.next_power_of_2(W)
    vector = element_size == 2 and W % 16 == 0  # Triton specialises W on "divisible by 16"
    tile_rows = max(1, (LN_TILE if vector else LN_TILE // 2) // block_w)
    warps = max(4, min(16, tile_rows * block_w // (512 if vector else 256)))
    return LnTile(block_w, tile_rows, warps)


def ln_bwd_rows(W):
    """Rows per program of the LayerNorm backward (= rows per partial of dln_w / dln_b)."""
    return max(16, ln_config(W).rows)


@triton.jit
def gate_bwd_kernel(dout_ptr, mod_ptr, y2_ptr, dy2_ptr, dmod_ptr, M, W, BLOCK: tl.constexpr):
    """Backward of out = x + gate * y2 for the gate and y2, elementwise over [M, W]:
    dy2 = dout * gate; dgate = dmod[:, 2W:] = dout * y2 (gate: row r of mod at 3W r + 2W)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * W
    r = offs // W
    c = offs % W
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(mod_ptr + r * (3 * W) + 2 * W + c, mask=mask, other=0.0).to(tl.float32)
    y2 = tl.load(y2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dy2_ptr + offs, (dout * gate).to(dy2_ptr.dtype.element_ty), mask=mask)
    tl.store(dmod_ptr + r * (3 * W) + 2 * W + c, (dout * y2).to(dmod_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_silu_kernel(c_ptr, t_ptr, out_ptr, M, W, BLOCK: tl.constexpr):
    """out[r, :] = silu(c[r, :] + t[:]), silu(v) = v / (1 + exp(-v)): the adaLN input of every
    block (MAR: y = t_emb + c_emb, then SiLU in adaLN_modulation), once per step."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * W
    v = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(t_ptr + offs % W, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (v / (1.0 + tl.exp(-v))).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def denoise_update_kernel(x_ptr, mo_ptr, noise_ptr, out_ptr, xin_ptr, B, C, out_ld, cfg_scale_ptr,
                          coef_x, coef_eps, min_log, max_log, noise_scale,
                          CFG: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_XIN: tl.constexpr,
                          BLOCK: tl.constexpr):
    """One reverse step's elementwise tail for B tokens of C channels (fp32 math):

        eps    = out[r, j], with CFG: u + cfg_scale * (eps - u), u = out[r + B, j]  (Ho & Salimans 2022)
        v      = out[r, C + j];  frac = (v + 1) / 2
        logvar = frac * max_log + (1 - frac) * min_log      (Improved DDPM's learned range, eq. 15)
        x'     = coef_x * x - coef_eps * eps [+ exp(logvar / 2) * noise_scale * noise]

    coef_x, coef_eps fold the posterior mean of x0 predicted from eps (Nichol & Dhariwal 2021;
    MAR's p_sample); x' is written in fp32, and with HAS_XIN in the MLP's dtype (twice with CFG)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B * C
    r = offs // C
    c = offs % C
    e = tl.load(mo_ptr + r * out_ld + c, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        # the scale is read on the device, so a CUDA graph of the loop serves every CFG scale
        cfg_scale = tl.load(cfg_scale_ptr).to(tl.float32)
        u = tl.load(mo_ptr + (r + B) * out_ld + c, mask=mask, other=0.0).to(tl.float32)
        e = u + cfg_scale * (e - u)
    v = tl.load(mo_ptr + r * out_ld + C + c, mask=mask, other=0.0).to(tl.float32)
    frac = (v + 1.0) * 0.5
    logvar = frac * max_log + (1.0 - frac) * min_log
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    res = coef_x * x - coef_eps * e
    if HAS_NOISE:
        n = tl.load(noise_ptr + offs, mask=mask, other=0.0)
        res += tl.exp(0.5 * logvar) * noise_scale * n
    tl.store(out_ptr + offs, res, mask=mask)
    if HAS_XIN:
        tl.store(xin_ptr + offs, res.to(xin_ptr.dtype.element_ty), mask=mask)
        if CFG:
            tl.store(xin_ptr + B * C + offs, res.to(xin_ptr.dtype.element_ty), mask=mask)


class GemmTile(NamedTuple):
    """One autotune candidate of gemm_kernel. Fields, in this order in every row: block_m and
    block_n (the output tile), warps (num_warps), stages (num_stages: the depth of Triton's
    software pipeline over the K loop). BLOCK_K = 64 and GROUP_M = 8 are common to all."""
    block_m: int
    block_n: int
    warps: int
    stages: int


# The candidates autotune times per (M, N, K, epilogue); _prune_gemm_configs keeps those whose
# accumulator fits beside the epilogue. Registers and shared memory: the static gate, sm_90,
# Triton 3.9, over the hot shapes (W = 1024-1536, M = 512-32768).
GEMM_TILES = (
    GemmTile(128, 128, 8, 3),  # the big tile for training's M = 32768: 64 accumulators per thread,
                               # 106-217 regs, 96 KiB smem in 3 stages; not with dSiLU
    GemmTile(128, 64, 4, 4),   # 64 per thread over one warpgroup: 126-184 regs, 96 KiB in 4 stages
    GemmTile(64, 128, 4, 4),   # its transpose, for wide outputs: 117-204 regs
    GemmTile(64, 64, 4, 4),    # small M (sampling rows): more programs for the SMs, 70-127 regs
    GemmTile(128, 64, 8, 4),   # 32 per thread: the dSiLU epilogue's large tile, 64-127 regs
    GemmTile(64, 128, 8, 4),   # 32 per thread, transposed: 64-128 regs
)
# The interpreter runs one program at a time: one small tile.
INTERPRETER_GEMM = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})


def _gemm_configs():
    if INTERPRET:
        return [INTERPRETER_GEMM]
    return [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": 64, "GROUP_M": 8},
                          num_stages=t.stages, num_warps=t.warps) for t in GEMM_TILES]


def _acc_per_thread(config):
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


# Triton 3.6 (the GPU machine's; not 3.5, 3.7-3.9) serializes the wgmma of these tiles when a is
# read transposed (stride_am = 1: the weight gradients x^T @ dy): ptxas warning C7515.
_SERIALIZES_TRANSPOSED_A = version_tuple(triton.__version__) == (3, 6)


def _serialized_transposed_a(config):
    return config.num_warps == 8 and config.kwargs["BLOCK_N"] == 128


def _prune_gemm_configs(configs, named_args, **kwargs):
    """The tiles an epilogue fits in registers beside (checked by tools/static_check.py): the
    dSiLU epilogue (3) holds the pre-activation tile with the accumulator, so it takes at most
    32 accumulator elements per thread; the others up to 64. (A 128 x 256 tile, 128 per thread,
    spilled with the epilogues 2 and 3; 128 x 128 over 16 warps spilled on Triton 3.6.) On
    Triton 3.6 a transposed a on the tensor cores leaves out the tiles whose wgmma it serializes."""
    def arg(name):
        return kwargs.get(name, named_args.get(name))

    if arg("EPILOGUE") == EPI_DSILU.value:
        kept = [c for c in configs if _acc_per_thread(c) <= 32]
    else:
        kept = [c for c in configs if _acc_per_thread(c) <= 64]
    if _SERIALIZES_TRANSPOSED_A and arg("stride_am") == 1 and not arg("IEEE"):
        kept = [c for c in kept if not _serialized_transposed_a(c)]
    return kept or configs[:1]


def _gemm_tuning(fn):
    """Autotuned on a GPU; under the CPU interpreter its one tile as fixed meta-parameters, since
    Triton 3.3's Autotuner asks the GPU driver for a benchmarker as soon as it is made."""
    if INTERPRET:
        tile = _gemm_configs()[0].kwargs
        return triton.heuristics({name: (lambda args, v=v: v) for name, v in tile.items()})(fn)
    return triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "EPILOGUE", "IEEE"],
                           prune_configs_by={"early_config_prune": _prune_gemm_configs})(fn)


@_gemm_tuning
@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, aux1_ptr, aux2_ptr, auxo_ptr, M, N, K,
                stride_am, stride_ak, stride_bk, stride_bn, aux2_ld,
                EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_AUX_OUT: tl.constexpr,
                IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c[M, N] = epilogue(y), y = a @ b + bias, fp32 accumulation, one BLOCK_M x BLOCK_N tile per
    program (grouped by GROUP_M rows of tiles for L2 reuse, as in Triton's matmul tutorial):

        EPI_NONE       c = y
        EPI_SILU       c = silu(y) = y * sigmoid(y)                      (the MLP's first layer)
        EPI_GATE_RES   c = aux1 + aux2 * y       (x + gate * MLP(h): MAR's ResBlock residual)
        EPI_DSILU      c = y * s * (1 + p * (1 - s)), s = sigmoid(p), p = aux1   (silu'(p) * y)

    HAS_AUX_OUT stores y too (the pre-activation the backward needs). a and b are addressed
    through their strides (transposes for free); c, aux1, aux_out are contiguous [M, N]; aux2
    rows have stride aux2_ld (the gate chunk of mod)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn64[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    off = rm64[:, None] * N + rn64[None, :]
    if HAS_AUX_OUT:
        tl.store(auxo_ptr + off, acc.to(auxo_ptr.dtype.element_ty), mask=mask)
    if EPILOGUE == EPI_SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    elif EPILOGUE == EPI_GATE_RES:
        res = tl.load(aux1_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(aux2_ptr + rm64[:, None] * aux2_ld + rn64[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = res + gate * acc
    elif EPILOGUE == EPI_DSILU:
        p = tl.load(aux1_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-p))
        acc = acc * s * (1.0 + p * (1.0 - s))
    tl.store(c_ptr + off, acc.to(c_ptr.dtype.element_ty), mask=mask)
