"""tools/static_check.py: the gate's rules on synthetic records, its parsers, and one run of its
default subset (compiles for sm_90 without a GPU: Triton's ptxas, nvcc for csrc/ema.cu)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "static_check.py"
sys.path.insert(0, str(ROOT / "tools"))

import sass  # noqa: E402  (tools/: the gate's modules)
import static_cuda  # noqa: E402
import static_report  # noqa: E402
import static_rules  # noqa: E402


def _rec(**kw):
    base = dict(backend="triton", kernel="ln_mod_bwd_kernel", variant="bf16 w8", arch=90, hot=True)
    base.update(kw)
    extra = {k: base.pop(k) for k in list(base) if k not in
             ("backend", "kernel", "variant", "arch", "regs", "spill_bytes", "stack_bytes", "smem_bytes",
              "wgmma", "mma_sync", "hot")}
    return static_rules.record(base.pop("backend"), base.pop("kernel"), base.pop("variant"), base.pop("arch"), **base, **extra)


# ------------------------------------------------------------------------------ the rules
def test_a_clean_record_passes():
    assert static_rules.violations(_rec(regs=96)) == []


def test_a_spilling_hot_variant_fails():
    assert any("spills" in v for v in static_rules.violations(_rec(spill_bytes=8)))
    assert any("stack" in v for v in static_rules.violations(_rec(stack_bytes=16)))


def test_spills_outside_the_hot_set_are_reported_not_failed():
    assert static_rules.violations(_rec(spill_bytes=4096, stack_bytes=4096, hot=False)) == []


def test_shared_memory_over_the_limit_fails_hot_or_not():
    assert static_rules.violations(_rec(smem_bytes=232448)) == []
    for hot in (True, False):
        assert any("shared memory" in v for v in static_rules.violations(_rec(smem_bytes=262144, hot=hot)))
    # sm_80 has less: 163 KiB
    assert any("shared memory" in v for v in static_rules.violations(_rec(arch=80, smem_bytes=166913)))
    assert static_rules.violations(_rec(arch=80, smem_bytes=166912)) == []


def test_a_matmul_kernel_without_wgmma_fails_on_sm90_only():
    mm = dict(kernel="_fwd_kernel", dtype="bfloat16", mma_sync=24)
    assert any("wgmma" in v for v in static_rules.violations(_rec(**mm)))
    assert static_rules.violations(_rec(**mm, wgmma=12)) == []
    assert static_rules.violations(_rec(**mm, arch=80)) == []
    assert static_rules.violations(_rec(**{**mm, "dtype": "float32"})) == []  # IEEE fp32 has no tensor-core path
    assert static_rules.violations(_rec(**{**mm, "backend": "cuda"})) == []   # CUDA's Hopper kernels: issue 12


def test_the_ema_without_16_byte_accesses_fails():
    ema = dict(kernel="_ema_kernel", dtype="float32")
    assert any("16-byte" in v for v in static_rules.violations(_rec(**ema, vector_ldst=dict(ld128=0, st128=0))))
    assert any("16-byte" in v for v in static_rules.violations(_rec(**ema, vector_ldst=dict(ld128=4, st128=0))))
    assert static_rules.violations(_rec(**ema, vector_ldst=dict(ld128=4, st128=2))) == []


def test_a_kernel_whose_wgmma_ptxas_serialized_fails_hot_or_not():
    msg = ("(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma "
           "instructions defining accumulator registers of a wgmma between start and end of the pipeline stage "
           "in the function 'k'")
    for backend, kernel in (("cuda", "attn_fwd_sm90_kernel"), ("triton", "_fwd_kernel")):
        for hot in (True, False):
            got = static_rules.violations(_rec(backend=backend, kernel=kernel, wgmma=8, hot=hot,
                                               wgmma_serialized=[msg]))
            assert len(got) == 1 and "serialized" in got[0] and "C7515" in got[0]
    assert static_rules.violations(_rec(backend="cuda", kernel="attn_fwd_sm90_kernel", wgmma=8,
                                        wgmma_serialized=[])) == []


def test_a_variant_that_does_not_compile_fails():
    assert static_rules.violations(_rec(error="ptxas failed")) == ["does not compile: ptxas failed"]


def test_records_carry_the_issue_fields():
    r = _rec(regs=1, spill_bytes=2, stack_bytes=3, smem_bytes=4, wgmma=5, mma_sync=6)
    assert set(r) >= {"backend", "kernel", "variant", "arch", "regs", "spill_bytes", "stack_bytes", "smem_bytes",
                      "smem_limit", "tensor_core", "hot"}
    assert r["arch"] == "sm_90" and r["smem_limit"] == 232448 and r["tensor_core"] == {"wgmma": 5, "mma_sync": 6}


def test_merge_replaces_only_the_backend_that_ran():
    old = [_rec(backend="cuda", kernel="ema_kernel", variant="<float, float>", regs=40),
           _rec(kernel="ln_mod_bwd_kernel", variant="a", regs=1), _rec(kernel="gemm_kernel", variant="b", regs=2)]
    new = [_rec(backend="cuda", kernel="gemm_kernel", variant="<__half>", regs=99)]
    got = static_report.merge(old, new, {"cuda"})
    assert [(r["backend"], r["kernel"], r["regs"]) for r in got] == [
        ("cuda", "gemm_kernel", 99), ("triton", "gemm_kernel", 2), ("triton", "ln_mod_bwd_kernel", 1)]
    # a Triton refresh of one kernel keeps the other kernels' records
    got = static_report.merge(old, [_rec(kernel="gemm_kernel", variant="c", regs=3)], {"triton"}, "gemm")
    assert [(r["kernel"], r["variant"]) for r in got if r["backend"] == "triton"] == [
        ("gemm_kernel", "c"), ("ln_mod_bwd_kernel", "a")]
    assert any(r["backend"] == "cuda" for r in got)
    with pytest.raises(ValueError, match="archs"):
        static_report.merge(old, [_rec(arch=80)], {"triton"})


def test_merge_of_one_op_replaces_its_records_of_both_backends_and_keeps_the_rest():
    """--only attention --merge: the attention records (CUDA by file, Triton by module; records
    written before the `op` field by their file / kernel name) are replaced, the others kept."""
    old = [_rec(backend="cuda", kernel="fwd_kernel", variant="<__half, 64>", file="csrc/attention.cu"),
           _rec(backend="cuda", kernel="attn_fwd_sm90_kernel", variant="<__half, 64>", file="csrc/attention_sm90.cu"),
           _rec(backend="cuda", kernel="gemm_kernel", variant="<__half>", file="csrc/denoise.cu"),
           _rec(kernel="_fwd_kernel", variant="old"), _rec(kernel="gemm_kernel", variant="keep")]
    new = [_rec(backend="cuda", kernel="fwd_kernel", variant="<__half, 64, 1> dropout", file="csrc/attention.cu",
                op="attention"),
           _rec(kernel="_fwd_kernel", variant="DROPOUT=1", op="attention")]
    ops = {"_fwd_kernel": "attention", "gemm_kernel": "denoise"}
    got = static_report.merge(old, new, {"cuda", "triton"}, op="attention", triton_ops=ops)
    assert [(r["backend"], r["kernel"], r["variant"]) for r in got] == [
        ("cuda", "fwd_kernel", "<__half, 64, 1> dropout"), ("cuda", "gemm_kernel", "<__half>"),
        ("triton", "_fwd_kernel", "DROPOUT=1"), ("triton", "gemm_kernel", "keep")]
    # triton:attention keeps the CUDA attention records
    got = static_report.merge(old, new[1:], {"triton"}, op="attention", triton_ops=ops)
    assert sum(r["backend"] == "cuda" for r in got) == 3 and ("triton", "_fwd_kernel", "old") not in [
        (r["backend"], r["kernel"], r["variant"]) for r in got]
    assert static_report.cuda_file_op("csrc/attention_sm90.cu") == static_report.cuda_file_op("attention.cu") == \
        "attention"


def test_only_names_a_backend_an_op_or_both():
    sys.path.insert(0, str(ROOT / "tools"))
    import static_check

    assert static_check.parse_only(None) == ({"triton", "cuda"}, None)
    assert static_check.parse_only("cuda") == ({"cuda"}, None)
    assert static_check.parse_only("attention") == ({"triton", "cuda"}, "attention")
    assert static_check.parse_only("triton:attention") == ({"triton"}, "attention")
    assert set(static_check.OPS) >= {"attention", "denoise", "ema"}
    for bad in ("gpu", "triton:softmax", ":"):
        with pytest.raises(ValueError, match="--only"):
            static_check.parse_only(bad)
    res = subprocess.run([sys.executable, str(TOOL), "--only", "triton:softmax"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown op" in res.stderr
    res = subprocess.run([sys.executable, str(TOOL), "--scenario", "dropout", "--merge"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "--scenario cannot go with --merge" in res.stderr


def test_markdown_names_each_backends_toolchain():
    recs = [dict(_rec(backend="cuda", kernel="ema_kernel"), toolchain="nvcc 13.0", date="2026-12-01"),
            dict(_rec(), toolchain="triton 3.9.0", date="2026-12-02")]
    head = static_report.markdown(recs, 90, 1.0, True).splitlines()[2]
    assert "nvcc 13.0 on 2026-12-01 (1 records)" in head and "triton 3.9.0 on 2026-12-02 (1 records)" in head


# ------------------------------------------------------------------------------ the parsers
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN5djepa7denoise16adaln_fwd_kernelI6__halfLi8ELi4EEEvPKT_' for 'sm_90a'
ptxas info    : Function properties for _ZN5djepa7denoise16adaln_fwd_kernelI6__halfLi8ELi4EEEvPKT_
    8 bytes stack frame, 8 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 8 bytes cumulative stack size, 1024 bytes smem
ptxas-blackwell info    : Compiling entry function 'gemm_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for gemm_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 168 registers, used 1 barriers
"""

SASS = """\
\tcode for sm_90a
\t\tFunction : gemm_kernel
        /*0a30*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;   /* 0x00e0 */
        /*0a40*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0a50*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0a60*/                   STG.E.128 desc[UR6][R2.64], R8 ;
\t\tFunction : _ZN5djepa9attention10fwd_kernelI6__halfLi64EEEvNS0_6ParamsE
        /*0100*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0110*/                   LDG.E R4, desc[UR6][R2.64] ;
"""


def test_parse_ptxas():
    got = sass.parse_ptxas(PTXAS_LOG)
    fwd = got["_ZN5djepa7denoise16adaln_fwd_kernelI6__halfLi8ELi4EEEvPKT_"]
    assert fwd == dict(regs=64, spill_bytes=40, stack_bytes=8, static_smem=1024)
    assert got["gemm_kernel"] == dict(regs=168, spill_bytes=0, stack_bytes=0, static_smem=0)


def test_parse_wgmma_serialized_names_the_kernel():
    log = PTXAS_LOG + (
        "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "insufficient register resources for the wgmma pipeline in the function 'gemm_kernel'\n"
        "ptxas info    : Compiling entry function 'attn' for 'sm_90a'\n"
        "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized\n")
    got = sass.parse_wgmma_serialized(log)
    assert set(got) == {"gemm_kernel", "attn"}
    assert got["gemm_kernel"][0].startswith("(C7511)") and "insufficient register" in got["gemm_kernel"][0]
    assert got["attn"] == ["(C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized"]
    assert sass.parse_wgmma_serialized(PTXAS_LOG) == {}


def test_parse_sass():
    got = sass.parse_sass(SASS)
    assert got["gemm_kernel"] == dict(wgmma=2, mma_sync=0, ld128=1, st128=1)
    assert got["_ZN5djepa9attention10fwd_kernelI6__halfLi64EEEvNS0_6ParamsE"] == dict(
        wgmma=0, mma_sync=1, ld128=0, st128=0)


def test_split_template():
    assert sass.split_template("void djepa::attention::fwd_kernel<__nv_bfloat16, 128>(djepa::attention::Params)") == \
        ("djepa::attention::fwd_kernel", ["__nv_bfloat16", "128"])
    assert sass.split_template("void djepa::(anonymous namespace)::ema_kernel<float, __half>("
                             "djepa::(anonymous namespace)::EmaTable, float const*, float, float)") == \
        ("djepa::ema_kernel", ["float", "__half"])


def test_cuda_hot_follows_the_host_dispatch():
    dims, widths = {64, 80, 128}, {128, 1024, 1280, 1536}
    hot = lambda name, *args: static_cuda.cuda_hot(name, list(args), dims, widths)  # noqa: E731
    assert hot("djepa::attention::fwd_kernel", "__nv_bfloat16", "80")
    assert not hot("djepa::attention::fwd_kernel", "__nv_bfloat16", "96")
    # W = 1024 / 1280 / 1536 in 16-bit: 4, 5 -> 6, 6 chunks of 32 lanes x 8 elements
    assert hot("djepa::denoise::adaln_fwd_kernel", "__half", "8", "4")
    assert hot("djepa::denoise::adaln_fwd_kernel", "__half", "8", "6")
    assert not hot("djepa::denoise::adaln_fwd_kernel", "__half", "8", "8")
    assert not hot("djepa::denoise::adaln_fwd_kernel", "__half", "1", "8")  # the scalar fallback
    assert not hot("djepa::denoise::adaln_fwd_kernel", "float", "4", "4")
    assert hot("djepa::denoise::gemm_kernel", "__nv_bfloat16", "false", "true")


def test_cuda_attention_records_name_their_dropout_argument():
    """fwd_kernel<T, D, FwdDropout>, dkdv/dq_kernel<T, D, bool>: the variant says dropout (and the
    debug keep-bit store, never hot); a value the header does not define fails loudly."""
    dims, widths = {64, 80}, set()
    name = "djepa::attention::fwd_kernel"
    assert static_cuda.cuda_variant(name, ["__half", "64", "0"]) == "<__half, 64, 0>"
    assert static_cuda.cuda_variant(name, ["__half", "64", "1"]) == "<__half, 64, 1> dropout"
    assert static_cuda.cuda_variant(name, ["__half", "64", "2"]) == "<__half, 64, 2> dropout keep-bits (debug)"
    assert static_cuda.cuda_variant("djepa::attention::dq_kernel", ["__half", "80", "true"]) == "<__half, 80, true> dropout"
    assert static_cuda.cuda_dropout("djepa::attention::dkdv_kernel", ["__half", "80", "false"]) == "off"
    assert static_cuda.cuda_dropout("djepa::hopper::attn::attn_fwd_sm90_kernel", ["__half", "64"]) is None
    assert static_cuda.cuda_hot(name, ["__nv_bfloat16", "64", "1"], dims, widths)
    assert not static_cuda.cuda_hot(name, ["__nv_bfloat16", "64", "2"], dims, widths)
    with pytest.raises(ValueError, match="FwdDropout"):
        static_cuda.cuda_variant(name, ["__half", "64", "7"])


def test_cli_rejects_a_bad_arch():
    res = subprocess.run([sys.executable, str(TOOL), "--arch", "70"], capture_output=True, text=True)
    assert res.returncode == 2 and "--arch" in res.stderr


# ------------------------------------------------------------------------------ the subset
def _nvcc_available():
    return sass.find_tool("nvcc") is not None


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """One run of the default subset for sm_90 (what CI gates on)."""
    if not _nvcc_available():
        pytest.skip("nvcc not found: the CUDA half of the gate needs it")
    out = tmp_path_factory.mktemp("static") / "sm_90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(TOOL), "--arch", "90", "--json", str(out), "--jobs", "2"],
                         capture_output=True, text=True, env=env, timeout=1500)
    records = json.loads(out.read_text()) if out.is_file() else []
    return res, records, out


def test_subset_passes_the_gate(subset):
    res, records, out = subset
    assert res.returncode == 0, res.stderr[-4000:]
    assert out.with_suffix(".md").is_file()
    assert {r["backend"] for r in records} == {"triton", "cuda"}
    assert all(r["arch"] == "sm_90" for r in records)


def _triton(records, kernel, source=None):
    got = [r for r in records if r["backend"] == "triton" and r["kernel"] == kernel
           and (source is None or any(source in s for s in r["sources"]))]
    assert got, f"the subset has no {kernel} variant from {source!r}"
    return got


@pytest.mark.parametrize("preset", ["B", "L", "H"])
def test_ln_mod_bwd_does_not_spill_at_the_preset_widths(subset, preset):
    """W = 1024 / 1280 / 1536: the backward spilled 1.5-26 KB/thread before its rows and warps
    followed W."""
    for r in _triton(subset[1], "ln_mod_bwd_kernel", f"preset {preset} adaln_block train bfloat16"):
        assert r["hot"] and r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r


@pytest.mark.parametrize("D", [64, 80, 128])
def test_fp32_attention_does_not_spill(subset, D):
    """fp32 is what backend='auto' sends to Triton (IEEE dots): not hot, but must not spill
    (1.6 KB/thread at D=64, 17-34 KB at D >= 80 on the 16-bit tiles)."""
    for kernel in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        for r in _triton(subset[1], kernel, f"coverage attention D={D} dense float32"):
            assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r


def test_fp32_masked_forward_does_not_spill_at_D128(subset):
    """The masked forward holds the key index beside the tiles: 2 KB/thread on 64 x 32."""
    for r in _triton(subset[1], "_fwd_kernel", "coverage attention D=128 masked float32"):
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r


def test_the_hot_dropout_forward_is_captured_and_does_not_spill(subset):
    """Training at the presets' attn_dropout=0.1 runs the dropout variants (Philox rounds in the
    loop): the subset compiles preset B's masked forward with dropout (D = 64, bf16), which
    spilled 200-224 B/thread on 4 warps. Missing (no dropout scenario, or the capture lost the
    dropout arguments) or spilling fails here; the full table holds the rest (every hot shape)."""
    recs = _triton(subset[1], "_fwd_kernel", "preset B attention masked dropout=0.1 bfloat16")
    for r in recs:
        assert r["constexprs"]["DROPOUT"] == 1 and r["constexprs"]["WRITE_KEEP"] == 0, r
        assert r["hot"] and r["op"] == "attention", r
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0 and r["tensor_core"]["wgmma"] > 0, r


def test_the_hot_dropout_backward_keeps_its_wgmma_asynchronous(subset):
    """Preset B's masked dropout backward (bf16, D = 64): with a zero-trip path around the key
    loop, ptxas serialized every wgmma of _bwd_dq_kernel and _bwd_dkdv_kernel (C7515, all 36 hot
    dropout backward variants); the loops now always make one pass."""
    for kernel in ("_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        for r in _triton(subset[1], kernel, "preset B attention masked dropout=0.1 bfloat16"):
            assert r["constexprs"]["DROPOUT"] == 1 and r["hot"], r
            assert r["wgmma_serialized"] == [] and r["tensor_core"]["wgmma"] > 0, r
            assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r


def test_every_hot_attention_shape_has_its_dropout_scenario():
    """The capture's scenario list (no compiling): each preset with attention dropout trains its
    encoder (masked) and predictor (dense) with it, in fp16 and bf16, and the benchmark's dropout
    mode runs at its shapes; the coverage sweep runs dropout (and the keep-bit store) at every head dim."""
    import static_shapes
    import static_triton
    from djepa.models.presets import PRESETS

    names = {s.source for s in static_triton.scenarios(True)}
    dropout_presets = [n for n, c in PRESETS.items() if c.attn_dropout > 0]
    assert {"B", "L", "H"} <= set(dropout_presets)
    for n in dropout_presets:
        p = PRESETS[n].attn_dropout
        for kind in ("dense", "masked"):
            for dt in ("bfloat16", "float16"):
                assert f"preset {n} attention {kind} dropout={p:g} {dt}" in names
    shapes, p = static_shapes.bench_attention_dropout()
    assert set(shapes) == {"djepa-B", "djepa-L", "djepa-H"} and p == 0.1
    for sid in shapes:
        assert f"bench attention {sid} masked dropout=0.1 bfloat16" in names
    for D in static_triton.COVERAGE_HEAD_DIMS:
        assert f"coverage attention D={D} masked dropout=0.5 float16" in names
        assert f"coverage attention D={D} dense dropout=0.1 keep-bits float32" in names
    subset = [s.source for s in static_triton.scenarios(False)]
    assert "preset B attention masked dropout=0.1 bfloat16" in subset


@pytest.mark.parametrize("D", [192, 256])
def test_head_dims_over_128_fit_shared_memory(subset, D):
    """The unmasked forward at head dims 129-256 needed 262144 B (> 232448) on one config."""
    for r in _triton(subset[1], "_fwd_kernel", f"coverage attention D={D} dense float16"):
        assert 0 < r["smem_bytes"] <= r["smem_limit"], r


def test_head_dim_80_is_not_padded_to_128(subset):
    for kernel in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        for r in _triton(subset[1], kernel, "preset H attention"):
            c = r["constexprs"]
            assert c["BLOCK_D"] + c.get("BLOCK_D2", 0) == 80, r
            assert r["tensor_core"]["wgmma"] > 0, r


def test_gemm_epilogues_do_not_spill_in_any_config(subset):
    recs = _triton(subset[1], "gemm_kernel", "preset B")
    assert {r["constexprs"]["EPILOGUE"] for r in recs} == {2, 3}
    for r in recs:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r


def test_the_128x256_gemm_tile_is_gone(subset):
    """128 x 256 (128 accumulator elements per thread at 8 warps) spilled with the epilogues 2
    and 3: no epilogue may autotune over a tile that large."""
    recs = _triton(subset[1], "gemm_kernel", "preset B")
    assert len(recs) >= 4
    for r in recs:
        c = r["constexprs"]
        per_thread = c["BLOCK_M"] * c["BLOCK_N"] // (32 * r["num_warps"])
        assert c["BLOCK_M"] * c["BLOCK_N"] < 128 * 256 and per_thread <= 64, r


def test_ema_moves_16_bytes_per_access(subset):
    for r in _triton(subset[1], "_ema_kernel", "preset B"):
        assert r["vector_ldst"]["ld128"] > 0 and r["vector_ldst"]["st128"] > 0, r


def test_the_cfg_update_reads_its_scale_through_a_pointer(subset):
    """denoise_update_kernel loads the CFG scale on the device (a CUDA graph serves every
    scale): captured with a float32 tensor, as the op passes it (a Python float did not
    compile on Triton 3.6)."""
    recs = _triton(subset[1], "denoise_update_kernel", "preset B denoise_step cfg=1 bfloat16")
    assert {r["constexprs"]["CFG"] for r in recs} == {1}
    for r in recs:
        assert not r.get("error") and r["variant"].startswith("fp32/bf16"), r


def test_cuda_ema_is_in_the_subset(subset):
    recs = [r for r in subset[1] if r["backend"] == "cuda"]
    assert {r["kernel"] for r in recs} == {"ema_kernel"} and len(recs) == 5
    assert all(r["regs"] > 0 for r in recs)
