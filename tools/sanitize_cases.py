"""One small case of every CUDA kernel of djepa._C, run through djepa.ops with backend="cuda",
for compute-sanitizer (tools/gpu_run.sh runs it under memcheck and racecheck):

    compute-sanitizer --tool memcheck --error-exitcode 99 python3 tools/sanitize_cases.py

Shapes are small and odd (tails in every tiled dimension) so the masked edges of each kernel run.
`--list` prints the cases and exits (the dry run of tools/gpu_run.sh); `--only NAME` runs one.
Exits non-zero when a case raises; the sanitizer's own exit code reports what it found.
"""
import argparse
import sys


def _ema(torch, dev):
    from djepa.ops import ema_update_

    for x_dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(n, device=dev).to(x_dtype) for n in (1, 37, 4099)]
        emas = [x.float().clone() for x in xs]
        ema_update_(emas, xs, 0.99, backend="cuda")


def _attention(torch, dev):
    from djepa.ops import masked_attention

    for D in (64, 80):
        q, k, v = (torch.randn(2, 2, 37, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        mask = torch.rand(2, 37, device=dev) < 0.6
        mask[1] = False  # a sample without a visible key
        out = masked_attention(q, k, v, mask, backend="cuda")
        out.float().square().sum().backward()


def _adaln_block(torch, dev):
    from djepa.ops import adaln_block

    M, W = 45, 64
    t = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16).mul_(0.1).requires_grad_()  # noqa: E731
    out = adaln_block(t(M, W), t(M, 3 * W), t(W), t(W), t(W, W), t(W), t(W, W), t(W), backend="cuda")
    out.float().square().sum().backward()


def _denoise_step(torch, dev):
    from djepa.diffusion import create_diffusion
    from djepa.nn import DenoisingMLP
    from djepa.ops import denoise_step

    mlp = DenoisingMLP(16, 64, 32, 24, 2).to(dev, torch.bfloat16)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    B, d = 19, create_diffusion("10")
    x = torch.randn(B, 16, device=dev)
    with torch.no_grad():
        c_emb = mlp.cond_embed(torch.randn(2 * B, 24, device=dev, dtype=torch.bfloat16))
    for t in (9, 0):
        denoise_step(mlp, x, c_emb, d, t, noise=torch.randn_like(x), cfg_scale=2.0, backend="cuda")


CASES = {"ema_update_": _ema, "masked_attention": _attention, "adaln_block": _adaln_block,
         "denoise_step": _denoise_step}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--only", choices=sorted(CASES), help="run one case")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    import torch

    from djepa import backends

    for name, case in CASES.items():
        if args.only and name != args.only:
            continue
        why = backends.cuda_unavailable_reason(name, torch.device("cuda"))
        if why:
            print(f"{name}: cannot run on djepa._C: {why}", file=sys.stderr)
            return 2
        torch.manual_seed(0)
        case(torch, torch.device("cuda"))
        torch.cuda.synchronize()
        print(f"{name}: ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
