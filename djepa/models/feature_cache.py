"""Reuse of encoder / predictor features across the sampler's iterations (LazyMAR / MARché style).

Between two masked-autoregressive iterations only a few tokens change: the ones just revealed.
The others' inputs are the same, and their features move only through attention to the new
ones. A `FeatureCache` runs one stack of blocks (the encoder's or the predictor's) as follows:

1. the first `probe` blocks run on every token (exactly);
2. a token whose probe-depth features moved by less than `tol` (relative L2,
   |h - h_then| / |h_then|, against the features it had when its deeper blocks last ran) and
   that was in the previous pass *reuses* its cached inputs of every deeper block: it is not a
   query there, and its keys and values come from its cached input;
3. every other token runs the deeper blocks as a query over all keys, and its inputs are cached.

With `need` (the predictor: the rows the head reads) the last block computes those rows only:
no other output of the predictor is read. tol = 0 reuses nothing (the comparison is strict) and
keeps no state: the encoder runs as without the cache, bit for bit, and the predictor differs
only by rounding (its last block's row selection changes matmul shapes). Keys are stored by position (class tokens first, then sequence positions), so
the encoder's growing visible set lines up across iterations.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from djepa.models import masking


def _gather(state, positions):
    return torch.gather(state, 1, positions.unsqueeze(-1).expand(-1, -1, state.shape[-1]))


def block_rows(block, h, rows, key_mask):
    """The output of a timm-style `Block` (djepa.nn.Block) for the rows `rows` [B, A] of h
    [B, S, D], whose queries attend over all S tokens (keys masked by key_mask [B, S] or None)."""
    attn = block.attn
    B, S, D = h.shape
    H, hd = attn.num_heads, attn.head_dim
    n = block.norm1(h)
    w, b = attn.qkv.weight, attn.qkv.bias
    kv = F.linear(n, w[D:], None if b is None else b[D:]).reshape(B, S, 2, H, hd).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    x = _gather(h, rows)
    A = rows.shape[1]
    q = F.linear(_gather(n, rows), w[:D], None if b is None else b[:D]).reshape(B, A, H, hd).transpose(1, 2)
    q, k = attn.q_norm(q).to(v.dtype), attn.k_norm(k).to(v.dtype)
    from djepa.ops import masked_attention

    o = masked_attention(q, k, v, key_mask, scale=attn.scale, backend=attn.backend)
    o = attn.proj(o.transpose(1, 2).reshape(B, A, D))
    x = x + block.ls1(o)
    return x + block.ls2(block.mlp(block.norm2(x)))


class FeatureCache:
    """The cached state of one stack of blocks across sampler iterations (see the module
    docstring). Call it as a DJEPANet block runner: cache(blocks, x, key_mask, positions, need)."""

    def __init__(self, tol: float, num_positions: int, probe: int = 1):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0 or tol != tol:
            raise ValueError(f"feature_reuse must be a number >= 0 (a relative tolerance), got {tol!r}")
        self.tol = float(tol)
        self.P = int(num_positions)
        self.probe = int(probe)
        self.state = None
        self.rows = 0      # query rows computed, summed over blocks, in the last call
        self.reused = 0    # tokens that reused their cached deeper features in the last call

    def __call__(self, blocks, x, key_mask, positions, need: Optional[torch.Tensor] = None):
        depth = len(blocks)
        B, S, D = x.shape
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if key_mask is None else key_mask
        n_valid = int(valid.sum())
        self.reused = 0
        reusable = depth - self.probe - (need is not None)  # blocks where a token may skip its row
        if self.tol == 0 or reusable <= 0:  # nothing can be reused: no state to keep
            last = depth if need is None else depth - 1
            for blk in blocks[:last]:
                x = blk(x, key_mask)
            self.rows = last * n_valid
            if need is not None:
                x, n = self._rows(blocks[-1], x, need, key_mask)
                self.rows += n
            return x
        for blk in blocks[:self.probe]:
            x = blk(x, key_mask)
        rows = self.probe * n_valid
        st = self.state
        if st is None or st["key"] != (B, D, depth, x.dtype, x.device):
            z = lambda: torch.zeros(B, self.P, D, device=x.device, dtype=x.dtype)  # noqa: E731
            st = self.state = {"key": (B, D, depth, x.dtype, x.device), "base": z(), "out": z(),
                               "present": torch.zeros(B, self.P, dtype=torch.bool, device=x.device),
                               "inputs": {l: z() for l in range(self.probe, depth)}}
        b, s = valid.nonzero(as_tuple=True)
        p = positions[b, s]
        xv, base = x[b, s], st["base"][b, p]
        moved = (xv - base).float().norm(dim=-1) / base.float().norm(dim=-1).clamp_min(1e-30)
        reuse = st["present"][b, p] & (moved < self.tol)
        act = ~reuse
        ba, sa, pa = b[act], s[act], p[act]
        br, sr, pr = b[reuse], s[reuse], p[reuse]
        st["base"][ba, pa] = xv[act]
        st["present"].zero_()
        st["present"][b, p] = True
        h = x.clone()
        h[br, sr] = st["inputs"][self.probe][br, pr]
        active = torch.zeros(B, S, dtype=torch.bool, device=x.device)
        active[ba, sa] = True
        for l in range(self.probe, depth):
            st["inputs"][l][ba, pa] = h[ba, sa]
            if l == depth - 1 and need is not None:
                h, n = self._rows(blocks[l], h, need, key_mask)
                rows += n
                break
            cached = st["out"] if l == depth - 1 else st["inputs"][l + 1]
            h, n = self._rows(blocks[l], h, active, key_mask)
            rows += n
            h[br, sr] = cached[br, pr]
        if need is None:
            st["out"][ba, pa] = h[ba, sa]
        self.rows = rows
        self.reused = int(reuse.sum())
        return h

    @staticmethod
    def _rows(block, h, which, key_mask):
        """(h with the rows `which` [B, S] replaced by the block's output, the others unchanged;
        how many rows were computed)."""
        _, idx, idx_valid = masking.gather_visible(h, ~which)
        if idx.shape[1] == 0:
            return h, 0
        out = block_rows(block, h, idx, key_mask)
        h = h.clone()
        bi = torch.arange(h.shape[0], device=h.device).unsqueeze(1).expand_as(idx)
        h[bi[idx_valid], idx[idx_valid]] = out[idx_valid]
        return h, int(idx_valid.sum())
