"""The denoising MLP's AdaLN residual block and one whole reverse-diffusion step.

Public ops
----------
adaln_block(x, mod, ln_w, ln_b, w1, b1, w2, b2, *, eps=1e-6, backend="auto") -> [M, W]
    One residual block of MAR's SimpleMLPAdaLN given the block's adaLN_modulation output
    `mod` [M, 3W] = (shift | scale | gate):
        h = LN(x; ln_w, ln_b, eps) * (1 + scale) + shift
        out = x + gate * (silu(h @ w1.T + b1) @ w2.T + b2)
    Differentiable in every tensor argument (fused forward and backward on triton/cuda).

denoise_step(mlp, x, c_emb, diffusion, t, *, noise=None, cfg_scale=1.0, temperature=1.0,
             backend="auto") -> [B, C] float32
    One reverse step p(x_{t-1} | x_t) of the respaced Gaussian diffusion for B tokens, with
    the DenoisingMLP forward inside. `c_emb` = mlp.cond_embed(z), computed once per loop:
    [B, W] without CFG, [2B, W] = [cond; uncond] with cfg_scale != 1 (MAR's layout).
    x [B, C] float32 is the current state (MAR keeps the state in float32 whatever the
    MLP's dtype). Returns the next state; no noise is added at t == 0.

The djepa._C contract (csrc/denoise.cu implements it)
-----------------------------------------------------
All pointers are ints (tensor.data_ptr(); 0 = absent), matrices row-major, dtype codes of
csrc/common.h, `stream` = torch.cuda.current_stream().cuda_stream. Inputs fp16/bf16 with fp32
accumulation (fp32 may be rejected with std::invalid_argument; Python then uses Triton).

CHANGE relative to the lead's brief: adaln_modulate_fwd takes a trailing `mod_ld` (row stride
of `mod` in elements). The sampler computes every block's modulation with ONE GEMM whose
output rows hold all blocks' (shift|scale|gate) chunks, so a block's `mod` is a strided view.
The final layer's (shift|scale) [M, 2W] is also passed through this kernel with mod_ld = its
stride; the kernel must read only the shift and scale chunks (never the gate chunk).

_C.adaln_modulate_fwd(x, mod, ln_w, ln_b, h, stats, M, W, eps, dtype, stream, mod_ld)
    x [M, W] contiguous; mod: row r's shift at mod + r*mod_ld, scale at + W (gate at + 2W,
    unused here); ln_w, ln_b [W] (both 0 = LayerNorm without affine);
    h [M, W] (written) = LN(x) * (1 + scale) + shift, LN in fp32 with biased variance;
    stats float32 [M, 2] (written) = (mean, rstd), or 0 to skip (inference).
_C.adaln_modulate_bwd(x, mod, ln_w, ln_b, stats, dh, dx, dmod, dln_w_partial, dln_b_partial,
                      M, W, dtype, stream)
    CHANGE relative to the brief: ln_b is passed too (dscale = dh * (xhat * ln_w + ln_b)).
    mod contiguous [M, 3W]. Writes (not accumulates) dx [M, W] = d/dx of h only (the
    residual's identity gradient is added by Python); dmod [M, 3W]: writes the shift and
    scale chunks only (the gate chunk is written by the gate GEMM). dln_w_partial and
    dln_b_partial float32 [ceil(M / rows_per_block), W] partial sums over row blocks, fully
    written (zero rows where a block has no rows); Python sums them over dim 0. Their
    number of rows is `_C.adaln_rows_per_block()` (an int function the extension exposes;
    Python allocates ceil(M / that) rows). ln_w may be 0 (no affine: partials not written,
    may be 0).
_C.gemm(a, b, c, bias, M, N, K, a_trans, b_trans, epilogue, aux1, aux2, aux_out, dtype,
        stream, aux2_ld)
    y = op(a) @ op(b) + bias; a [M, K] (or [K, M] stored when a_trans), b [K, N] (or [N, K]
    stored when b_trans: x @ W.T of an nn.Linear weight W [N, K] is b_trans=1); bias [N] or 0.
    epilogue & 15: 0 -> c = y;
                   1 -> c = silu(y), aux_out (if nonzero, [M, N]) receives y (pre-activation);
                   2 -> c = aux1 + aux2 * y with aux1 [M, N] residual, aux2 the gate rows
                        (row stride aux2_ld elements, pointer already at the gate chunk);
                        aux_out (if nonzero, [M, N]) receives y.
                   3 -> c = silu_backward: c = y * s * (1 + p * (1 - s)) with p = aux1 [M, N]
                        (pre-activation), s = sigmoid(p)   (the MLP's dSiLU, fused)
    epilogue & 16: c (and aux_out) are float32 (weight gradients); else the input dtype.
    aux tensors have the input dtype; bias has the input dtype.
_C.denoise_update(x, model_out, noise, out, xin_out, B, C, out_ld, cfg, cfg_scale, coef_x,
                  coef_eps, min_log, max_log, noise_scale, dtype, stream)
    The elementwise tail of one reverse step, for r < B, j < C (f32 math):
        e   = model_out[r, j]                          (row stride out_ld, dtype `dtype`)
        if cfg: u = model_out[r + B, j]; e = u + cfg_scale * (e - u)
        v   = model_out[r, C + j]                      (learned-range variance value)
        logvar = (v + 1)/2 * max_log + (1 - (v + 1)/2) * min_log
        mean   = coef_x * x[r, j] - coef_eps * e
        out[r, j] = mean + (noise_scale != 0 ? exp(0.5 * logvar) * noise_scale * noise[r, j] : 0)
        xin_out[r, j] = out[r, j] in `dtype`; if cfg also xin_out[r + B, j] (0 = skip)
    x, noise, out float32 [B, C] contiguous; out may alias x; noise may be 0 when
    noise_scale == 0. The step's floats: coef_x = c1 * sqrt(1/abar) + c2,
    coef_eps = c1 * sqrt(1/abar - 1) (c1, c2 posterior mean coefficients), min_log =
    posterior log variance (clipped), max_log = log(beta), noise_scale = temperature at
    t > 0 and 0 at t == 0.
"""
import math

import torch
import torch.nn.functional as F

from djepa.ops import _dispatch

_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------
# eager references
# ------------------------------------------------------------------------------------------
def adaln_block_reference(x, mod, ln_w, ln_b, w1, b1, w2, b2, eps=1e-6):
    """Eager adaln_block (the definition the kernels are checked against)."""
    W = x.shape[-1]
    shift, scale, gate = mod[:, :W], mod[:, W:2 * W], mod[:, 2 * W:3 * W]
    h = F.layer_norm(x, (W,), ln_w, ln_b, eps) * (1 + scale) + shift
    return x + gate * F.linear(F.silu(F.linear(h, w1, b1)), w2, b2)


def _check_block(x, mod, ln_w, ln_b, w1, b1, w2, b2, eps):
    tensors = dict(x=x, mod=mod, ln_w=ln_w, ln_b=ln_b, w1=w1, b1=b1, w2=w2, b2=b2)
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"adaln_block: {name} must be a tensor, got {type(t).__name__}")
    if x.ndim != 2:
        raise ValueError(f"adaln_block: x must be [M, W], got {tuple(x.shape)}")
    M, W = x.shape
    shapes = dict(mod=(M, 3 * W), ln_w=(W,), ln_b=(W,), w1=(W, W), b1=(W,), w2=(W, W), b2=(W,))
    for name, shape in shapes.items():
        t = tensors[name]
        if t is None:
            if name in ("ln_w", "ln_b"):
                continue
            raise ValueError(f"adaln_block: {name} is required")
        if tuple(t.shape) != shape:
            raise ValueError(f"adaln_block: {name} must be {list(shape)} for x {list(x.shape)}, got {list(t.shape)}")
    if (ln_w is None) != (ln_b is None):
        raise ValueError("adaln_block: give both ln_w and ln_b or neither")
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"adaln_block: {name} must be a floating tensor, got {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"adaln_block: {name} has dtype {t.dtype}, x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"adaln_block: {name} is on {t.device}, x on {x.device}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"adaln_block: eps must be a positive finite number, got {eps!r}")
