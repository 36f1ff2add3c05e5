"""The default sampling procedure's outputs on fixed seeds, recorded once (from main before the
fast samplers were added) into tests/sampler_defaults.npz; tests/test_sampler.py compares
today's defaults against them. Re-record only when the official procedure itself is meant to
change:  python tests/sampler_defaults.py --record
"""
import sys
from pathlib import Path

import numpy as np
import torch

FILE = Path(__file__).with_name("sampler_defaults.npz")
LABELS = [0, 3, 7]
# small models: 2 encoder blocks of width 32, a 2-block head of width 32 (16 tokens of 4 channels)
SMALL = dict(embed_dim=32, depth=2, num_heads=2, class_tokens=2, diffloss_width=32, diffloss_depth=2)


def small_model(loss, seed, **kw):
    """A small model whose head depends on its inputs (a fresh head's zero-initialised output
    layers would predict a constant whatever the conditioning)."""
    from djepa.models import build

    torch.manual_seed(seed)
    model = build("tiny", loss=loss, **SMALL, **kw).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.ema.copy_from(model.net)
    return model


def cases():
    """name -> a function returning a float tensor, drawn with the default procedure."""
    labels = torch.tensor(LABELS)

    def model_case(loss, seed, steps, **sample_kw):
        def run():
            model = small_model(loss, seed, num_sampling_steps=steps)
            return model.sample(labels, generator=torch.Generator().manual_seed(seed), **sample_kw)
        return run

    def head_case():
        from djepa.diffusion import sample
        from djepa.nn import DenoisingMLP

        torch.manual_seed(5)
        mlp = DenoisingMLP(4, 32, 8, 16, 2)
        with torch.no_grad():
            for p in mlp.parameters():
                p.add_(0.05 * torch.randn(p.shape))
        z = torch.randn(6, 16)
        g = torch.Generator().manual_seed(6)
        return torch.cat([sample(mlp, z[:3], steps=100, temperature=0.95, generator=g, backend="eager"),
                          sample(mlp, z, steps=100, temperature=1.0, cfg_scale=2.0, generator=g, backend="eager")])

    def numpy_orders_case():
        model = small_model("diffusion", 7, num_sampling_steps="100")
        return model.sample(labels, num_iter=5, cfg_scale=2.0, order_generator=np.random.RandomState(7),
                            generator=torch.Generator().manual_seed(7))

    return {
        "diffusion_cfg_linear": model_case("diffusion", 1, "100", num_iter=4, cfg_scale=3.0),
        "diffusion_plain": model_case("diffusion", 2, "100", num_iter=6, temperature=1.0),
        "flow_cfg_linear": model_case("flow", 3, "50", num_iter=16, cfg_scale=3.0),
        "flow_cfg_constant": model_case("flow", 4, "50", num_iter=5, cfg_scale=2.0, cfg_schedule="constant"),
        "flow_plain": model_case("flow", 8, "50", num_iter=3, temperature=0.7),
        "head_ddpm100": head_case,
        "diffusion_numpy_orders": numpy_orders_case,
    }


def cpu_model():
    """vendor, family and model of the CPU: the same ISA level on another microarchitecture can
    pick other MKL/oneDNN kernels and round differently."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.count(":") >= 1 and line.split(":", 1)[0].strip() in ("vendor_id", "cpu family", "model"))
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    except OSError:
        import platform
        return platform.processor() or platform.machine()


def environment():
    return f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, {cpu_model()}"


def record():
    torch.set_num_threads(1)
    out = {name: fn().detach().float().numpy() for name, fn in cases().items()}
    np.savez_compressed(FILE, environment=np.array(environment()), **out)
    print(f"wrote {FILE}: {', '.join(f'{k} {list(v.shape)}' for k, v in out.items())}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    record()
