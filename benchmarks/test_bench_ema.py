"""Fused EMA update on the GPU: djepa (cuda, triton, the flat-buffer module) against its peers.

The parameter lists are those of the D-JEPA presets (every trainable tensor of the whole model,
shapes taken from `djepa.models.build(preset)` on the meta device): B ~212M parameters in ~300
tensors, L ~687M. Two dtype cases: a float32 EMA of float32 parameters, and a float32 EMA of
bf16 parameters (bf16 training). Paths:

  loop            one `ema.mul_(d).add_(x, alpha=1-d)` per tensor (what most JEPA code does)
  foreach-lerp    torch._foreach_lerp_(emas, xs, 1-d)  (float32 parameters only: lerp needs one dtype)
  apex-axpby      NVIDIA apex amp_C.multi_tensor_axpby, only if apex is already importable
  djepa-triton    djepa.ops.ema_update_(..., backend="triton")
  djepa-cuda      djepa.ops.ema_update_(..., backend="cuda")
  djepa-module    djepa.nn.EMA.update(model) (flat float32 buffer, auto backend)

`extra_info` holds ms (median of triton.testing.do_bench), GB/s counted as the bytes the update
must move (read EMA + read parameter + write EMA), the fraction of the measured device copy
bandwidth (a large `copy_` timed in the same run), and the speed-up over the per-tensor loop.

    pytest benchmarks/test_bench_ema.py --benchmark-json=benchmarks/results/<date>_<gpu>_ema.json

Knob: DJEPA_BENCH_EMA_PRESETS (default "B,L").
Targets on an H100 (benchmark, not a test): the best djepa path at >= 90% of the measured copy
bandwidth on the L list, >= 1.1x torch._foreach_lerp_ and >= 20x the per-tensor loop.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the EMA benchmark needs a CUDA GPU (none is visible)", allow_module_level=True)

import triton  # noqa: E402

import bench_peers  # noqa: E402
from djepa import backends  # noqa: E402
from djepa.models import build  # noqa: E402
from djepa.nn import EMA  # noqa: E402
from djepa.ops import ema_update_  # noqa: E402

pytestmark = pytest.mark.gpu

PRESETS = [p.strip() for p in os.environ.get("DJEPA_BENCH_EMA_PRESETS", "B,L").split(",") if p.strip()]
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECAY = 0.9999
_loop_ms = {}
_lerp_ms = {}


def _shapes(preset):
    with torch.device("meta"):
        model = build(preset)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


_shape_cache = {}


def _lists(preset, dtype):
    if preset not in _shape_cache:
        _shape_cache[preset] = _shapes(preset)
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in _shape_cache[preset]]
    emas = [x.float().clone() for x in xs]
    return emas, xs


class _Holder(torch.nn.Module):
    """A module whose parameters are the given tensors (for EMA.update)."""

    def __init__(self, xs):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(x, requires_grad=False) for x in xs])


# ------------------------------------------------------------------------------------------
# Providers: one set-up per path, in the order the cases time them (the loop and foreach-lerp first,
# so that djepa's cases record their speed-up over them). A set-up takes the EMA and parameter
# lists and returns a zero-argument callable doing one update, or skips with the reason.
# ------------------------------------------------------------------------------------------
PROVIDERS = bench_peers.Providers()


@PROVIDERS.register("loop")
def _loop(name, emas, xs):
    def run():
        for e, x in zip(emas, xs):
            e.mul_(DECAY).add_(x, alpha=1 - DECAY)
    return run


@PROVIDERS.register("foreach-lerp")
def _foreach_lerp(name, emas, xs):
    if xs[0].dtype != torch.float32:
        pytest.skip(f"{name}: torch._foreach_lerp_ needs the EMA and the parameters in one dtype")
    return lambda: torch._foreach_lerp_(emas, xs, 1 - DECAY)


@PROVIDERS.register("apex-axpby")
def _apex_axpby(name, emas, xs):
    try:
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier
    except Exception as exc:  # not installed, or a foreign "apex" package
        pytest.skip(f"{name}: NVIDIA apex is not importable ({type(exc).__name__}: {exc})")
    flag = torch.zeros(1, dtype=torch.int, device="cuda")
    # out = a*x + b*y with x = params, y = emas, out = emas
    return lambda: multi_tensor_applier(amp_C.multi_tensor_axpby, flag, [xs, emas, emas], 1 - DECAY, DECAY, -1)


@PROVIDERS.register("djepa-triton", "djepa-cuda")
def _djepa(name, emas, xs):
    backend = name.split("-")[1]
    reason = (backends.triton_unavailable_reason if backend == "triton"
              else backends.cuda_unavailable_reason)("ema_update_", torch.device("cuda"))
    if reason:
        pytest.skip(f"{name}: {reason}")
    return lambda: ema_update_(emas, xs, DECAY, backend=backend)


@PROVIDERS.register("djepa-module")
def _djepa_module(name, emas, xs):
    model = _Holder(xs)
    ema = EMA(model, decay=DECAY)
    return lambda: ema.update(model)


PATHS = list(PROVIDERS)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("param_dtype", list(PARAM_DTYPES))
@pytest.mark.parametrize("preset", PRESETS)
def test_ema_update(benchmark, copy_bandwidth, preset, param_dtype, path):
    emas, xs = _lists(preset, PARAM_DTYPES[param_dtype])
    run = PROVIDERS[path](path, emas, xs)
    benchmark.group = f"ema {preset} {param_dtype}"
    numel = sum(x.numel() for x in xs)
    moved = numel * (4 + 4 + xs[0].element_size())
    ms = triton.testing.do_bench(run, warmup=10, rep=100)
    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, setup=torch.cuda.synchronize, rounds=20, warmup_rounds=2)
    gbs = moved / (ms * 1e-3) / 1e9
    info = dict(ms=ms, gb_per_s=gbs, copy_gb_per_s=copy_bandwidth, fraction_of_copy_bw=gbs / copy_bandwidth,
                tensors=len(xs), params=numel, device=torch.cuda.get_device_name())
    key = (preset, param_dtype)
    if path == "loop":
        _loop_ms[key] = ms
    elif key in _loop_ms:
        info["speedup_vs_loop"] = _loop_ms[key] / ms
    if path == "foreach-lerp":
        _lerp_ms[key] = ms
    elif path.startswith("djepa") and key in _lerp_ms:
        info["speedup_vs_foreach_lerp"] = _lerp_ms[key] / ms
    benchmark.extra_info.update(info)
