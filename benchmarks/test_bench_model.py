"""D-JEPA model throughput on the GPU: training step and sampling, backend="eager" vs "auto".

One run times both backends per preset and phase (pytest-benchmark group), and records
images/s and the auto/eager speed-up in `extra_info`. Targets on an H100 (bf16 autocast):
>= 1.3x training throughput and >= 2x sampling throughput from the kernels.

    pytest benchmarks/test_bench_model.py --benchmark-json=benchmarks/results/<date>_<gpu>_model.json

Environment knobs: DJEPA_BENCH_PRESETS (default "B,L,H"), DJEPA_BENCH_TRAIN_BATCH (64),
DJEPA_BENCH_SAMPLE_BATCH (64), DJEPA_BENCH_NUM_ITER (64 sampler iterations),
DJEPA_BENCH_SAMPLE_STEPS (100 diffusion steps per token), DJEPA_BENCH_CFG (3.0).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the model benchmark needs a CUDA GPU (none is visible)", allow_module_level=True)

from djepa.models import build  # noqa: E402

pytestmark = pytest.mark.gpu

PRESETS = [p.strip() for p in os.environ.get("DJEPA_BENCH_PRESETS", "B,L,H").split(",") if p.strip()]
TRAIN_BATCH = int(os.environ.get("DJEPA_BENCH_TRAIN_BATCH", "64"))
SAMPLE_BATCH = int(os.environ.get("DJEPA_BENCH_SAMPLE_BATCH", "64"))
NUM_ITER = int(os.environ.get("DJEPA_BENCH_NUM_ITER", "64"))
SAMPLE_STEPS = os.environ.get("DJEPA_BENCH_SAMPLE_STEPS", "100")
CFG = float(os.environ.get("DJEPA_BENCH_CFG", "3.0"))
BACKENDS = ["eager", "auto"]
_throughput = {}


def _record(benchmark, key, backend, images):
    seconds = benchmark.stats.stats.median
    rate = images / seconds
    _throughput[(key, backend)] = rate
    benchmark.extra_info.update(images_per_s=rate, backend=backend, device=torch.cuda.get_device_name())
    eager = _throughput.get((key, "eager"))
    if backend != "eager" and eager:
        benchmark.extra_info["speedup_vs_eager"] = rate / eager


def _model(preset, backend, **kw):
    torch.manual_seed(0)
    try:
        return build(preset, backend=backend, num_sampling_steps=SAMPLE_STEPS, **kw).cuda()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{preset} does not fit in GPU memory")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_train_step(benchmark, preset, backend):
    """forward + backward + AdamW (fused) + grad clip 3.0 + EMA update, bf16 autocast."""
    benchmark.group = f"train-{preset}"
    model = _model(preset, backend).train()
    cfg = model.config
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TRAIN_BATCH, cfg.seq_len, cfg.token_channels, device="cuda", generator=g)
    y = torch.randint(0, cfg.num_classes, (TRAIN_BATCH,), device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_ema()
        torch.cuda.synchronize()

    try:
        benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=3)
    except torch.cuda.OutOfMemoryError:
        del model, opt
        torch.cuda.empty_cache()
        pytest.skip(f"{preset} training at batch {TRAIN_BATCH} does not fit in GPU memory")
    _record(benchmark, f"train-{preset}", backend, TRAIN_BATCH)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_sample(benchmark, preset, backend):
    """model.sample: NUM_ITER iterations, SAMPLE_STEPS diffusion steps, CFG (linear), bf16."""
    benchmark.group = f"sample-{preset}"
    model = _model(preset, backend).eval()
    labels = torch.arange(SAMPLE_BATCH, device="cuda") % model.config.num_classes

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.sample(labels, num_iter=NUM_ITER, cfg_scale=CFG, temperature=0.95,
                         generator=torch.Generator(device="cuda").manual_seed(0))
        torch.cuda.synchronize()

    try:
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError:
        del model
        torch.cuda.empty_cache()
        pytest.skip(f"{preset} sampling at batch {SAMPLE_BATCH} does not fit in GPU memory")
    _record(benchmark, f"sample-{preset}", backend, SAMPLE_BATCH)
