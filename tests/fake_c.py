"""A stand-in for djepa._C on the CPU: the ema / denoise entry points as the ops call them, with
no kernel behind them. It records every call, and for every pointer the bytes of the buffer
behind it (from the pointer to the end of its tensor's storage) next to the bytes the kernel
reads or writes there by its contract (djepa/ops/denoise.py's docstring, csrc/*.cu). A call that
hands C++ a buffer smaller than its contract needs, a pointer to no known tensor, no pointer
where one is required, or a workspace_numel larger than the workspace, fails the test there.

Pointers are resolved through `Buffers`: the tensors a test registers (`add`), and every tensor
djepa.ops.denoise._ptr turns into a pointer once `watch_denoise(monkeypatch)` wraps it.
SIGNATURES mirrors the bindings (tests/test_build.py checks it against the built djepa._C).
"""
import math

import torch

ELEMENT_BYTES = {0: 4, 1: 2, 2: 2, 3: 8}  # djepa/ops/_dispatch.py DTYPE_CODES

# entry point -> its parameters as csrc/*.cu binds them: (name, default or REQUIRED)
REQUIRED = object()
_GEMM = [(n, REQUIRED) for n in ("a", "b", "c", "bias", "M", "N", "K", "a_trans", "b_trans", "epilogue", "aux1",
                                 "aux2", "aux_out", "dtype", "stream")] + [("aux2_ld", 0), ("workspace", 0)]
SIGNATURES = {
    "ema_update": [(n, REQUIRED) for n in ("ema_ptrs", "x_ptrs", "numels", "ema_dtype", "x_dtype", "decay_ptr",
                                           "decay", "one_minus_decay", "stream")],
    "adaln_modulate_fwd": [(n, REQUIRED) for n in ("x", "mod", "ln_w", "ln_b", "h", "stats", "M", "W", "eps",
                                                   "dtype", "stream")] + [("mod_ld", 0)],
    "adaln_modulate_bwd": [(n, REQUIRED) for n in ("x", "mod", "ln_w", "ln_b", "stats", "dh", "dx", "dmod",
                                                   "dln_w_partial", "dln_b_partial", "M", "W", "dtype", "stream")],
    "adaln_rows_per_block": [],
    "gemm": _GEMM + [("splits", 1), ("workspace_numel", 0)],
    "gemm_splits": [("M", REQUIRED), ("N", REQUIRED), ("K", REQUIRED), ("epilogue", REQUIRED), ("has_bias", False),
                    ("sms", 0)],
    "gemm_sm90": _GEMM + [("splits", 0), ("workspace_numel", 0), ("kernel", 0)],
    "gemm_sm90_splits": [("M", REQUIRED), ("N", REQUIRED), ("K", REQUIRED), ("splits", 0), ("sms", 0),
                         ("kernel", 0)],
    "denoise_update": [(n, REQUIRED) for n in ("x", "model_out", "noise", "out", "xin_out", "B", "C", "out_ld",
                                               "cfg", "cfg_scale", "coef_x", "coef_eps", "min_log", "max_log",
                                               "noise_scale", "dtype", "stream")],
}


class Buffers:
    """Pointer -> bytes from it to the end of its tensor's storage."""

    def __init__(self):
        self._end = {}

    def add(self, *tensors):
        for t in tensors:
            if t is not None and t.numel():
                storage = t.untyped_storage()
                self._end[t.data_ptr()] = storage.data_ptr() + storage.nbytes()
        return self

    def available(self, ptr):
        assert ptr in self._end, f"pointer {ptr:#x} is not into any tensor the test or djepa.ops.denoise._ptr saw"
        return self._end[ptr] - ptr


def watch_denoise(monkeypatch, buffers=None):
    """Buffers that learn every tensor djepa.ops.denoise hands to _C (through its _ptr)."""
    from djepa.ops import denoise as denoise_op

    buffers = buffers or Buffers()
    real = denoise_op._ptr

    def ptr(t):
        buffers.add(t)
        return real(t)

    monkeypatch.setattr(denoise_op, "_ptr", ptr)
    return buffers


def bind(name, args, kwargs):
    """{parameter: value} of a call, by the binding's signature (TypeError as pybind11 would)."""
    params = SIGNATURES[name]
    if len(args) > len(params):
        raise TypeError(f"{name}: {len(args)} positional arguments, takes {len(params)}")
    bound = dict(zip((p for p, _ in params), args))
    for key, value in kwargs.items():
        if key in bound or key not in dict(params):
            raise TypeError(f"{name}: unexpected or repeated argument {key!r}")
        bound[key] = value
    for p, default in params:
        if p not in bound:
            if default is REQUIRED:
                raise TypeError(f"{name}: missing argument {p!r}")
            bound[p] = default
    return bound


def _gemm_needs(a, workspace_parts):
    M, N, K, ep = a["M"], a["N"], a["K"], a["epilogue"]
    if M == 0 or N == 0:
        return {}, ()
    es, ob = ELEMENT_BYTES[a["dtype"]], 4 if ep & 16 else 2
    needs = {"a": M * K * es, "b": K * N * es, "c": M * N * ob, "bias": N * es}
    required = ["c"] + (["a", "b"] if K else [])
    if ep & 15 in (2, 3):
        needs["aux1"] = M * N * es
        required.append("aux1")
    if ep & 15 == 2:
        needs["aux2"] = ((M - 1) * a["aux2_ld"] + N) * es
        required.append("aux2")
    if ep & 15 in (1, 2):
        needs["aux_out"] = M * N * ob
    if workspace_parts > 0:
        needs["workspace"] = workspace_parts * M * N * 4
    return needs, required


def contract(name, a, rows_per_block=64):
    """(bytes the kernel touches from each pointer argument, the pointers it requires)."""
    if name == "ema_update":
        eb, xb = ELEMENT_BYTES[a["ema_dtype"]], ELEMENT_BYTES[a["x_dtype"]]
        needs = {}
        for i, n in enumerate(a["numels"]):
            needs[f"ema_ptrs[{i}]"], needs[f"x_ptrs[{i}]"] = n * eb, n * xb
        return needs, [k for k, v in needs.items() if v]
    if name == "adaln_modulate_fwd":
        M, W, es = a["M"], a["W"], ELEMENT_BYTES[a["dtype"]]
        ld = a["mod_ld"] or 3 * W
        needs = {"x": M * W * es, "mod": ((M - 1) * ld + 2 * W) * es, "ln_w": W * es, "ln_b": W * es,
                 "h": M * W * es, "stats": M * 2 * 4}
        return (needs, ["x", "mod", "h"]) if M else ({}, ())
    if name == "adaln_modulate_bwd":
        M, W, es = a["M"], a["W"], ELEMENT_BYTES[a["dtype"]]
        blocks = math.ceil(M / rows_per_block)
        needs = {"x": M * W * es, "mod": ((M - 1) * 3 * W + 2 * W) * es, "ln_w": W * es, "ln_b": W * es,
                 "stats": M * 2 * 4, "dh": M * W * es, "dx": M * W * es, "dmod": ((M - 1) * 3 * W + 2 * W) * es}
        if a["ln_w"]:
            needs.update(dln_w_partial=blocks * W * 4, dln_b_partial=blocks * W * 4)
        required = ["x", "mod", "stats", "dh", "dx", "dmod"] + (["dln_w_partial"] if a["ln_w"] else [])
        return (needs, required) if M else ({}, ())
    if name == "gemm":
        return _gemm_needs(a, a["splits"] - 1 if a["splits"] > 1 else 0)
    if name == "gemm_sm90":
        return _gemm_needs(a, a["splits"] if a["splits"] > 1 and a["workspace"] else 0)
    if name == "denoise_update":
        B, C, es = a["B"], a["C"], ELEMENT_BYTES[a["dtype"]]
        rows = 2 * B if a["cfg"] else B
        needs = {"x": B * C * 4, "out": B * C * 4, "model_out": ((rows - 1) * a["out_ld"] + 2 * C) * es,
                 "xin_out": rows * C * es}
        required = ["x", "model_out", "out"]
        if a["noise_scale"] != 0:
            needs["noise"] = B * C * 4
            required.append("noise")
        if a["cfg"]:
            needs["cfg_scale"] = 4
            required.append("cfg_scale")
        return (needs, required) if B else ({}, ())
    return {}, ()


def _pointer(a, key):
    if "[" in key:
        base, i = key[:-1].split("[")
        return a[base][int(i)]
    return a[key]


class Call(tuple):
    """(name, positional arguments), as the fakes recorded before, with .arg (every parameter by
    name), .sizes (bytes each non-null pointer's buffer holds), .needs (bytes the contract touches
    there), .current (the device current at the call) and .stream (the stream's device)."""

    def __new__(cls, name, args, **info):
        self = super().__new__(cls, (name, tuple(args)))
        self.name = name
        self.__dict__.update(dict(arg={}, sizes={}, needs={}, current=None, stream=None), **info)
        return self


class FakeC:
    """djepa._C's ema and denoise entry points (module docstring). `current()` gives the device
    current at a call, `stream_device(handle)` the device of a stream; `splits(M, N, K, epilogue,
    has_bias)` answers gemm_splits, `sm90_splits(M, N, K)` gemm_sm90_splits."""

    cuda_version = "13.0"
    registered = ()

    def __init__(self, buffers, *, current=lambda: None, stream_device=lambda handle: handle,
                 splits=lambda M, N, K, epilogue, has_bias: 1, sm90_splits=lambda M, N, K: 1,
                 rows_per_block=64, archs="80,90a", wgmma_ops=()):
        self.buffers, self.current, self.stream_device = buffers, current, stream_device
        self._splits, self._sm90_splits, self.rows = splits, sm90_splits, rows_per_block
        self.cuda_archs, self.wgmma_ops, self.calls = archs, tuple(wgmma_ops), []

    def _record(self, name, args, kwargs):
        a = bind(name, args, kwargs)
        needs, required = contract(name, a, self.rows)
        sizes = {}
        for key, need in needs.items():
            ptr = _pointer(a, key)
            if need == 0:
                continue
            if not ptr:
                assert key not in required, f"{name}: {key} is required, Python handed 0"
                continue
            sizes[key] = self.buffers.available(ptr)
            assert sizes[key] >= need, (f"{name}: Python handed {key} a buffer of {sizes[key]} bytes, "
                                        f"the kernel touches {need}")
        if name in ("gemm", "gemm_sm90") and a["workspace"]:
            assert a["workspace_numel"] * 4 <= sizes.get("workspace", self.buffers.available(a["workspace"])), (
                f"{name}: workspace_numel={a['workspace_numel']} claims more than the workspace holds")
        stream = self.stream_device(a["stream"]) if "stream" in a else None
        self.calls.append(Call(name, args, arg=a, sizes=sizes, needs=needs, current=self.current(), stream=stream))

    def adaln_rows_per_block(self):
        return self.rows

    def gemm_splits(self, *args, **kwargs):
        a = bind("gemm_splits", args, kwargs)
        self.calls.append(Call("gemm_splits", args, arg=a, current=self.current()))
        return self._splits(a["M"], a["N"], a["K"], a["epilogue"], a["has_bias"])

    def gemm_sm90_splits(self, *args, **kwargs):
        a = bind("gemm_sm90_splits", args, kwargs)
        self.calls.append(Call("gemm_sm90_splits", (a["M"], a["N"], a["K"]), arg=a, current=self.current()))
        return self._sm90_splits(a["M"], a["N"], a["K"])

    def ema_update(self, *args, **kwargs):
        self._record("ema_update", args, kwargs)

    def adaln_modulate_fwd(self, *args, **kwargs):
        self._record("adaln_modulate_fwd", args, kwargs)

    def adaln_modulate_bwd(self, *args, **kwargs):
        self._record("adaln_modulate_bwd", args, kwargs)

    def gemm(self, *args, **kwargs):
        self._record("gemm", args, kwargs)

    def gemm_sm90(self, *args, **kwargs):
        self._record("gemm_sm90", args, kwargs)

    def denoise_update(self, *args, **kwargs):
        self._record("denoise_update", args, kwargs)

    def named(self, name):
        return [c for c in self.calls if c.name == name]


def bytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
