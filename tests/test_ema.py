"""djepa.ops.ema_update_ (eager, Triton under the interpreter, CUDA on a GPU) and djepa.nn.EMA."""
import pytest
import torch
from torch import nn

from djepa import backends
from djepa.nn import EMA
from djepa.nn.ema import constant, linear_ramp
from djepa.ops import ema_update_
from djepa.ops.ema import ema_update_reference
from djepa.testing import assert_close_to_reference

# Rounding of one update in each EMA dtype (the fast path may round differently than eager).
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
SIZES = [1, 3, 1023, 65537]


def _pairs(sizes, ema_dtype, x_dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    emas = [torch.randn(n, generator=g).to(device, ema_dtype) for n in sizes]
    xs = [torch.randn(n, generator=g).to(device, x_dtype) for n in sizes]
    return emas, xs


def _formula(e, x, decay):
    """The update written out in float64, independent of djepa: (value, elementwise bound on
    the rounding of one update in e's dtype: two units of its precision per term, for the
    rounding of decay, of 1 - decay, of the product and of the sum)."""
    d = float(decay)
    e64, x64 = e.detach().double().cpu(), x.detach().double().cpu()
    eps = torch.finfo(e.dtype).eps
    return d * e64 + (1.0 - d) * x64, 2 * eps * (d * e64.abs() + (1.0 - d) * x64.abs()) + 1e-300


def _check_formula(out, e, x, decay, what, slack=1.0):
    want, bound = _formula(e, x, decay)
    err = (out.detach().double().cpu() - want).abs()
    assert torch.isfinite(err).all(), f"{what}: non-finite values"
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= slack, f"{what}: off the float64 formula by {worst:.2f} units of rounding"


def _check(emas, xs, decay, backend):
    """Run `backend` on copies; compare each tensor with the float64 reference under the rule,
    and both the eager result and `backend`'s with the formula written above (the rule alone
    would accept a wrong eager path: it widens the bound)."""
    ref = ema_update_reference(emas, xs, decay)
    low = [e.clone() for e in emas]
    ema_update_(low, xs, decay, backend="eager")
    fast = [e.clone() for e in emas]
    x_before = [x.clone() for x in xs]
    ema_update_(fast, xs, decay, backend=backend)
    for i, (f, lo, r) in enumerate(zip(fast, low, ref)):
        assert f.dtype == emas[i].dtype and f.shape == emas[i].shape
        _check_formula(lo, emas[i], xs[i], decay, f"eager pair {i}")
        _check_formula(f, emas[i], xs[i], decay, f"{backend} pair {i}", slack=2.0)
        assert_close_to_reference(f, lo, r, atol=ATOL[f.dtype], what=f"{backend} pair {i}")
    for x, x0 in zip(xs, x_before):
        assert torch.equal(x, x0), "the source tensors must not be written"


def _backends_here(device):
    """Backends that can run on `device` in this session."""
    found = ["eager"]
    if backends.triton_unavailable_reason("ema_update_", device) is None:
        found.append("triton")
    if device.type == "cuda" and backends.cuda_unavailable_reason("ema_update_", device) is None:
        found.append("cuda")
    return found


# ---------------------------------------------------------------------------------------- eager
@pytest.mark.parametrize("ema_dtype,x_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float64, torch.float64),
])
def test_eager_matches_reference(ema_dtype, x_dtype):
    emas, xs = _pairs(SIZES, ema_dtype, x_dtype, "cpu", seed=1)
    _check(emas, xs, 0.9, "eager")
    _check(emas, xs, torch.tensor(0.75), "eager")


def test_decay_bounds_are_exact():
    emas, xs = _pairs([5, 7], torch.float32, torch.float32, "cpu", seed=2)
    keep = [e.clone() for e in emas]
    ema_update_(emas, xs, 1.0)
    assert all(torch.equal(e, k) for e, k in zip(emas, keep))
    ema_update_(emas, xs, 0.0)
    assert all(torch.equal(e, x) for e, x in zip(emas, xs))


# --------------------------------------------------------------------------------------- triton
@pytest.mark.parametrize("ema_dtype,x_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float16, torch.float16),
])
def test_triton_matches_reference(triton_device, ema_dtype, x_dtype):
    emas, xs = _pairs(SIZES, ema_dtype, x_dtype, triton_device, seed=3)
    _check(emas, xs, 0.999, "triton")


def test_triton_many_tensors_one_launch_per_dtype_pair(triton_device, monkeypatch):
    from djepa.kernels import ema as kernel

    g = torch.Generator().manual_seed(4)
    sizes = torch.randint(1, 300, (500,), generator=g).tolist()
    emas, xs = _pairs(sizes, torch.float32, torch.float32, triton_device, seed=5)
    # mixed dtypes in one call: a float32 EMA of bf16 tensors beside the float32 ones
    e16, x16 = _pairs([17, 4099, 1], torch.float32, torch.bfloat16, triton_device, seed=6)
    emas, xs = emas[:250] + e16 + emas[250:], xs[:250] + x16 + xs[250:]
    launches = []
    real = kernel.ema_update
    monkeypatch.setattr(kernel, "ema_update", lambda *a: (launches.append(len(a[0])), real(*a)))
    _check(emas, xs, torch.tensor(0.9), "triton")
    assert sorted(launches) == [3, 500], "one launch per dtype pair, not one per tensor"


def test_triton_decay_tensor_on_device_and_empty_tensors(triton_device):
    emas, xs = _pairs([0, 33, 0, 1], torch.float32, torch.float32, triton_device, seed=7)
    _check(emas, xs, torch.tensor(0.5, device=triton_device), "triton")


# ----------------------------------------------------------------------------------------- cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("ema_dtype,x_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
])
def test_gpu_matches_reference(backend, ema_dtype, x_dtype):
    if backend not in _backends_here(torch.device("cuda")):
        pytest.skip(f"{backend}: {backends.cuda_unavailable_reason('ema_update_', torch.device('cuda'))}")
    g = torch.Generator().manual_seed(8)
    sizes = SIZES + torch.randint(1, 5000, (600,), generator=g).tolist()  # > 256 tensors: several CUDA launches
    emas, xs = _pairs(sizes, ema_dtype, x_dtype, "cuda", seed=9)
    _check(emas, xs, 0.9999, backend)
    _check(emas, xs, torch.tensor(0.99, device="cuda"), backend)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_more_than_2_pow_31_elements(backend):
    """64-bit indexing: the last elements of a 2^31 + 5 element tensor are updated."""
    if backend not in _backends_here(torch.device("cuda")):
        pytest.skip(f"{backend} unavailable")
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 5
    if free < 3 * n * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    e = torch.zeros(n, dtype=torch.float16, device="cuda")
    x = torch.ones(n, dtype=torch.float16, device="cuda")
    ema_update_([e], [x], 0.5, backend=backend)
    assert e[:8].eq(0.5).all() and e[-8:].eq(0.5).all() and e[2**31 - 4: 2**31 + 4].eq(0.5).all()
    assert int((e != 0.5).sum()) == 0


# ------------------------------------------------------------------------------------ the op
def test_empty_list_is_a_noop():
    for backend in ("auto", "eager", "triton", "cuda"):  # no device: no backend is asked to run
        assert ema_update_([], [], 0.9, backend=backend) is None
    # pairs with no elements are skipped, the others still updated
    emas, xs = [torch.zeros(0), torch.zeros(2)], [torch.ones(0), torch.ones(2)]
    assert ema_update_(emas, xs, 0.25, backend="eager") is None
    assert emas[0].shape == (0,) and torch.equal(emas[1], torch.full((2,), 0.75))


def test_registered_as_a_mutating_torch_library_op():
    op = torch.ops.djepa.ema_update_.default
    assert op._schema.arguments[0].alias_info is not None and op._schema.arguments[0].alias_info.is_write
    emas, xs = _pairs([4, 9], torch.float32, torch.float32, "cpu", seed=10)
    ref = ema_update_reference(emas, xs, 0.5)
    torch.ops.djepa.ema_update_(emas, xs, 0.5, None, "eager")
    assert all(torch.allclose(e.double(), r) for e, r in zip(emas, ref))


def test_compiles_without_graph_breaks_and_tensor_decay_does_not_recompile():
    torch._dynamo.reset()
    emas, xs = _pairs([6, 10], torch.float32, torch.float32, "cpu", seed=11)
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True)
    def step(es, ys, d):
        ema_update_(es, ys, d, backend="eager")

    for d in (0.5, 0.25, 0.125):
        ref = ema_update_reference(emas, xs, d)
        step(emas, xs, torch.tensor(d))
        assert all(torch.allclose(e.double(), r, atol=1e-6) for e, r in zip(emas, ref))
    assert counts["n"] == 1


def _bad_calls(e, x):
    """(args, exception, message fragment) for each kind of bad input; pair 1 is the bad one."""
    ok_e, ok_x = torch.zeros(3), torch.ones(3)
    return [
        (([ok_e, e], [ok_x]), ValueError, "2 EMA tensors but 1"),
        (([ok_e, e], [ok_x, torch.ones(5)]), ValueError, "pair 1"),
        (([ok_e, e], [ok_x, torch.ones(4, dtype=torch.int64)]), TypeError, r"tensors\[1\]"),
        (([ok_e, torch.zeros(4, dtype=torch.int32)], [ok_x, x]), TypeError, r"ema_tensors\[1\]"),
        (([ok_e, e.half()], [ok_x, x]), TypeError, "pair 1"),
        (([ok_e, e], [ok_x, x.to("meta")]), ValueError, "pair 1"),
        (([ok_e, e], [ok_x, "x"]), TypeError, r"tensors\[1\]"),
        ((ok_e, ok_x), TypeError, "list or tuple"),
    ]


@pytest.mark.parametrize("backend", ["eager", "triton", "auto"])
def test_bad_input_names_the_pair_and_writes_nothing(backend):
    e, x = torch.zeros(4), torch.ones(4)
    for (emas, xs), exc, msg in _bad_calls(e, x):
        before = [t.clone() for t in emas] if isinstance(emas, list) else None
        with pytest.raises(exc, match=msg):
            ema_update_(emas, xs, 0.5, backend=backend)
        if before is not None:
            assert all(torch.equal(t, b) for t, b in zip(emas, before)), "nothing may be half-updated"


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan"), float("inf")])
def test_decay_outside_unit_interval(decay):
    e = torch.zeros(3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_([e], [torch.ones(3)], decay)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_([e], [torch.ones(3)], torch.tensor(decay))
    assert e.eq(0).all()


def test_bad_decay_types():
    e, x = torch.zeros(3), torch.ones(3)
    for decay, exc in ((True, TypeError), ("0.9", TypeError), (torch.tensor([0.9]), TypeError),
                       (torch.tensor(1), TypeError)):
        with pytest.raises(exc, match="decay"):
            ema_update_([e], [x], decay)


def test_non_contiguous_for_an_explicit_kernel_backend_is_refused_eager_takes_it(triton_device):
    e = torch.zeros(6, 4, device=triton_device).t()
    x = torch.ones(6, 4, device=triton_device).t()
    with pytest.raises(ValueError, match="not contiguous"):
        ema_update_([torch.zeros(3, device=triton_device), e], [torch.ones(3, device=triton_device), x], 0.5,
                    backend="triton")
    ema_update_([e], [x], 0.5, backend="auto")  # auto falls back to eager, which handles strides
    assert e.eq(0.5).all()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ema_update_([torch.zeros(1)], [torch.ones(1)], 0.5, backend="fast")


# -------------------------------------------------------------------------------- the module
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(7, 5)
        self.norm = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3, bias=False)
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def _train_steps(model, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    device = next(model.parameters()).device
    for _ in range(steps):
        model(torch.randn(8, 7, generator=g).to(device)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        model.counter += 1
        yield


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_module_matches_a_plain_per_parameter_loop(schedule):
    torch.manual_seed(0)
    model = _Net()
    ema = EMA(model, decay=0.9, schedule=schedule, ramp_steps=4, backend="eager")
    plain = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    decays = [0.9] * 6 if schedule == "constant" else [0.996 + 0.004 * min(k, 4) / 4 for k in range(6)]
    for k, _ in enumerate(_train_steps(model, 6)):
        assert ema.decay == pytest.approx(decays[k])
        ema.update(model)
        for n, p in model.named_parameters():
            plain[n] = decays[k] * plain[n] + (1 - decays[k]) * p.detach().double()
    for n, p in ema.module.named_parameters():
        assert p.dtype == torch.float32 and not p.requires_grad
        torch.testing.assert_close(p.double(), plain[n], atol=1e-6, rtol=0)
    # buffers are copied by default
    assert int(ema.module.counter) == 6
    torch.testing.assert_close(ema.module.norm.running_mean, model.norm.running_mean)
    assert int(ema.num_updates) == 6


def test_module_triton_backend_equals_eager(triton_device):
    torch.manual_seed(1)
    model = _Net().to(triton_device)
    fast = EMA(model, decay=0.8, backend="triton")
    slow = EMA(model, decay=0.8, backend="eager")
    for _ in _train_steps(model, 3):
        fast.update(model)
        slow.update(model)
    for (n, a), (_, b) in zip(fast.module.named_parameters(), slow.module.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


def test_module_params_are_views_of_one_flat_float32_buffer():
    model = _Net().to(torch.bfloat16)
    ema = EMA(model)
    assert ema.flat.dtype == torch.float32
    assert ema.flat.numel() == sum(p.numel() for p in model.parameters())
    base = ema.flat.untyped_storage().data_ptr()
    for p in ema.module.parameters():
        assert p.untyped_storage().data_ptr() == base
    # after a dtype/device move the views still point into the (moved) flat buffer
    ema = ema.to(torch.float64)
    assert ema.flat.dtype == torch.float32
    assert all(p.untyped_storage().data_ptr() == ema.flat.untyped_storage().data_ptr()
               for p in ema.module.parameters())
    ema.update(model)  # still works after the move


def test_module_average_buffers_option():
    torch.manual_seed(2)
    model = _Net()
    ema = EMA(model, decay=0.75, average_buffers=True)  # not 0.5: a swap of the weights must show
    want = ema.module.norm.running_var.double().clone()
    for _ in _train_steps(model, 2):
        ema.update(model)
        want = 0.75 * want + 0.25 * model.norm.running_var.double()
    assert (ema.module.norm.running_var.double() - model.norm.running_var.double()).abs().max() > 1e-3
    torch.testing.assert_close(ema.module.norm.running_var.double(), want, rtol=1e-6, atol=1e-7)
    assert int(ema.module.counter) == 2  # integer buffers are copied


def test_module_is_frozen_and_usable_as_target_encoder():
    model = _Net()
    ema = EMA(model)
    ema.train()
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    out = ema(torch.randn(4, 7))
    assert out.shape == (4, 3) and not out.requires_grad


def test_copy_from_and_state_dict_round_trip():
    torch.manual_seed(3)
    model = _Net()
    ema = EMA(model, decay=0.7)
    for _ in _train_steps(model, 2):
        ema.update(model)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    other = EMA(_Net(), decay=0.7)
    other.load_state_dict(state)
    for (n, a), (_, b) in zip(ema.module.named_parameters(), other.module.named_parameters()):
        assert torch.equal(a, b), n
    assert int(other.num_updates) == 2
    # loaded values live in the flat buffer, so the next update continues from them
    for _ in _train_steps(model, 1, seed=5):
        ema.update(model)
        other.update(model)
    assert torch.equal(ema.flat, other.flat)
    other.copy_from(model)
    for (n, a), (_, b) in zip(other.module.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b.detach()), n
    assert int(other.num_updates) == 0


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        EMA(_Net(), decay=1.5)
    with pytest.raises(ValueError, match="schedule"):
        EMA(_Net(), schedule="cosine")
    with pytest.raises(ValueError, match="steps"):
        linear_ramp(steps=0)
    with pytest.raises(ValueError, match="decay"):
        constant(-1)
    ema = EMA(_Net())
    with pytest.raises(ValueError, match="no parameter"):
        ema.update(nn.Linear(7, 5))


def test_update_moves_the_version_of_the_ema_parameters():
    """Caches keyed on (data_ptr, _version) — the sampler's CUDA graphs, packed weights — must
    see an EMA update of the weights they captured."""
    model = _Net()
    ema = EMA(model, decay=0.5)
    before = [p._version for p in ema.module.parameters()]
    ema.update(model)
    assert all(p._version > v for p, v in zip(ema.module.parameters(), before))


def test_overlapping_ema_and_source_storage_is_refused():
    """An EMA tensor sharing memory with any tensor of the call would read values the update
    already wrote (ema_update_([t], [t], 0.5) gave 0.75 t instead of t): refused, nothing written."""
    gen = torch.Generator().manual_seed(17)
    buf = torch.randn(32, generator=gen)
    other = torch.randn(8, generator=gen)
    cases = {
        "the same tensor on both sides": ([buf], [buf]),
        "overlapping views": ([buf[:10]], [buf[6:16]]),
        "a reshaped view": ([buf.view(4, 8)], [buf.view(8, 4).t()]),
        "an EMA tensor twice": ([buf[:8], buf[:8]], [other, other]),
        "across pairs": ([buf[:8], other], [other, buf[:8]]),
        "strided views that meet": ([buf[0:16:2]], [buf[4:12]]),
    }
    for what, (es, xs) in cases.items():
        before = buf.clone(), other.clone()
        with pytest.raises(ValueError, match="share memory"):
            ema_update_(es, xs, 0.5, backend="eager")
        assert torch.equal(buf, before[0]) and torch.equal(other, before[1]), what
    # disjoint slices of one buffer (as nn.EMA's flat buffer), interleaved strided views, and
    # sources that overlap each other are fine
    a, b = buf[:16], buf[16:]
    ema_update_([a, b], [other.repeat(2), other.repeat(2)], 0.5, backend="eager")
    evens, odds = buf[0::2].clone(), buf[1::2].clone()
    ema_update_([buf[0::2]], [buf[1::2]], 0.5, backend="eager")
    assert torch.allclose(buf[0::2], 0.5 * evens + 0.5 * odds) and torch.equal(buf[1::2], odds)
    src = torch.randn(16, generator=gen)
    e1, e2 = torch.zeros(16), torch.zeros(16)
    ema_update_([e1, e2], [src, src[:16]], 0.25, backend="eager")
    assert torch.allclose(e1, 0.75 * src) and torch.allclose(e2, 0.75 * src)


@pytest.mark.parametrize("ema_dtype,x_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                               (torch.float16, torch.float16)])
def test_triton_aligned_fast_path_and_element_tails(triton_device, ema_dtype, x_dtype):
    """One launch over tensors taking the 16-byte path (aligned, numel a multiple of the
    vector) and tensors taking the element path: views at odd element offsets of one flat
    buffer (as djepa.nn.EMA holds them), counts that are no multiple of the vector, a last
    partial block; memory around the views is left alone."""
    g = torch.Generator().manual_seed(11)
    sizes = [4096 * 2 + 8, 4099, 7, 16, 4096 + 5, 8]
    offsets = [0, 8200, 12301, 12309, 12333, 16440]  # 16-byte aligned: 0, 8200, 16440 (fp32)
    flat = torch.randn(offsets[-1] + sizes[-1] + 3, generator=g).to(triton_device, ema_dtype)
    emas = [flat[o:o + n] for o, n in zip(offsets, sizes)]
    xs = [torch.randn(n, generator=g).to(triton_device, x_dtype) for n in sizes]
    xs[2] = torch.randn(9, generator=g).to(triton_device, x_dtype)[1:8]  # an unaligned source
    vec = 16 // min(flat.element_size(), xs[0].element_size())
    fast_path = [e.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0 and e.numel() % vec == 0
                 for e, x in zip(emas, xs)]
    assert any(fast_path) and not all(fast_path)
    untouched = torch.ones(flat.numel(), dtype=torch.bool, device=triton_device)
    for o, n in zip(offsets, sizes):
        untouched[o:o + n] = False
    flat_before = flat.clone()
    ref = ema_update_reference(emas, xs, 0.9)
    low = [e.clone() for e in emas]
    ema_update_(low, xs, 0.9, backend="eager")
    ema_update_(emas, xs, 0.9, backend="triton")
    for i, (f, lo, r) in enumerate(zip(emas, low, ref)):
        assert_close_to_reference(f, lo, r, atol=ATOL[f.dtype], what=f"triton pair {i} (fast path {fast_path[i]})")
    assert torch.equal(flat[untouched], flat_before[untouched])


def _fake_ema_c(monkeypatch, *tensors):
    """tests/fake_c.FakeC behind the op, knowing `tensors`' buffers, with a fake device guard:
    (fake, state) where state["current"] is the device the guard made current."""
    import contextlib

    from fake_c import Buffers, FakeC

    from djepa.ops import _dispatch

    state = {"current": None}

    @contextlib.contextmanager
    def guard(device):
        prev, state["current"] = state["current"], device
        try:
            yield
        finally:
            state["current"] = prev

    ext = FakeC(Buffers().add(*tensors), current=lambda: state["current"])
    monkeypatch.setattr(backends, "cuda_extension", lambda: ext)
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda op, device: None)
    monkeypatch.setattr(_dispatch, "on_device", guard)
    monkeypatch.setattr(_dispatch, "stream_handle", lambda device: ("stream of", device))
    return ext, state


def test_cuda_path_launches_under_the_tensors_device_on_its_stream(monkeypatch):
    """With a stand-in for djepa._C on the CPU: every launch happens under the tensors' device
    (the fake guard records it), gets that device's stream, and hands C++ each pair's element
    counts and dtypes, whose bytes the buffers hold exactly."""
    emas, xs = _pairs([3, 5], torch.float32, torch.bfloat16, "cpu", 0)
    emas += [e.to(torch.bfloat16) for e in emas]
    xs += [x.clone() for x in xs]
    ext, state = _fake_ema_c(monkeypatch, *emas, *xs)
    ema_update_(emas, xs, 0.9, backend="cuda")
    assert len(ext.calls) == 2  # one launch per dtype pair
    assert all(c.current == xs[0].device and c.stream == ("stream of", xs[0].device) for c in ext.calls)
    assert state["current"] is None
    for c, (es, ds) in zip(ext.calls, [(emas[:2], xs[:2]), (emas[2:], xs[2:])]):
        assert c.arg["numels"] == [3, 5]
        assert (c.arg["ema_dtype"], c.arg["x_dtype"]) == (_dispatch_code(es[0].dtype), _dispatch_code(ds[0].dtype))
        assert (c.arg["decay"], c.arg["one_minus_decay"], c.arg["decay_ptr"]) == (0.9, 1.0 - 0.9, 0)
        for i, (e, x) in enumerate(zip(es, ds)):
            assert c.arg["ema_ptrs"][i] == e.data_ptr() and c.arg["x_ptrs"][i] == x.data_ptr()
            assert c.sizes[f"ema_ptrs[{i}]"] == c.needs[f"ema_ptrs[{i}]"] == e.numel() * e.element_size()
            assert c.sizes[f"x_ptrs[{i}]"] == c.needs[f"x_ptrs[{i}]"] == x.numel() * x.element_size()


def _dispatch_code(dtype):
    from djepa.ops import _dispatch

    return _dispatch.dtype_code(dtype)


def test_cuda_path_skips_empty_pairs_and_passes_views_by_their_own_extent(monkeypatch):
    """Views into one flat buffer: each pointer is the view's first element and its count the
    view's numel (never the rest of the buffer); empty pairs are not handed over at all."""
    flat_e, flat_x = torch.zeros(40), torch.ones(40)
    emas = [flat_e[0:7], flat_e[7:7], flat_e[10:30]]
    xs = [flat_x[5:12], flat_x[0:0], flat_x[20:40]]
    ext, _ = _fake_ema_c(monkeypatch, flat_e, flat_x, *emas, *xs)
    ema_update_(emas, xs, torch.tensor(0.5), backend="cuda")
    call, = ext.calls
    assert call.arg["numels"] == [7, 20]
    assert call.arg["ema_ptrs"] == [emas[0].data_ptr(), emas[2].data_ptr()]
    assert call.arg["x_ptrs"] == [xs[0].data_ptr(), xs[2].data_ptr()]
    assert call.needs == {"ema_ptrs[0]": 28, "x_ptrs[0]": 28, "ema_ptrs[1]": 80, "x_ptrs[1]": 80}
    assert call.sizes == {"ema_ptrs[0]": 160, "x_ptrs[0]": 140, "ema_ptrs[1]": 120, "x_ptrs[1]": 80}
    assert (call.arg["decay"], call.arg["one_minus_decay"]) == (0.5, 0.5)  # a CPU decay is read on the host


@pytest.mark.parametrize("schedule", ["constant", "linear", "official"])
def test_ema_update_compiles_without_graph_breaks_or_recompiles(schedule):
    """EMA.update under fullgraph=True: the scheduled decay comes from the update count on the
    device (no .item()), the graph compiles once for every step, and the weights follow the
    eager updates."""
    import copy

    from djepa.models.ema_schedule import official_ema_schedule
    from djepa.nn import EMA

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    sched = official_ema_schedule(0.9, 5) if schedule == "official" else schedule
    ema = EMA(model, decay=0.9, schedule=sched, ramp_steps=3, backend="eager")
    ref = copy.deepcopy(ema)
    graphs = {"n": 0}

    def count(gm, example_inputs):
        graphs["n"] += 1
        return gm.forward

    step = torch.compile(lambda: ema.update(model), backend=count, fullgraph=True)
    for _ in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        step()
        ref.update(model)
    assert graphs["n"] == 1 and int(ema.num_updates) == 7
    for a, b in zip(ema.module.parameters(), ref.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
