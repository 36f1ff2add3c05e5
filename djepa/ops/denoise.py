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
        stream, aux2_ld, workspace, splits, workspace_numel)
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
    splits > 1 (= _C.gemm_splits(M, N, K, epilogue, has_bias), float32 output, no epilogue or
    bias): K is split over that many blocks, whose partials go to `workspace`, a float32 buffer
    of workspace_numel >= (splits - 1) * M * N elements (ValueError when smaller).
_C.gemm_sm90(a, b, c, bias, M, N, K, a_trans, b_trans, epilogue, aux1, aux2, aux_out, dtype,
             stream, aux2_ld, workspace, splits, workspace_numel, kernel)
                                                     (builds with sm_90a code; _Cuda picks it on sm_90)
    gemm's contract with wgmma/TMA kernels; any epilogue may split K: with
    splits = _C.gemm_sm90_splits(M, N, K, kernel=kernel) > 1, workspace holds workspace_numel >=
    splits * M * N float32 (ValueError when fewer). kernel: 0 = the design chosen by shape,
    1 = 128x128, 2 = 128x256 (DJEPA_SM90_GEMM, djepa.backends.sm90_gemm_design).
Every entry point checks its arguments before it touches the GPU (csrc/checks.h): dtype codes,
sizes and their int64 extents, row strides, flags, pointers present and aligned to their element
size, workspace sizes, the build's archs (ValueError / RuntimeError naming the function); then
that every buffer is GPU memory of one GPU, which it makes current for the launch.
_C.denoise_update(x, model_out, noise, out, xin_out, B, C, out_ld, cfg, cfg_scale, coef_x,
                  coef_eps, min_log, max_log, noise_scale, dtype, stream)
    The elementwise tail of one reverse step, for r < B, j < C (f32 math):
        e   = model_out[r, j]                          (row stride out_ld, dtype `dtype`)
        if cfg: u = model_out[r + B, j]; e = u + s * (e - u), s = *cfg_scale
    CHANGE relative to the brief: cfg_scale is a pointer to one float32 on the device (0 allowed
    when cfg == 0), not a float: the sampler's CUDA graph reads it at each replay, so MAR's
    linear CFG schedule (a new scale every iteration) replays one graph.
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


# ------------------------------------------------------------------------------------------
# kernel launchers: the same calls on both fast backends
# ------------------------------------------------------------------------------------------
def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


class _Triton:
    name = "triton"

    def __init__(self):
        from djepa.kernels import denoise as k

        self.k = k

    def ln_mod_fwd(self, x, mod, mod_ld, ln_w, ln_b, h, stats, eps):
        M, W = x.shape
        tile = self.k.ln_config(W, x.element_size())
        self.k.ln_mod_fwd_kernel[(triton_cdiv(M, tile.rows),)](
            x, mod, ln_w if ln_w is not None else x, ln_b if ln_b is not None else x, h,
            stats if stats is not None else h, M, W, mod_ld, float(eps),
            HAS_AFFINE=ln_w is not None, HAS_STATS=stats is not None, BLOCK_M=tile.rows, BLOCK_W=tile.block_w,
            num_warps=tile.warps)

    def ln_mod_bwd(self, x, mod, ln_w, ln_b, stats, dh, dres, dx, dmod):
        M, W = x.shape
        tile = self.k.ln_config(W, x.element_size())
        rows = self.k.ln_bwd_rows(W)
        nb = triton_cdiv(M, rows)
        dw_part = torch.empty(nb, W, device=x.device, dtype=torch.float32)
        db_part = torch.empty(nb, W, device=x.device, dtype=torch.float32)
        self.k.ln_mod_bwd_kernel[(nb,)](
            x, mod, ln_w, ln_b, stats, dh, dres if dres is not None else dh, dx, dmod, dw_part, db_part, M, W,
            HAS_AFFINE=True, HAS_DRES=dres is not None, ROWS=rows, TILE_ROWS=tile.rows, BLOCK_W=tile.block_w,
            num_warps=tile.warps)
        return dw_part.sum(0), db_part.sum(0)

    def gate_bwd(self, dout, mod, y2, dy2, dmod):
        M, W = dout.shape
        block = self.k.ELEMENTWISE_BLOCK
        self.k.gate_bwd_kernel[(triton_cdiv(M * W, block),)](dout, mod, y2, dy2, dmod, M, W, BLOCK=block)

    def add_silu(self, c, t_row, out):
        M, W = c.shape
        block = self.k.ELEMENTWISE_BLOCK
        self.k.add_silu_kernel[(triton_cdiv(M * W, block),)](c, t_row, out, M, W, BLOCK=block)

    def gemm(self, a, b, c, M, N, K, a_trans=False, b_trans=False, bias=None, epilogue=0,
             aux1=None, aux2=None, aux2_ld=0, aux_out=None):
        stride_am, stride_ak = (1, M) if a_trans else (K, 1)
        stride_bk, stride_bn = (1, K) if b_trans else (N, 1)
        grid = lambda meta: (triton_cdiv(M, meta["BLOCK_M"]) * triton_cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        self.k.gemm_kernel[grid](
            a, b, c, bias if bias is not None else c, aux1 if aux1 is not None else c,
            aux2 if aux2 is not None else c, aux_out if aux_out is not None else c, M, N, K,
            stride_am, stride_ak, stride_bk, stride_bn, aux2_ld, EPILOGUE=epilogue, HAS_BIAS=bias is not None,
            HAS_AUX_OUT=aux_out is not None, IEEE=a.dtype == torch.float32)

    def denoise_update(self, x, model_out, noise, out, xin, B, C, cfg, cfg_scale, coefs):
        coef_x, coef_eps, min_log, max_log, noise_scale = coefs
        block = self.k.UPDATE_BLOCK
        self.k.denoise_update_kernel[(triton_cdiv(B * C, block),)](
            x, model_out, noise if noise is not None else x, out, xin if xin is not None else out,
            B, C, model_out.stride(0), cfg_scale, coef_x, coef_eps, min_log, max_log, noise_scale,
            CFG=bool(cfg), HAS_NOISE=noise is not None and noise_scale != 0.0, HAS_XIN=xin is not None,
            BLOCK=block)


def triton_cdiv(a, b):
    return (a + b - 1) // b


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _numel(t):
    return 0 if t is None else t.numel()


class _Cuda:
    """djepa._C per the contract in this module's docstring. Its GEMMs go to gemm_sm90 (wgmma,
    TMA) on an sm_90 GPU where the build has sm_90a code (djepa.backends.uses_wgmma; adaln_block
    and denoise_step share it), else to gemm (mma.sync); the LayerNorm and update kernels are
    the same everywhere."""
    name = "cuda"

    def __init__(self, device):
        from djepa import backends

        self.C = _dispatch.extension()
        self.device = device
        self.sm90 = backends.uses_wgmma("adaln_block", device)
        # gemm_sm90's `kernel`: the design DJEPA_SM90_GEMM names (djepa.backends.sm90_gemm_design)
        self.sm90_kernel = backends.SM90_GEMM_DESIGNS[backends.sm90_gemm_design()] if self.sm90 else 0

    def _s(self):
        return _dispatch.stream_handle(self.device)

    def ln_mod_fwd(self, x, mod, mod_ld, ln_w, ln_b, h, stats, eps):
        M, W = x.shape
        self.C.adaln_modulate_fwd(_ptr(x), _ptr(mod), _ptr(ln_w), _ptr(ln_b), _ptr(h), _ptr(stats), M, W,
                                  float(eps), _dispatch.dtype_code(x.dtype), self._s(), mod_ld)

    def ln_mod_bwd(self, x, mod, ln_w, ln_b, stats, dh, dres, dx, dmod):
        M, W = x.shape
        nb = triton_cdiv(M, int(self.C.adaln_rows_per_block()))
        dw_part = torch.empty(nb, W, device=x.device, dtype=torch.float32)
        db_part = torch.empty(nb, W, device=x.device, dtype=torch.float32)
        self.C.adaln_modulate_bwd(_ptr(x), _ptr(mod), _ptr(ln_w), _ptr(ln_b), _ptr(stats), _ptr(dh), _ptr(dx),
                                  _ptr(dmod), _ptr(dw_part), _ptr(db_part), M, W,
                                  _dispatch.dtype_code(x.dtype), self._s())
        if dres is not None:
            dx.add_(dres)
        return dw_part.sum(0), db_part.sum(0)

    def gate_bwd(self, dout, mod, y2, dy2, dmod):
        W = dout.shape[1]
        torch.mul(dout, mod[:, 2 * W:], out=dy2)
        torch.mul(dout, y2, out=dmod[:, 2 * W:])

    def add_silu(self, c, t_row, out):
        torch.add(c, t_row, out=out)
        F.silu(out, inplace=True)

    def gemm(self, a, b, c, M, N, K, a_trans=False, b_trans=False, bias=None, epilogue=0,
             aux1=None, aux2=None, aux2_ld=0, aux_out=None):
        if c.dtype == torch.float32 and a.dtype != torch.float32:
            epilogue |= 16
        if self.sm90:
            # gemm_sm90 may split K under any epilogue; its workspace holds every split's partial.
            splits = int(self.C.gemm_sm90_splits(M, N, K, kernel=self.sm90_kernel))
            ws = torch.empty(splits * M * N, device=c.device, dtype=torch.float32) if splits > 1 else None
            self.C.gemm_sm90(_ptr(a), _ptr(b), _ptr(c), _ptr(bias), M, N, K, int(a_trans), int(b_trans), epilogue,
                             _ptr(aux1), _ptr(aux2), _ptr(aux_out), _dispatch.dtype_code(a.dtype), self._s(),
                             aux2_ld, _ptr(ws), splits, _numel(ws), kernel=self.sm90_kernel)
            return
        # Weight gradients (float32, no epilogue): _C may split K over more blocks than there are
        # output tiles; the partial products go to a workspace it adds up in a fixed order.
        split = ()
        if hasattr(self.C, "gemm_splits"):  # (an older _C has neither it nor the arguments)
            splits = int(self.C.gemm_splits(M, N, K, epilogue, bias is not None))
            ws = torch.empty((splits - 1) * M * N, device=c.device, dtype=torch.float32) if splits > 1 else None
            split = (_ptr(ws), splits, _numel(ws))
        self.C.gemm(_ptr(a), _ptr(b), _ptr(c), _ptr(bias), M, N, K, int(a_trans), int(b_trans), epilogue,
                    _ptr(aux1), _ptr(aux2), _ptr(aux_out), _dispatch.dtype_code(a.dtype), self._s(), aux2_ld,
                    *split)

    def denoise_update(self, x, model_out, noise, out, xin, B, C, cfg, cfg_scale, coefs):
        coef_x, coef_eps, min_log, max_log, noise_scale = coefs
        self.C.denoise_update(_ptr(x), _ptr(model_out), _ptr(noise) if noise_scale != 0.0 else 0, _ptr(out),
                              _ptr(xin), B, C, model_out.stride(0), int(bool(cfg)), _ptr(cfg_scale),
                              coef_x, coef_eps, min_log, max_log, noise_scale,
                              _dispatch.dtype_code(model_out.dtype), self._s())


def _runner(backend, device):
    return _Triton() if backend == "triton" else _Cuda(device)


# ------------------------------------------------------------------------------------------
# adaln_block: fused forward/backward, torch.library ops, autograd
# ------------------------------------------------------------------------------------------
def _block_fwd_impl(backend, x, mod, ln_w, ln_b, w1, b1, w2, b2, eps, save):
    run = _runner(backend, x.device)
    M, W = x.shape
    h = torch.empty_like(x)
    stats = torch.empty(M, 2, device=x.device, dtype=torch.float32) if save else None
    run.ln_mod_fwd(x, mod, 3 * W, ln_w, ln_b, h, stats, eps)
    a = torch.empty_like(x)
    p = torch.empty_like(x) if save else None
    run.gemm(h, w1, a, M, W, W, b_trans=True, bias=b1, epilogue=1, aux_out=p)
    out = torch.empty_like(x)
    y2 = torch.empty_like(x) if save else None
    run.gemm(a, w2, out, M, W, W, b_trans=True, bias=b2, epilogue=2, aux1=x, aux2=mod[:, 2 * W:],
             aux2_ld=3 * W, aux_out=y2)
    if not save:  # custom ops may not return aliased tensors: one fresh empty per slot
        return (out, *(x.new_empty(0) for _ in range(4)), x.new_empty(0, dtype=torch.float32))
    return out, h, p, a, y2, stats


def _block_bwd_impl(backend, dout, x, mod, ln_w, ln_b, w1, w2, h, p, a, y2, stats):
    run = _runner(backend, x.device)
    M, W = x.shape
    dout = dout.contiguous()
    dmod = torch.empty_like(mod)
    dy2 = torch.empty_like(x)
    run.gate_bwd(dout, mod, y2, dy2, dmod)
    f32 = torch.empty(W, W, device=x.device, dtype=torch.float32)
    run.gemm(dy2, a, f32, W, W, M, a_trans=True)                       # dW2 = dy2^T a
    dw2 = f32.to(x.dtype)
    f32 = torch.empty(W, W, device=x.device, dtype=torch.float32)
    db2 = dy2.float().sum(0).to(x.dtype)
    dp = torch.empty_like(x)
    run.gemm(dy2, w2, dp, M, W, W, epilogue=3, aux1=p)                 # dp = (dy2 W2) * silu'(p)
    run.gemm(dp, h, f32, W, W, M, a_trans=True)                        # dW1 = dp^T h
    dw1 = f32.to(x.dtype)
    db1 = dp.float().sum(0).to(x.dtype)
    dh = torch.empty_like(x)
    run.gemm(dp, w1, dh, M, W, W)                                      # dh = dp W1
    dx = torch.empty_like(x)
    dlnw, dlnb = run.ln_mod_bwd(x, mod, ln_w, ln_b, stats, dh, dout, dx, dmod)
    return dx, dmod, dlnw.to(x.dtype), dlnb.to(x.dtype), dw1, db1, dw2, db2


@torch.library.custom_op("djepa::adaln_block_fwd", mutates_args=())
def _adaln_block_fwd_op(backend: str, x: torch.Tensor, mod: torch.Tensor, ln_w: torch.Tensor,
                        ln_b: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                        b2: torch.Tensor, eps: float, save: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _dispatch.on_device(x.device):
        return _block_fwd_impl(backend, x, mod, ln_w, ln_b, w1, b1, w2, b2, eps, save)


@_adaln_block_fwd_op.register_fake
def _(backend, x, mod, ln_w, ln_b, w1, b1, w2, b2, eps, save):
    if not save:
        return (torch.empty_like(x), *(x.new_empty(0) for _ in range(4)), x.new_empty(0, dtype=torch.float32))
    stats = x.new_empty(x.shape[0], 2, dtype=torch.float32)
    return tuple(torch.empty_like(x) for _ in range(5)) + (stats,)


@torch.library.custom_op("djepa::adaln_block_bwd", mutates_args=())
def _adaln_block_bwd_op(backend: str, dout: torch.Tensor, x: torch.Tensor, mod: torch.Tensor,
                        ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                        h: torch.Tensor, p: torch.Tensor, a: torch.Tensor, y2: torch.Tensor,
                        stats: torch.Tensor) -> list[torch.Tensor]:
    with _dispatch.on_device(x.device):
        return list(_block_bwd_impl(backend, dout, x, mod, ln_w, ln_b, w1, w2, h, p, a, y2, stats))


@_adaln_block_bwd_op.register_fake
def _(backend, dout, x, mod, ln_w, ln_b, w1, w2, h, p, a, y2, stats):
    W = x.shape[1]
    return [torch.empty_like(x), torch.empty_like(mod), x.new_empty(W), x.new_empty(W),
            torch.empty_like(w1), x.new_empty(W), torch.empty_like(w2), x.new_empty(W)]


class _AdaLNBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, x, mod, ln_w, ln_b, w1, b1, w2, b2, eps, affine):
        save = any(ctx.needs_input_grad)
        out, h, p, a, y2, stats = _adaln_block_fwd_op(backend, x, mod, ln_w, ln_b, w1, b1, w2, b2, eps, save)
        if save:
            ctx.save_for_backward(x, mod, ln_w, ln_b, w1, w2, h, p, a, y2, stats)
        ctx.backend, ctx.affine = backend, affine
        return out

    @staticmethod
    def backward(ctx, dout):
        x, mod, ln_w, ln_b, w1, w2, h, p, a, y2, stats = ctx.saved_tensors
        dx, dmod, dlnw, dlnb, dw1, db1, dw2, db2 = _adaln_block_bwd_op(
            ctx.backend, dout, x, mod, ln_w, ln_b, w1, w2, h, p, a, y2, stats)
        if not ctx.affine:
            dlnw = dlnb = None
        return None, dx, dmod, dlnw, dlnb, dw1, db1, dw2, db2, None, None


def _fast_reasons(x, W, what):
    cuda_reason = triton_reason = None
    if x.dtype not in _FAST_DTYPES:
        triton_reason = f"{what} kernels take float16/bfloat16/float32, not {x.dtype}"
    elif W > 8192:
        triton_reason = f"width {W} > 8192 (a LayerNorm row must fit one Triton program)"
    if x.dtype not in (torch.float16, torch.bfloat16):
        cuda_reason = f"the CUDA {what} kernels take float16/bfloat16, not {x.dtype}"
    return cuda_reason, triton_reason


def _autocast_inputs(*tensors):
    x = tensors[0]
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cuda", "cpu"):
        return tensors
    if not torch.is_autocast_enabled(x.device.type):
        return tensors
    dt = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def adaln_block(x, mod, ln_w, ln_b, w1, b1, w2, b2, *, eps=1e-6, backend="auto"):
    """See the module docstring. x [M, W]; mod [M, 3W] = (shift | scale | gate); ln_w, ln_b [W]
    or None (LayerNorm without affine); w1, w2 [W, W] nn.Linear weights, b1, b2 [W].
    M == 0 returns an empty [0, W] tensor. Under autocast every floating input is cast to the
    autocast dtype first (so float32 weights meet bfloat16 activations), as F.linear would."""
    x, mod, ln_w, ln_b, w1, b1, w2, b2 = _autocast_inputs(x, mod, ln_w, ln_b, w1, b1, w2, b2)
    _check_block(x, mod, ln_w, ln_b, w1, b1, w2, b2, eps)
    M, W = x.shape
    cuda_reason, triton_reason = _fast_reasons(x, W, "adaln_block")
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, mod, ln_w, ln_b, w1, b1, w2, b2))
    chosen = _dispatch.select_backend("adaln_block", backend, x.device,
                                      cuda_reason=cuda_reason, triton_reason=triton_reason,
                                      dtype=x.dtype, case=dict(W=W, M=M, train=train))
    if chosen == "eager" or M == 0:
        return adaln_block_reference(x, mod, ln_w, ln_b, w1, b1, w2, b2, eps)
    affine = ln_w is not None
    if not affine:
        ln_w = torch.ones(W, device=x.device, dtype=x.dtype)
        ln_b = torch.zeros(W, device=x.device, dtype=x.dtype)
    c = lambda t: t.contiguous()  # noqa: E731
    return _AdaLNBlock.apply(chosen, c(x), c(mod), c(ln_w), c(ln_b), c(w1), c(b1), c(w2), c(b2),
                             float(eps), affine)


# ------------------------------------------------------------------------------------------
# denoise_step: one reverse step with the MLP inside
# ------------------------------------------------------------------------------------------
def _param_dtype(mlp):
    return mlp.input_proj.weight.dtype


def mlp_forward_embedded(mlp, x, timesteps, c_emb):
    """mlp.forward with the condition already embedded (c_emb = mlp.cond_embed(z))."""
    h = mlp.input_proj(x)
    y = mlp.time_embed(timesteps) + c_emb
    for blk in mlp.res_blocks:
        h = blk(h, y)
    return mlp.final_layer(h, y)


def _check_step(mlp, x, c_emb, diffusion, t, noise, cfg_scale, temperature):
    from djepa.diffusion.gaussian import _check_sampling_scalar

    _check_sampling_scalar("cfg_scale", cfg_scale)
    _check_sampling_scalar("temperature", temperature)
    C, W = mlp.in_channels, mlp.model_channels
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != C:
        raise ValueError(f"denoise_step: x must be [B, {C}] (in_channels), got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"denoise_step: the state x must be float32 (or float64 for references), got {x.dtype}")
    B = x.shape[0]
    if c_emb.ndim != 2 or c_emb.shape[1] != W or c_emb.shape[0] not in (B, 2 * B):
        raise ValueError(f"denoise_step: c_emb must be [B, {W}] or [2B, {W}] (cond; uncond) with B = {B}, "
                         f"got {tuple(c_emb.shape)}")
    if c_emb.dtype != _param_dtype(mlp):
        raise TypeError(f"denoise_step: c_emb has dtype {c_emb.dtype}, the MLP {_param_dtype(mlp)}")
    if c_emb.device != x.device:
        raise ValueError(f"denoise_step: c_emb is on {c_emb.device}, x on {x.device}")
    if not isinstance(t, int) or not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f"denoise_step: t must be an int step index in [0, {diffusion.num_timesteps}), got {t!r}")
    expect_out = 2 * C if diffusion.learn_sigma else C
    if mlp.out_channels != expect_out:
        raise ValueError(f"denoise_step: the MLP has {mlp.out_channels} outputs, the diffusion needs {expect_out}")
    if noise is not None and (noise.shape != x.shape or noise.device != x.device):
        raise ValueError(f"denoise_step: noise must be {list(x.shape)} on {x.device}, got {list(noise.shape)}")
    return B, c_emb.shape[0] == 2 * B


def denoise_step_reference(mlp, x, c_emb, diffusion, t, noise=None, cfg_scale=1.0, temperature=1.0):
    """Eager denoise_step through the diffusion's own formulas (p_mean_variance)."""
    B, cfg = _check_step(mlp, x, c_emb, diffusion, t, noise, cfg_scale, temperature)
    C = mlp.in_channels
    xin = x.to(_param_dtype(mlp))
    if cfg:
        xin = torch.cat([xin, xin])
    ts = torch.full((xin.shape[0],), diffusion.timestep_map[t], device=x.device, dtype=torch.long)
    out = mlp_forward_embedded(mlp, xin, ts, c_emb).to(x.dtype)
    eps = out[:, :C]
    if cfg:
        eps = eps[B:] + cfg_scale * (eps[:B] - eps[B:])
    model_out = torch.cat([eps, out[:B, C:]], dim=1)
    tv = torch.full((B,), t, device=x.device, dtype=torch.long)
    pm = diffusion.p_mean_variance_from_output(model_out, x, tv)
    if t == 0 or temperature == 0:
        return pm["mean"]
    if noise is None:
        noise = torch.randn_like(x)
    return pm["mean"] + torch.exp(0.5 * pm["log_variance"]) * noise * temperature


class _Packed:
    """The MLP's weights laid out for the fused step: every adaLN_modulation (blocks, then the
    final layer) stacked into one [(3D + 2) W, W] GEMM operand."""

    def __init__(self, mlp):
        c = lambda t: t.detach().contiguous()  # noqa: E731
        mods = [blk.adaLN_modulation[1] for blk in mlp.res_blocks] + [mlp.final_layer.adaLN_modulation[1]]
        self.w_mod = torch.cat([m.weight.detach() for m in mods]).contiguous()
        self.b_mod = torch.cat([m.bias.detach() for m in mods]).contiguous()
        self.w_in, self.b_in = c(mlp.input_proj.weight), c(mlp.input_proj.bias)
        self.w_out, self.b_out = c(mlp.final_layer.linear.weight), c(mlp.final_layer.linear.bias)
        self.blocks = [(c(b.in_ln.weight), c(b.in_ln.bias), c(b.mlp[0].weight), c(b.mlp[0].bias),
                        c(b.mlp[2].weight), c(b.mlp[2].bias), b.in_ln.eps) for b in mlp.res_blocks]
        self.final_eps = mlp.final_layer.norm_final.eps
        self.W, self.C, self.out = mlp.model_channels, mlp.in_channels, mlp.out_channels


def packed(mlp):
    """`_Packed(mlp)`, rebuilt only when a parameter of `mlp` was replaced or changed in place
    (every denoise_step / sample call would otherwise re-stack the adaLN weights)."""
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in mlp.parameters())
    cached = getattr(mlp, "_djepa_packed", None)
    if cached is None or cached[0] != key:
        cached = (key, _Packed(mlp))
        mlp._djepa_packed = cached
    return cached[1]


def _cfg_scale_tensor(cfg_scale, device):
    """The CFG scale as the float32 0-dim device tensor the update kernels read (a fill kernel,
    no host-to-device copy)."""
    return torch.full((), float(cfg_scale), dtype=torch.float32, device=device)


@_dispatch.launches_on_device_of("x")
def _fused_step(run, pk, x, xin, c_emb, temb_row, noise, coefs, cfg, cfg_scale, out, xin_next):
    """One step in 3 + 3 * depth + 3 launches; writes out (and xin_next, the next MLP input).
    cfg_scale: a float32 0-dim tensor on x's device (see _cfg_scale_tensor)."""
    rows, W = c_emb.shape
    B = x.shape[0]
    NM = pk.w_mod.shape[0]
    sy = torch.empty_like(c_emb)
    run.add_silu(c_emb, temb_row, sy)
    mods = torch.empty(rows, NM, device=x.device, dtype=c_emb.dtype)
    run.gemm(sy, pk.w_mod, mods, rows, NM, W, b_trans=True, bias=pk.b_mod)
    h = torch.empty_like(c_emb)
    run.gemm(xin, pk.w_in, h, rows, W, pk.C, b_trans=True, bias=pk.b_in)
    hn, a, h2 = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h)
    for i, (lw, lb, w1, b1, w2, b2, eps) in enumerate(pk.blocks):
        off = 3 * W * i
        run.ln_mod_fwd(h, mods[:, off:], NM, lw, lb, hn, None, eps)
        run.gemm(hn, w1, a, rows, W, W, b_trans=True, bias=b1, epilogue=1)
        run.gemm(a, w2, h2, rows, W, W, b_trans=True, bias=b2, epilogue=2, aux1=h,
                 aux2=mods[:, off + 2 * W:], aux2_ld=NM)
        h, h2 = h2, h
    run.ln_mod_fwd(h, mods[:, 3 * W * len(pk.blocks):], NM, None, None, hn, None, pk.final_eps)
    model_out = torch.empty(rows, pk.out, device=x.device, dtype=c_emb.dtype)
    run.gemm(hn, pk.w_out, model_out, rows, pk.out, W, b_trans=True, bias=pk.b_out)
    run.denoise_update(x, model_out, noise, out, xin_next, B, pk.C, cfg, cfg_scale, coefs)


def _step_reasons(mlp, x, diffusion):
    cuda_reason, triton_reason = _fast_reasons(mlp.input_proj.weight, mlp.model_channels, "denoise_step")
    why = None
    if x.dtype != torch.float32:
        why = f"the fused step keeps the state in float32, got {x.dtype}"
    elif not diffusion.learn_sigma:
        why = "the fused step implements the learned-range variance only (learn_sigma=True)"
    return cuda_reason or why, triton_reason or why


def denoise_step(mlp, x, c_emb, diffusion, t, *, noise=None, cfg_scale=1.0, temperature=1.0, backend="auto"):
    """One reverse step (see the module docstring); t is the respaced step index (int).
    noise [B, C] float32 defaults to torch.randn_like(x); it is unused at t == 0."""
    B, cfg = _check_step(mlp, x, c_emb, diffusion, t, noise, cfg_scale, temperature)
    cuda_reason, triton_reason = _step_reasons(mlp, x, diffusion)
    chosen = _dispatch.select_backend("denoise_step", backend, x.device,
                                      cuda_reason=cuda_reason, triton_reason=triton_reason, dtype=c_emb.dtype,
                                      case=dict(W=mlp.model_channels, M=c_emb.shape[0]))
    if noise is None and t > 0:
        noise = torch.randn_like(x)
    with torch.no_grad():
        if chosen == "eager" or B == 0:
            return denoise_step_reference(mlp, x, c_emb, diffusion, t, noise, cfg_scale, temperature)
        dt = _param_dtype(mlp)
        xin = x.to(dt)
        if cfg:
            xin = torch.cat([xin, xin])
        ts = torch.full((1,), int(diffusion.timestep_map[t]), device=x.device, dtype=torch.long)
        temb = mlp.time_embed(ts)[0].contiguous()
        out = torch.empty_like(x)
        _fused_step(_runner(chosen, x.device), packed(mlp), x.contiguous(), xin, c_emb.contiguous(), temb,
                    None if noise is None else noise.contiguous(), diffusion.step_coefficients(t, temperature),
                    cfg, _cfg_scale_tensor(cfg_scale, x.device), out, None)
        return out
