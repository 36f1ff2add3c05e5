"""One small case of every CUDA kernel of djepa._C, run through djepa.ops with backend="cuda",
for compute-sanitizer (tools/gpu_run.sh runs it under memcheck and racecheck) and for the GPU
run's smoke stage (each case once, in its own process, under a short time limit):

    compute-sanitizer --tool memcheck --error-exitcode 99 python3 tools/sanitize_cases.py
    python3 tools/sanitize_cases.py --only masked_attention_sm90

Shapes are small and odd (tails in every tiled dimension) so the masked edges of each kernel run.
The cases named for an op run the mma.sync kernels (DJEPA_SM90_KERNELS=0, so on a Hopper GPU
too); the *_sm90 cases run the sm_90a wgmma kernels (TMA and gathered loads, split-K) and are
skipped, said so, on a GPU or a build without them, or when the caller has turned them off
(DJEPA_SM90_KERNELS=0 in the environment: the GPU run's fallback after an sm_90a hang).
masked_attention also runs the dropout kernels: forward + backward with dropout_p > 0 at the
presets' head dims 64 and 80 (masked, an empty sample; D = 80 over two query tiles), and the
forward that stores its keep bits (return_dropout_mask), on the mma.sync path (the sm_80 one);
then, on an sm_90 GPU whose sm_90a
kernels are on, the same calls as dispatch sends them there, naming the kernels it picks
(djepa.ops.attention.cuda_kernels; the sm_90a kernels have no dropout, so today the mma.sync ones
again). In the same process as the rest of the case: the smoke stage pays no extra start-up.
`--list` prints the cases ("NAME sm_90a|mma.sync") and exits; `--only NAME` runs one.
Exits non-zero when a case raises; the sanitizer's own exit code reports what it found.

On the fake GPU (tools/fake_gpu, DJEPA_FAKE_GPU=1) nothing can run: each case says so and
passes, except the one named by DJEPA_FAKE_HANG, whose process hangs ignoring SIGINT, as one
stuck in a kernel does (tools/gpu_run.sh --dry-run --fake-hang CASE).
"""
import argparse
import os
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
    _attention_dropout(torch, dev)


def _dropout_calls(torch, dev):
    """Forward + backward with dropout on a masked batch with an empty sample, at D = 64 (and
    the forward storing its keep bits) and D = 80 over two query tiles."""
    from djepa.ops import masked_attention

    gen = torch.Generator(device=dev).manual_seed(0)
    for D, N in ((64, 37), (80, 150)):
        q, k, v = (torch.randn(2, 2, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        mask = torch.rand(2, N, device=dev) < 0.6
        mask[1] = False
        out = masked_attention(q, k, v, mask, dropout_p=0.1, generator=gen, backend="cuda")
        out.float().square().sum().backward()
        if D == 64:
            with torch.no_grad():
                _, keep = masked_attention(q, k, v, mask, dropout_p=0.1, generator=gen, backend="cuda",
                                           return_dropout_mask=True)
            if bool(keep[1].any()):  # the empty sample keeps nothing
                raise AssertionError("masked_attention: dropout: a sample without a visible key kept a probability")


def _attention_dropout(torch, dev):
    from djepa import backends
    from djepa.ops.attention import cuda_kernels

    # the mma.sync dropout kernels (the sm_80 path)
    os.environ["DJEPA_SM90_KERNELS"] = "0"
    _dropout_calls(torch, dev)
    print("masked_attention: dropout on the mma.sync kernels ran", flush=True)
    # on sm_90 with the sm_90a kernels on: the path dispatch takes for a call with dropout there
    if not _CALLER["sm90_allowed"]:
        print("masked_attention: dropout's sm_90 path not run (the sm_90a kernels are off)", flush=True)
        return
    os.environ["DJEPA_SM90_KERNELS"] = "1"
    try:
        if not backends.uses_wgmma("masked_attention", dev):
            print("masked_attention: no sm_90a kernels here: dropout calls take the mma.sync path above", flush=True)
            return
        picked = {D: cuda_kernels(dev, D, dropout=True) for D in (64, 80)}
        if any("sm90" in name for pair in picked.values() for name in pair):
            # a hang there must turn the sm_90a kernels off: this case is run as a mma.sync one
            raise RuntimeError(f"masked_attention: dropout calls now run sm_90a kernels ({picked}): move this "
                               "check into the masked_attention_sm90 case of tools/sanitize_cases.py")
        print(f"masked_attention: on this sm_90 GPU with the sm_90a kernels on, dropout calls run {picked}",
              flush=True)
        _dropout_calls(torch, dev)
    finally:
        os.environ["DJEPA_SM90_KERNELS"] = "0"


def _attention_sm90(torch, dev):
    from djepa.ops import masked_attention

    # masked (cp.async gathers) with an empty sample at D = 64 and 80; dense (TMA) over two
    # query and key tiles at D = 128
    for D, N, masked in ((64, 37, True), (80, 37, True), (128, 150, False)):
        q, k, v = (torch.randn(2, 2, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        mask = None
        if masked:
            mask = torch.rand(2, N, device=dev) < 0.6
            mask[1] = False
        out = masked_attention(q, k, v, mask, backend="cuda")
        out.float().square().sum().backward()


def _adaln_block(torch, dev, shapes=((45, 64),)):
    from djepa.ops import adaln_block

    for M, W in shapes:
        t = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16).mul_(0.1).requires_grad_()  # noqa: E731
        out = adaln_block(t(M, W), t(M, 3 * W), t(W), t(W), t(W, W), t(W), t(W, W), t(W), backend="cuda")
        out.float().square().sum().backward()


def _gemm_sm90(torch, dev):
    # M = 600 tokens: the weight gradients split K (and run the split-K reduction); W = 36: rows
    # of 72 bytes, which TMA cannot load (the producer's ordinary loads); each GEMM design
    # (DJEPA_SM90_GEMM): 128x256 runs its 2-CTA clusters, multicast and TMA-store epilogue on the
    # first shape (W = 36 goes to the 128x128 kernel), 128x128 both
    before = os.environ.get("DJEPA_SM90_GEMM")
    try:
        for design in ("128x256", "128x128"):
            os.environ["DJEPA_SM90_GEMM"] = design
            _adaln_block(torch, dev, shapes=((600, 64), (45, 36)))
    finally:
        if before is None:
            os.environ.pop("DJEPA_SM90_GEMM", None)
        else:
            os.environ["DJEPA_SM90_GEMM"] = before


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


# What the caller's environment allowed (main sets it before a case overrides DJEPA_SM90_KERNELS).
_CALLER = {"sm90_allowed": True}

# name -> (op, case, the sm_90a kernels)
CASES = {"ema_update_": ("ema_update_", _ema, False), "masked_attention": ("masked_attention", _attention, False),
         "adaln_block": ("adaln_block", _adaln_block, False), "denoise_step": ("denoise_step", _denoise_step, False),
         "masked_attention_sm90": ("masked_attention", _attention_sm90, True),
         "gemm_sm90": ("adaln_block", _gemm_sm90, True)}


def _fake_gpu(name):
    """On the fake GPU: hang like a stuck kernel if asked to, else say the case cannot run."""
    if os.environ.get("DJEPA_FAKE_HANG") == name:
        import signal
        import time

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a process stuck in a kernel does not stop on SIGINT
        print(f"{name}: hanging (faked: ignores SIGINT, as a stuck kernel does)", flush=True)
        while True:
            time.sleep(60)
    print(f"{name}: not run (GPU faked)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print the cases (NAME sm_90a|mma.sync) and exit")
    p.add_argument("--only", choices=sorted(CASES), help="run one case")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(f"{name} {'sm_90a' if sm90 else 'mma.sync'}" for name, (_, _, sm90) in CASES.items()))
        return 0
    chosen = [name for name in CASES if not args.only or name == args.only]
    if os.environ.get("DJEPA_FAKE_GPU") == "1":
        for name in chosen:
            _fake_gpu(name)
        return 0
    import torch

    from djepa import backends

    sm90_allowed = _CALLER["sm90_allowed"] = os.environ.get("DJEPA_SM90_KERNELS", "1").strip() != "0"
    dev = torch.device("cuda", torch.cuda.current_device())
    for name in chosen:
        op, case, sm90 = CASES[name]
        why = backends.cuda_unavailable_reason(op, dev)
        if why:
            print(f"{name}: cannot run on djepa._C: {why}", file=sys.stderr)
            return 2
        if sm90 and not sm90_allowed:
            print(f"{name}: skipped: the sm_90a kernels are off (DJEPA_SM90_KERNELS=0 given)", flush=True)
            continue
        os.environ["DJEPA_SM90_KERNELS"] = "1" if sm90 else "0"
        if sm90 and not backends.uses_wgmma(op, dev):
            print(f"{name}: skipped: no sm_90a kernels for {op} here (sm_90 GPU and a 90a build needed)", flush=True)
            continue
        torch.manual_seed(0)
        case(torch, dev)
        torch.cuda.synchronize()
        print(f"{name}: ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
