"""`djepa train | sample | eval | bench | info | tune` (also `python -m djepa`, and under torchrun).

Mistakes in the input (a bad checkpoint, data, labels, setting or output folder) end with one
line on stderr and exit status 2; `--debug` shows the traceback instead. `djepa train` stopped by
SIGTERM/SIGINT checkpoints at the next step, says how to resume and exits 128 + the signal.
"""
import argparse
import contextlib
import datetime
import json
import os
import re
import sys

import torch

EXIT_USAGE = 2


class CLIError(ValueError):
    """A user-facing error of the command line itself."""


# ----------------------------------------------------------------------------- helpers
def parse_label_ranges(spec: str) -> list:
    """'1,3,5-7' -> [(1, 1), (3, 3), (5, 7)], without expanding anything."""
    ranges = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+))?", part)
        if not m:
            raise CLIError(f"--labels {spec!r}: expected numbers and ranges such as 0-9 or 1,3,5-7")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise CLIError(f"--labels {spec!r}: range {lo}-{hi} runs backwards")
        ranges.append((lo, hi))
    return ranges


def parse_labels(spec: str, num_classes: int = None) -> list:
    """'0-9' -> [0..9]; '1,3,5-7' -> [1, 3, 5, 6, 7]. With `num_classes`, every range is checked
    against [0, num_classes) before it is expanded."""
    ranges = parse_label_ranges(spec)
    if num_classes is not None:
        for lo, hi in ranges:
            if lo < 0 or hi >= num_classes:
                bad = f"{lo}" if lo < 0 else (f"{max(lo, num_classes)}-{hi}" if hi > max(lo, num_classes) else f"{hi}")
                are = "is" if "-" not in bad[1:] else "are"
                raise CLIError(f"--labels {spec}: {bad} {are} out of range; this model knows classes "
                               f"0-{num_classes - 1}")
    elif sum(hi - lo + 1 for lo, hi in ranges) > 10_000_000:
        raise CLIError(f"--labels {spec}: more than 10^7 labels")
    return [c for lo, hi in ranges for c in range(lo, hi + 1)]


def parse_overrides(items) -> dict:
    """--set KEY=VALUE pairs; VALUE is read as JSON (numbers, true/false, null) or else as text."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set {item!r}: expected KEY=VALUE, e.g. --set depth=2")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _device(arg):
    if arg:
        try:
            dev = torch.device(arg)
        except RuntimeError as exc:
            raise CLIError(f"--device {arg!r}: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {arg}: no CUDA GPU is visible")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _progress(args):
    return sys.stderr.isatty() if args.progress is None else args.progress


def _add_common(p):
    p.add_argument("--device", help="torch device (default: the GPU when there is one, else the CPU)")
    p.add_argument("--backend", choices=["auto", "cuda", "triton", "eager"], default=None,
                   help="kernel backend for the model's ops (default: DJEPA_BACKEND or auto)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show progress bars (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _add_sampling(p, n_default, cfg_default):
    p.add_argument("--cfg", type=float, default=cfg_default,
                   help="classifier-free guidance scale, 1 = none (default: %(default)s)")
    p.add_argument("--cfg-schedule", choices=["linear", "constant"], default="linear",
                   help="guidance ramps up as tokens are revealed, or stays constant (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=None,
                   help="noise temperature (default: the model's, official D-JEPA 0.95)")
    p.add_argument("--num-iter", type=int, default=None,
                   help="masked-autoregressive iterations (default: the sequence length, at most 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=500, help="samples drawn at once (default: %(default)s)")
    p.add_argument("--preset", default=None, help="refuse a checkpoint of any other preset")
    f = p.add_argument_group("faster sampling (opt-in; without these flags: the official procedure)")
    f.add_argument("--fast", action="store_true",
                   help="the measured fast setting (README, 'Fast sampling'); the flags below replace its parts")
    f.add_argument("--solver", choices=["ddpm", "ddim", "dpm++2m", "euler", "heun", "midpoint"], default=None,
                   help="the head's solver: ddpm/ddim/dpm++2m for a diffusion head, euler/heun/midpoint for a "
                        "flow head (default: the official ddpm / euler loop)")
    f.add_argument("--head-steps", type=int, default=None,
                   help="the head's steps (default: the model's num_sampling_steps)")
    f.add_argument("--eta", type=float, default=None, help="DDIM's noise level in [0, 1] (default 0)")
    f.add_argument("--anneal", choices=["none", "linear", "cosine"], default=None,
                   help="lower the head's steps as tokens become known (default none)")
    f.add_argument("--min-head-steps", type=int, default=None,
                   help="the annealing floor (default: head steps // 4)")
    f.add_argument("--feature-reuse", type=float, default=None, metavar="TOL",
                   help="reuse encoder/predictor features of tokens that moved less than TOL (relative) "
                        "since the last iteration; 0 reuses nothing (default: off)")
    f.add_argument("--cfg-refresh", type=int, default=None, metavar="N",
                   help="with --cfg: run the unconditional encoder/predictor half every N-th iteration and "
                        "reuse its guidance residual in between (default 1: every iteration)")


# ----------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from djepa.train import TrainSettings, train

    defaults = TrainSettings()
    given = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": args.lr_schedule,
        "min_lr_ratio": args.min_lr_ratio, "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "seed": args.seed,
        "precision": args.precision, "patch_size": args.patch_size, "data": args.data,
    }
    overrides = parse_overrides(args.set)
    if "backend" in overrides:
        raise CLIError("use --backend, not --set backend=...")
    data_options = {k: v for k, v in (("image_size", args.image_size), ("channels", args.channels),
                                      ("num_classes", args.num_classes), ("scale", args.latent_scale))
                    if v is not None}
    if args.resume is not None:
        if args.set:
            given["overrides"] = overrides
        if data_options:
            given["data_options"] = data_options
        if args.preset is not None:
            given["preset"] = args.preset
    settings = TrainSettings(
        preset=args.preset or defaults.preset,
        **{k: (v if v is not None else getattr(defaults, k)) for k, v in given.items()
           if k not in ("overrides", "data_options", "preset")},
        overrides=overrides, data_options=data_options)
    resume = True if args.resume == "" else args.resume
    result = train(settings, args.out, resume=resume, given=given, ckpt_every=args.ckpt_every,
                   log_every=args.log_every, keep=args.keep, progress=_progress(args),
                   backend=args.backend, device=args.device, num_workers=args.num_workers)
    if result.metrics:  # rank 0 reports
        if result.losses:
            print(f"trained to step {result.step}; last loss {result.losses[-1]['loss']:.4f}")
        else:  # a finished run resumed: nothing to train; the loss is the last one logged
            logged = _last_logged(result.metrics)
            was = f"; last logged loss {logged['loss']:.4f} (step {logged['step']})" if logged else ""
            print(f"the run is already at step {result.step} (its --steps): nothing to train{was}")
        print(f"checkpoint: {result.checkpoint}")
        print(f"metrics:    {result.metrics}  (loss curve: {os.path.join(os.path.dirname(result.metrics), 'loss.png')})")
    return 0


def _last_logged(metrics_path):
    """The last record of metrics.jsonl with a step and a loss, or None."""
    last = None
    with contextlib.suppress(OSError), open(metrics_path) as f:
        for line in f:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                rec = json.loads(line)
                last = {"step": int(rec["step"]), "loss": float(rec["loss"])}
    return last


# ----------------------------------------------------------------------------- sample
def _load(args, device):
    from djepa.train import check_backend, load_checkpoint, make_tokenizer

    check_backend(args.backend, device)
    model, state = load_checkpoint(args.ckpt, device=device, backend=args.backend, preset=args.preset)
    data = state["data"]
    tokenizer = make_tokenizer(data["channels"], data["patch_size"])
    return model, state, tokenizer


def _num_iter(args, model):
    n = args.num_iter if args.num_iter is not None else min(64, model.config.seq_len)
    if n < 1:
        raise CLIError(f"--num-iter must be >= 1, got {n}")
    return n


def _check_sampling_args(args):
    if args.temperature is not None and args.temperature <= 0:
        raise CLIError(f"--temperature must be > 0, got {args.temperature}")
    if args.cfg < 1.0:
        raise CLIError(f"--cfg must be >= 1 (1 = no guidance), got {args.cfg}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag in ("head_steps", "min_head_steps"):
        v = getattr(args, flag)
        if v is not None and not 1 <= v <= 1000:
            raise CLIError(f"--{flag.replace('_', '-')} must lie in [1, 1000], got {v}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise CLIError(f"--eta must lie in [0, 1], got {args.eta}")
    if args.feature_reuse is not None and not args.feature_reuse >= 0:
        raise CLIError(f"--feature-reuse must be >= 0, got {args.feature_reuse}")
    if args.cfg_refresh is not None and args.cfg_refresh < 1:
        raise CLIError(f"--cfg-refresh must be >= 1, got {args.cfg_refresh}")


def _sampler_kwargs(args, model) -> dict:
    """DJEPA.sample's faster options from the flags, checked against the model's head."""
    from djepa.models.sampler import resolve_options

    kw = {k: getattr(args, k) for k in ("solver", "head_steps", "eta", "anneal", "min_head_steps", "feature_reuse",
                                        "cfg_refresh") if getattr(args, k) is not None}
    try:
        resolve_options(model.config.loss, args.fast, **kw).check(model.config.loss,
                                                                  int(model.config.num_sampling_steps))
    except ValueError as exc:
        raise CLIError(f"{exc} (this model's head: {model.config.loss})") from None
    return dict(kw, fast=True) if args.fast else kw


def cmd_sample(args) -> int:
    from djepa.train import output_dir

    _check_sampling_args(args)
    parse_label_ranges(args.labels)  # syntax first; the ranges are checked against the model's classes
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    out = os.path.abspath(args.out)
    if os.path.splitext(out)[1].lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise CLIError(f"--out {args.out!r}: expected a .png (or .jpg/.pdf/.svg) file name")
    with output_dir(os.path.dirname(out)):
        return _sample(args, out)


def _sample(args, out) -> int:
    import numpy as np

    from djepa.data import pixel_scale
    from djepa.evaluate import sampler_settings, timed_generate
    from djepa.plots import sample_grid
    from djepa.train import atomic_write_text

    stem = os.path.splitext(out)[0]
    device = _device(args.device)
    model, state, tokenizer = _load(args, device)
    labels = parse_labels(args.labels, num_classes=model.config.num_classes)
    sampler = _sampler_kwargs(args, model)
    y = torch.tensor(labels, dtype=torch.long).repeat_interleave(args.n)
    num_iter = _num_iter(args, model)
    temperature = model.config.temperature if args.temperature is None else args.temperature
    images, seconds, stats = timed_generate(
        model, tokenizer, y, state["data"]["image_size"], num_iter=num_iter, cfg=args.cfg,
        cfg_schedule=args.cfg_schedule, temperature=temperature, seed=args.seed, batch_size=args.batch_size,
        use_ema=not args.no_ema, progress=_progress(args), sampler=sampler)
    to_pixels, prange = pixel_scale(state["data"])
    pixels = to_pixels(images).numpy().astype(np.float32)
    npz = stem + ".npz"
    tmp = stem + ".tmp.npz"
    np.savez_compressed(tmp, images=pixels, labels=y.numpy(),
                        pixel_range=np.asarray(prange if prange else (np.nan, np.nan), dtype=np.float32))
    os.replace(tmp, npz)
    report = {
        "settings": {"checkpoint": state["folder"], "step": state["step"], "preset": state["preset"],
                     "labels": args.labels, "n_per_label": args.n, "n_samples": len(y), "num_iter": num_iter,
                     "cfg": args.cfg, "cfg_schedule": args.cfg_schedule, "temperature": temperature,
                     "seed": args.seed, "batch_size": args.batch_size, "use_ema": not args.no_ema,
                     "device": str(device), "backend": args.backend, "torch_threads": torch.get_num_threads(),
                     "sampler": sampler_settings(model, sampler)},
        "sampling_seconds": seconds,
        "counts": stats,
    }
    atomic_write_text(stem + ".json", json.dumps(report, indent=1) + "\n")
    if prange is None:
        lo, hi = float(pixels.min()), float(pixels.max())
        prange = (lo, hi if hi > lo else lo + 1)
    if pixels.shape[1] in (1, 3):
        sample_grid(pixels, y.numpy(), out, value_range=prange,
                    cmap="gray_r" if state["data"].get("name") == "digits" else "gray",
                    title=f"{state['preset']} step {state['step']}, cfg {args.cfg:g}")
        print(f"wrote {out}")
    else:
        print(f"{pixels.shape[1]}-channel samples (latents) cannot be drawn; no grid written")
    print(f"wrote {npz} (images {list(pixels.shape)} in the data's own scale, labels)")
    print(f"wrote {stem}.json (settings; sampling {seconds:.2f} s, {stats['cpu_seconds']:.2f} CPU s, model loading excluded; "
          f"{stats['encoder_passes']} encoder/predictor passes, {stats['head_evaluations']} head evaluations)")
    return 0


# ----------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from djepa.train import output_dir

    _check_sampling_args(args)
    if args.n_per_class < 2:
        raise CLIError(f"--n-per-class must be >= 2, got {args.n_per_class}")
    device = _device(args.device)
    model, state, tokenizer = _load(args, device)
    out = os.path.abspath(args.out or os.path.join(state["folder"], "eval.json"))
    with output_dir(os.path.dirname(out)):
        return _eval(args, out, model, state, tokenizer)


def _eval(args, out, model, state, tokenizer) -> int:
    from djepa.data import build_dataset
    from djepa.evaluate import evaluate, format_table
    from djepa.train import atomic_write_text

    spec = args.data or state["data"].get("spec") or state["settings"]["data"]
    opts = state["settings"].get("data_options", {})
    train_set = build_dataset(spec, "train", **opts)
    test_set = build_dataset(spec, "test", **opts)
    if train_set.num_classes > model.config.num_classes:
        raise CLIError(f"the data have {train_set.num_classes} classes; the model knows {model.config.num_classes}")
    if tuple(train_set.image_size) != tuple(state["data"]["image_size"]) or train_set.channels != state["data"]["channels"]:
        raise CLIError(f"the data ({train_set.channels}x{train_set.image_size}) do not match the checkpoint's "
                       f"({state['data']['channels']}x{tuple(state['data']['image_size'])})")
    res = evaluate(model, tokenizer, train_set, test_set, n_per_class=args.n_per_class,
                   num_iter=_num_iter(args, model), cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                   temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                   progress=_progress(args), sampler=_sampler_kwargs(args, model))
    res.update(checkpoint=state["folder"], step=state["step"], preset=state["preset"], data=spec)
    print(format_table(res))
    atomic_write_text(out, json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- bench, info
def _gpu_slug() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    return re.sub(r"[^A-Za-z0-9]+", "-", name.replace("NVIDIA", "")).strip("-").lower() or "gpu"


def cmd_bench(args) -> int:
    from djepa import benchreport

    if args.render:
        try:
            md, png = benchreport.render(args.render)
        except benchreport.ReportError as exc:
            raise CLIError(str(exc)) from None
        print(f"wrote {md}" + (f" and {png}" if png else " (a tuning table: Markdown only)"))
        return 0
    import pytest

    root = _benchmark_dir(args.dir)
    targets = [root]
    if args.op:
        targets = []
        for op in args.op:
            f = os.path.join(root, f"test_bench_{op}.py")
            if not os.path.isfile(f):
                have = sorted(n[len("test_bench_"):-3] for n in os.listdir(root)
                              if n.startswith("test_bench_") and n.endswith(".py"))
                raise CLIError(f"--op {op!r}: no {f}; available: {', '.join(have) or 'none'}")
            targets.append(f)
    out = args.json or os.path.join(root, "results", f"{datetime.date.today():%Y-%m-%d}-{_gpu_slug()}.json")
    from djepa.train import ensure_writable_dir

    ensure_writable_dir(os.path.dirname(os.path.abspath(out)), "results directory")
    pytest_args = [*targets, "--benchmark-only", f"--benchmark-json={out}", "-q"]
    if args.k:
        pytest_args += ["-k", args.k]
    pytest_args += args.pytest_args
    if torch.cuda.is_available():
        rc = int(pytest.main(pytest_args))
    else:  # quietly: the suites skip themselves without a GPU, so say that in one line
        rc = _bench_without_gpu(pytest_args)
        if rc is None:
            return 0
    if rc == 0 and os.path.exists(out):
        print(f"wrote {out}")
        try:
            md, png = benchreport.render(out)
            print(f"wrote {md} and {png}")
        except benchreport.ReportError as exc:
            print(f"no report: {exc}")
    return rc


def _benchmark_dir(given):
    """--dir, else ./benchmarks, else the benchmarks/ of the source tree djepa runs from (an
    editable install); CLIError saying where the suites are when none exists."""
    if given is not None:
        root = os.path.abspath(given)
        if not os.path.isdir(root):
            raise CLIError(f"benchmark folder {root!r} not found")
        return root
    import djepa

    source_tree = os.path.dirname(os.path.dirname(os.path.abspath(djepa.__file__)))
    for root in (os.path.abspath("benchmarks"), os.path.join(source_tree, "benchmarks")):
        if os.path.isfile(os.path.join(root, "conftest.py")):
            return root
    raise CLIError("the benchmark suites are not installed with the package: they are the benchmarks/ folder "
                   "of djepa's source tree; run `djepa bench` from a checkout (or pass --dir "
                   "CHECKOUT/benchmarks)")


class _Outcomes:
    """A pytest plugin that counts what ran, what was skipped (and why) and what failed."""

    def __init__(self):
        self.passed, self.skipped, self.failed = 0, [], []

    def pytest_runtest_logreport(self, report):
        if report.passed and report.when == "call":
            self.passed += 1
        elif report.skipped:
            self.skipped.append(report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr))
        elif report.failed:
            self.failed.append(f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1][:200]}")

    def pytest_collectreport(self, report):
        if report.skipped:
            self.skipped.append(report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr))
        elif report.failed:
            self.failed.append(f"{report.nodeid}: cannot be collected")


def _bench_without_gpu(pytest_args):
    """Run the suites with pytest's report held back (shown only on failure). None when nothing
    ran (they need a GPU: one line says so, exit status 0), else pytest's exit status."""
    import contextlib
    import io
    import warnings

    import pytest

    seen, report = _Outcomes(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
        warnings.simplefilter("ignore")  # pytest-benchmark warns that it saved nothing
        rc = int(pytest.main(pytest_args, plugins=[seen]))
    if seen.failed or rc not in (0, 5):
        print(report.getvalue()[-20000:], file=sys.stderr)
    if not seen.passed and not seen.failed and rc in (0, 5):
        print(f"djepa bench: nothing was run: the benchmarks need a CUDA GPU and none is visible here "
              f"({len(seen.skipped)} suites/cases skipped)")
        return None
    print(f"djepa bench: {seen.passed} benchmark(s) ran on the CPU, {len(seen.skipped)} skipped (they need a GPU), "
          f"{len(seen.failed)} failed")
    return rc


def cmd_info(args) -> int:
    from djepa.backends import describe

    print(describe())
    return 0


# ----------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    """An official D-JEPA / MAR checkpoint -> a djepa checkpoint folder (step 0) that `sample`,
    `eval` and `train --resume` take. Uses djepa.train.save_checkpoint."""
    import math
    import time

    import djepa
    from djepa.models import get_config
    from djepa.models.official import from_official, load_official, matching_preset, preset_for
    from djepa.train import (UNRECORDED_DATA, TrainSettings, ensure_writable_dir, list_checkpoints, param_groups,
                             save_checkpoint)

    overrides = parse_overrides(args.set)
    if "backend" in overrides:
        raise CLIError("use --backend, not --set backend=...")
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    try:
        ck = load_official(args.ckpt, trust_pickle=args.trust_pickle)
        model = from_official(args.source, ck, strict=not args.no_strict, **overrides)
    except (TypeError, ValueError) as exc:
        raise CLIError(_as_flags(str(exc))) from None
    cfg = model.config
    preset = args.preset or preset_for(cfg)
    try:
        base = get_config(preset).to_dict()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    official = ck.args or {}
    patch = args.patch_size or int(official.get("patch_size", 0) or 0)
    if not patch:  # official latents have 16 channels (KL-16 VAE); tokens hold patch**2 of them
        p = math.isqrt(cfg.token_channels // 16) if cfg.token_channels % 16 == 0 else 0
        patch = p if p and 16 * p * p == cfg.token_channels else 1
    side = math.isqrt(cfg.seq_len)
    if side * side != cfg.seq_len or cfg.token_channels % (patch * patch):
        raise CLIError(f"cannot lay {cfg.seq_len} tokens of {cfg.token_channels} channels out as a square latent "
                       f"grid with patch size {patch}; pass --patch-size")
    scale = args.latent_scale or float(official.get("scaling_factor", 0.2325))
    if float(official.get("shift", 0.0) or 0.0):
        print(f"note: the official run shifted latents by {official['shift']}; djepa's latents data take "
              "none: subtract it from your cached latents")
    spec = args.data or UNRECORDED_DATA  # --data records it; eval/--resume read it
    settings_kw = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr))
                   if v is not None}
    try:
        settings = TrainSettings(preset=preset, data=spec, patch_size=patch,
                                 overrides={k: v for k, v in cfg.to_dict().items() if k != "backend" and base[k] != v},
                                 data_options={"scale": scale, "num_classes": cfg.num_classes}, **settings_kw)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    out = os.path.abspath(args.out)
    ensure_writable_dir(out)
    if list_checkpoints(out):
        raise CLIError(f"{out!r} already holds checkpoints; choose another --out (nothing was overwritten)")
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=settings.betas, weight_decay=settings.weight_decay)
    data = {"name": "latents", "channels": cfg.token_channels // (patch * patch), "image_size": [side * patch] * 2,
            "num_classes": cfg.num_classes, "scale": scale, "spec": spec, "patch_size": patch}
    doc = {"preset": preset, "config": cfg.to_dict(), "settings": settings.to_dict(), "data": data, "rng": [],
           "world_size": 1, "djepa_version": djepa.__version__, "torch_version": torch.__version__,
           "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "converted_from": {"source": args.source, "path": os.path.abspath(args.ckpt),
                              "ema": ck.model_ema is not None, "strict": not args.no_strict}}
    folder = save_checkpoint(out, 0, model, optimizer, doc)
    if args.preset:
        size = f"recorded as preset {preset} (--preset)"
    elif matching_preset(cfg) == preset:
        size = f"as preset {preset}"
    else:
        size = (f"a {cfg.embed_dim}-wide, {cfg.depth}-block model of no preset size (recorded as preset {preset} "
                f"with its architecture as overrides)")
    print(f"converted the official {args.source} model ({model.num_parameters():,} parameters, "
          f"EMA {'from model_ema' if ck.model_ema is not None else 'copied from the weights'}), {size}")
    print(f"checkpoint: {folder}")
    if spec == UNRECORDED_DATA:
        print("note: no --data given: `djepa train --resume` on it will ask for --data latents:PATH")
    return 0


# from_official's keyword arguments, as `djepa convert` spells them
_CONVERT_FLAGS = {"num_heads=": "--num-heads N", "strict=False": "--no-strict", "trust_pickle=True": "--trust-pickle"}


def _as_flags(message: str) -> str:
    """An error of djepa.models.official with its keyword arguments named by their CLI flags."""
    for kwarg, flag in _CONVERT_FLAGS.items():
        message = message.replace(f"pass {kwarg}", f"pass {flag}")
    return message.replace("pass --trust-pickle (djepa convert --trust-pickle)", "pass --trust-pickle")


def _add_convert(sub):
    c = sub.add_parser("convert", help="an official D-JEPA or MAR checkpoint -> a djepa checkpoint folder",
                       description="Convert an official D-JEPA (D-JEPA/djepa-imagenet) or MAR (LTH14/mar) "
                                   "checkpoint into a djepa checkpoint folder for sample / eval / train --resume.")
    c.add_argument("--from", dest="source", required=True, choices=["djepa", "mar"], help="which code wrote CKPT")
    c.add_argument("ckpt", metavar="CKPT", help="checkpoint-*.pth (model, model_ema, args), or a state dict file")
    c.add_argument("--out", required=True, help="run folder to write step-0000000 into")
    c.add_argument("--num-heads", type=int, help="attention heads, when neither the args nor the width tell")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model config field (repeatable)")
    c.add_argument("--preset", default=None, help="the preset to record (default: the one of this size)")
    c.add_argument("--data", default=None, help="training data to record for eval/--resume, e.g. latents:PATH")
    c.add_argument("--latent-scale", type=float, default=None, help="latent scale (default the args' or 0.2325)")
    c.add_argument("--patch-size", type=int, default=None, help="latent pixels per token side (default from args)")
    c.add_argument("--steps", type=int, default=None, help="total steps to record for --resume")
    c.add_argument("--batch-size", type=int, default=None, help="global batch to record for --resume")
    c.add_argument("--lr", type=float, default=None, help="learning rate to record for --resume")
    c.add_argument("--no-strict", action="store_true", help="load the keys that fit, ignore the rest")
    c.add_argument("--trust-pickle", action="store_true", help="unpickle arbitrary objects (trusted files only)")
    c.set_defaults(func=cmd_convert)


# ----------------------------------------------------------------------------- tune
def cmd_tune(args) -> int:
    from djepa import tune

    return tune.main(args)


def _add_tune(sub):
    from djepa import tune

    p = sub.add_parser(
        "tune", help="time every backend of every op on this GPU; backend='auto' then follows the table",
        description="Time each backend (cuda, triton, eager) of every op on the preset and benchmark "
                    "shapes on this GPU and write a tuning table that backend='auto' follows. Without a "
                    "GPU it prints one line and exits 1 (--dry-run lists the cases and exits 0).")
    p.add_argument("--out", default=None,
                   help=f"table to write (default: {tune.user_cache_dir()}/tune-<gpu>.json, which auto reads)")
    p.add_argument("--quick", action="store_true", help="the presets' own shapes only, bfloat16")
    p.add_argument("--op", action="append", choices=list(tune.QUICK_OPS), help="only this op (repeatable)")
    p.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"],
                   help="only this dtype (repeatable)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this many seconds (the table is then marked partial; "
                        "it is rewritten after every case, and SIGINT/SIGTERM leave it partial too)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cases and where the table would go; time nothing (works without a GPU)")
    p.add_argument("--device", default=None, help="CUDA device to tune (default: the current one)")
    p.set_defaults(func=cmd_tune)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djepa", description="Train, sample, evaluate and benchmark D-JEPA.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,eval,convert,bench,info,tune}")

    t = sub.add_parser("train", help="train (or --resume) a model; torchrun runs it on many processes",
                       description="Train D-JEPA. Unset options take the defaults (or, with --resume, "
                                   "the checkpoint's settings).")
    t.add_argument("--preset", default=None, help="model size: tiny, B, L, H, or MAR's mar-B, mar-L, mar-H (default tiny)")
    t.add_argument("--data", default=None,
                   help="'digits' (default, embedded), folder:PATH (class subfolders), latents:PATH, or a path")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png")
    t.add_argument("--steps", type=int, help="total optimizer steps (default 1000)")
    t.add_argument("--batch-size", type=int, help="global batch, split over the processes (default 128)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    t.add_argument("--lr-schedule", choices=["cosine", "constant"])
    t.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (default 0.05)")
    t.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 100)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.02)")
    t.add_argument("--grad-clip", type=float, help="gradient-norm clip (default 3.0)")
    t.add_argument("--seed", type=int, help="seed of initialisation, batches, masks and noise (default 0)")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on GPU, fp32 on CPU")
    t.add_argument("--patch-size", type=int, help="pixels per token side (default: the data's, 2 for digits)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model config field (repeatable)")
    t.add_argument("--image-size", type=int, help="image folders: resize to this size")
    t.add_argument("--channels", type=int, choices=[1, 3], help="image folders: grey or RGB")
    t.add_argument("--num-classes", type=int, help="latents: number of classes (default max label + 1)")
    t.add_argument("--latent-scale", type=float, help="latents: scale factor (MAR KL-16: 0.2325)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue the newest checkpoint in --out (or CKPT) exactly, with the run's settings; "
                        "from an older CKPT the later checkpoints are moved into --out/superseded/")
    t.add_argument("--ckpt-every", type=int, default=None,
                   help="checkpoint every N steps and at the end (default 500; with --resume, the run's)")
    t.add_argument("--log-every", type=int, default=None,
                   help="metrics.jsonl record every N steps (default 50; with --resume, the run's)")
    t.add_argument("--keep", type=int, default=None,
                   help="checkpoints kept that verify, older ones are deleted; 0 keeps all "
                        "(default 2; with --resume, the run's)")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (image folders; default 0)")
    _add_common(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw class-conditional samples: a grid PNG and an .npz beside it")
    s.add_argument("--ckpt", required=True, help="run folder or step-* checkpoint folder")
    s.add_argument("--labels", default="0-9", help="classes, e.g. 0-9 or 1,3,5-7 (default 0-9)")
    s.add_argument("--n", type=int, default=8, help="samples per label (default 8)")
    s.add_argument("--out", default="samples.png", help="grid image; the .npz goes beside it")
    s.add_argument("--no-ema", action="store_true", help="sample with the online weights, not the EMA")
    _add_sampling(s, 8, 3.0)
    _add_common(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="linear probe, sample accuracy and Fréchet distance on held-out data")
    e.add_argument("--ckpt", required=True, help="run folder or step-* checkpoint folder")
    e.add_argument("--data", default=None, help="default: the data the checkpoint was trained on")
    e.add_argument("--n-per-class", type=int, default=50, help="samples per class (default 50)")
    e.add_argument("--out", default=None, help="JSON results (default: eval.json in the checkpoint folder)")
    _add_sampling(e, 50, 3.0)
    _add_common(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="run the pytest-benchmark suites; JSON into benchmarks/results/")
    b.add_argument("--op", action="append", help="only benchmarks/test_bench_OP.py (repeatable)")
    b.add_argument("-k", default=None, help="pytest -k expression")
    b.add_argument("--dir", default=None,
                   help="benchmark folder (default ./benchmarks, else the source tree's, for an editable install)")
    b.add_argument("--json", default=None, help="output (default benchmarks/results/<date>-<gpu>.json)")
    b.add_argument("--render", metavar="JSON", default=None,
                   help="only render an existing benchmark JSON as a Markdown table and PNG beside it "
                        "(a tuning table from djepa tune: as a Markdown table)")
    b.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, the CUDA extension, the GPU and each op's backends")
    i.set_defaults(func=cmd_info)
    _add_convert(sub)
    _add_tune(sub)
    return p


def _one_line(exc) -> str:
    """The error as one line; a setting named by its flag (`steps must ...` -> `--steps must ...`)."""
    from djepa.train import TrainError

    msg = " ".join(str(exc).split())
    field = getattr(exc, "field", None) if isinstance(exc, TrainError) else None
    if field and msg.startswith(field):
        msg = "--" + field.replace("_", "-") + msg[len(field):]
    return msg


def main(argv=None) -> int:
    from djepa.data import DataError
    from djepa.train import CheckpointError, TrainError, TrainInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"djepa {args.command}"
    try:
        return args.func(args)
    except (CLIError, DataError, CheckpointError, TrainError) as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if args.debug:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except TrainInterrupted as exc:
        if exc.main:  # under torchrun, rank 0 speaks for all
            print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
