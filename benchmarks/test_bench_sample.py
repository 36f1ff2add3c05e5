"""Sampling time and quality across the sampler's settings, on the CPU or a GPU.

Two models, one pytest-benchmark group each:

- ``digits``: the model the README's main command trains (``djepa train --preset tiny --data
  digits --out runs/digits``: a flow head, 50 Euler steps). ``DJEPA_BENCH_DIGITS=PATH`` names
  the run folder (default ``runs/digits``); when it does not exist the suite trains it there
  first (1000 steps: minutes on a CPU). Each setting draws 500 samples (50 per class, CFG 3
  linear, 16 iterations, seed 0, the model's temperature) and `djepa eval`'s judge scores them:
  judged accuracy and Fréchet distance to the held-out digits.
- ``B``: the B preset (212M parameters, Gaussian head, 100-step DDPM), randomly initialised:
  time, passes and head evaluations only (an untrained model has no quality to measure). CPU:
  1 sample, 4 iterations; GPU: 16 samples, 64 iterations (``DJEPA_BENCH_B_BATCH``,
  ``DJEPA_BENCH_B_ITER`` override).

Every case records in ``extra_info``: sampling seconds, encoder/predictor passes and rows, head
evaluations and rows, the settings, the speed-up over the official setting of its group measured
in the same session, and (digits) accuracy and Fréchet distance with their change against it.
The digits settings run in turn, ``DJEPA_BENCH_SAMPLE_ROUNDS`` rounds (default 3): their seconds
are medians, the speed-up the median of the per-round ratios (the spread is recorded too); the
same for the process's CPU seconds (``cpu_seconds``, ``cpu_speedup_vs_official``), steadier than
wall time on a shared CPU.
``DJEPA_BENCH_SAMPLE_SETTINGS=a,b`` runs some settings only. Without a GPU the suite skips
unless ``DJEPA_BENCH_SAMPLE_CPU=1`` (it takes minutes there).

    DJEPA_BENCH_SAMPLE_CPU=1 pytest benchmarks/test_bench_sample.py --benchmark-json=benchmarks/results/<date>_<device>_sample.json
    python benchmarks/test_bench_sample.py --render JSON [--out DIR] [--plot-dir DIR]   # table + plot (default: beside the JSON)
"""
import os
import statistics
import time

import pytest
import torch

# name -> DJEPA.sample keyword arguments; "official" first (the reference of its group)
DIGITS_SETTINGS = {
    "official": {},
    "euler-50 djepa-loop": dict(solver="euler"),
    "euler-10": dict(solver="euler", head_steps=10),
    "heun-8": dict(solver="heun", head_steps=8),
    "heun-4": dict(solver="heun", head_steps=4),
    "midpoint-4": dict(solver="midpoint", head_steps=4),
    "midpoint-3": dict(solver="midpoint", head_steps=3),
    "midpoint-2": dict(solver="midpoint", head_steps=2),
    "midpoint-3 anneal-2": dict(solver="midpoint", head_steps=3, anneal="linear", min_head_steps=2),
    "midpoint-4 reuse-0": dict(solver="midpoint", head_steps=4, feature_reuse=0.0),
    "midpoint-4 reuse-0.2": dict(solver="midpoint", head_steps=4, feature_reuse=0.2),
    "official cfg-refresh-3": dict(cfg_refresh=3),
    "--fast": dict(fast=True),
}
B_SETTINGS = {
    "official": {},
    "ddim-25": dict(solver="ddim", head_steps=25),
    "dpm++2m-25": dict(solver="dpm++2m", head_steps=25),
    "dpm++2m-10": dict(solver="dpm++2m", head_steps=10),
    "dpm++2m-25 anneal-10": dict(solver="dpm++2m", head_steps=25, anneal="linear", min_head_steps=10),
    "dpm++2m-25 reuse-0": dict(solver="dpm++2m", head_steps=25, feature_reuse=0.0),
    "dpm++2m-25 reuse-0.2": dict(solver="dpm++2m", head_steps=25, feature_reuse=0.2),
    "official cfg-refresh-3": dict(cfg_refresh=3),
    "--fast": dict(fast=True),
}
GPU = torch.cuda.is_available()
# On a CPU the suite takes minutes (and trains the digits model first when runs/digits is missing):
# it runs there only when asked, so `djepa bench` / `pytest benchmarks` stay quick without a GPU.
if not GPU and os.environ.get("DJEPA_BENCH_SAMPLE_CPU", "0") != "1":
    pytest.skip("the sampling benchmark needs a CUDA GPU (none is visible), or DJEPA_BENCH_SAMPLE_CPU=1 to run "
                "it on the CPU (minutes)", allow_module_level=True)


def _select(universe):
    """The settings of `universe` named in $DJEPA_BENCH_SAMPLE_SETTINGS (all when unset)."""
    raw = os.environ.get("DJEPA_BENCH_SAMPLE_SETTINGS")
    if not raw:
        return list(universe)
    chosen = [x.strip() for x in raw.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in DIGITS_SETTINGS and x not in B_SETTINGS]
    if unknown:
        raise ValueError(f"DJEPA_BENCH_SAMPLE_SETTINGS: unknown {unknown}; choose from "
                         f"{sorted(set(DIGITS_SETTINGS) | set(B_SETTINGS))}")
    return [x for x in chosen if x in universe]


ROUNDS = int(os.environ.get("DJEPA_BENCH_SAMPLE_ROUNDS", "3"))
DEVICE = torch.device("cuda" if GPU else "cpu")
_reference = {}


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def digits():
    """(model, tokenizer, data, judge) of the trained digits run (trained first if missing)."""
    from djepa.data import build_dataset
    from djepa.evaluate import SampleJudge
    from djepa.train import TrainSettings, load_checkpoint, make_tokenizer, train

    folder = os.environ.get("DJEPA_BENCH_DIGITS", "runs/digits")
    if not os.path.isdir(folder):
        train(TrainSettings(preset="tiny", data="digits"), folder, progress=False)
    model, state = load_checkpoint(folder, device=DEVICE)
    tok = make_tokenizer(state["data"]["channels"], state["data"]["patch_size"])
    train_set, test_set = build_dataset("digits", "train"), build_dataset("digits", "test")
    return model, tok, state, SampleJudge(train_set, test_set, seed=0)


def _record(benchmark, group, name, kw, seconds, stats, quality=None):
    info = benchmark.extra_info
    info.update(seconds=seconds, device=torch.cuda.get_device_name() if GPU else "cpu",
                threads=torch.get_num_threads(), settings=kw, **{k: v for k, v in stats.items() if k != "head_steps"})
    info["head_steps_per_iteration"] = stats["head_steps"]
    if quality:
        info.update(quality)
    if name == "official":
        _reference[group] = info
    ref = _reference.get(group)
    if ref is not None and name != "official":
        info["speedup_vs_official"] = ref["seconds"] / seconds
        if quality:
            info["accuracy_change_points"] = 100 * (quality["sample_accuracy"] - ref["sample_accuracy"])
            info["frechet_change"] = quality["frechet_samples_vs_heldout"] / ref["frechet_samples_vs_heldout"] - 1


@pytest.fixture(scope="session")
def digits_runs(digits):
    """Every selected digits setting, run in turn for ROUNDS rounds (interleaved, so that a drift of
    a shared machine's speed touches every setting alike): name -> (wall seconds per round, CPU
    seconds per round, stats and images of the first round)."""
    from djepa.evaluate import timed_generate

    model, tok, state, _ = digits
    labels = torch.arange(10).repeat_interleave(50)
    out = {}
    for _ in range(ROUNDS):
        for name in _select(DIGITS_SETTINGS):
            images, seconds, stats = timed_generate(model, tok, labels, state["data"]["image_size"], num_iter=16,
                                                    cfg=3.0, seed=0, batch_size=500, sampler=DIGITS_SETTINGS[name])
            prev = out.setdefault(name, ([], [], stats, images))
            prev[0].append(seconds)
            prev[1].append(stats["cpu_seconds"])
    return out, labels


@pytest.mark.parametrize("name", _select(DIGITS_SETTINGS))
def test_sample_digits(benchmark, digits, digits_runs, name):
    judge = digits[3]
    runs, labels = digits_runs
    benchmark.group = "digits (tiny preset, flow head): 500 samples, 16 iterations, cfg 3"
    seconds, cpu, stats, images = runs[name]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # timed in digits_runs, interleaved
    quality = judge.score(images, labels)
    quality.pop("sample_accuracy_per_class")
    stats = dict(stats, cpu_seconds=statistics.median(cpu))
    _record(benchmark, "digits", name, DIGITS_SETTINGS[name], statistics.median(seconds), stats, quality)
    benchmark.extra_info.update(seconds_per_round=seconds, cpu_seconds_per_round=cpu,
                                ms=1e3 * statistics.median(seconds))
    ref = runs.get("official")
    if ref is not None and name != "official":
        ratios = [a / b for a, b in zip(ref[0], seconds)]
        cpu_ratios = [a / b for a, b in zip(ref[1], cpu)]
        benchmark.extra_info.update(speedup_per_round=ratios, speedup_vs_official=statistics.median(ratios),
                                    cpu_speedup_per_round=cpu_ratios,
                                    cpu_speedup_vs_official=statistics.median(cpu_ratios))


@pytest.mark.parametrize("name", _select(B_SETTINGS))
def test_sample_b_preset(benchmark, name):
    from djepa.models import build
    from djepa.models.sampler import SamplingStats

    batch = int(os.environ.get("DJEPA_BENCH_B_BATCH", "16" if GPU else "1"))
    num_iter = int(os.environ.get("DJEPA_BENCH_B_ITER", "64" if GPU else "4"))
    torch.manual_seed(0)
    model = build("B").to(DEVICE).eval()
    benchmark.group = f"B preset (Gaussian head, random weights): {batch} samples, {num_iter} iterations, cfg 3"
    labels = torch.arange(batch, device=DEVICE) % model.config.num_classes
    kw = B_SETTINGS[name]
    out = {}

    def run():
        stats = SamplingStats()
        _sync()
        start = time.perf_counter()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=GPU):
            model.sample(labels, num_iter=num_iter, cfg_scale=3.0, generator=torch.Generator(DEVICE).manual_seed(0),
                         stats=stats, **kw)
        _sync()
        out["seconds"], out["stats"] = time.perf_counter() - start, stats.as_dict()

    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, "B", name, kw, out["seconds"], out["stats"])


# ----------------------------------------------------------------------------- rendering
def render(path, out_dir, plot_dir=None):
    """A Markdown table per group (into out_dir) and a quality-vs-time plot of the digits group
    (sampling_quality_vs_time.png, into plot_dir; default out_dir)."""
    import json

    data = json.load(open(path))
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append((b["name"].split("[", 1)[-1].rstrip("]"), b["extra_info"]))
    lines = [f"# Sampling settings: time and quality ({os.path.basename(path)})", ""]
    for group, rows in groups.items():
        quality = any("sample_accuracy" in info for _, info in rows)
        cpu = all("cpu_seconds" in info for _, info in rows)
        head = "| setting | seconds (median) | x official (per-round range) |"
        head += " CPU seconds | x official (CPU) |" if cpu else ""
        head += " encoder/predictor rows | head evaluations | head rows |"
        head += " judged accuracy | Fréchet distance |" if quality else ""
        lines += [f"## {group}", "", head, "|---|---:|---:|" + ("---:|---:|" if cpu else "") + "---:|---:|---:|"
                  + ("---:|---:|" if quality else "")]
        for name, info in rows:
            speed = f"{info.get('speedup_vs_official', 1.0):.2f}"
            if info.get("speedup_per_round"):
                speed += f" ({min(info['speedup_per_round']):.2f}-{max(info['speedup_per_round']):.2f})"
            cells = [name, f"{info['seconds']:.2f}", speed]
            if cpu:
                cells += [f"{info['cpu_seconds']:.2f}", f"{info.get('cpu_speedup_vs_official', 1.0):.2f}"]
            cells += [f"{info['encoder_rows'] + info['predictor_rows']:,}", f"{info['head_evaluations']:,}",
                      f"{info['head_rows']:,}"]
            if quality:
                cells += [f"{100 * info['sample_accuracy']:.1f}%", f"{info['frechet_samples_vs_heldout']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    md = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    digits = next((rows for g, rows in groups.items() if g.startswith("digits")), None)
    png = None
    if digits:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in ((axes[0], "sample_accuracy", "judged accuracy (%)"),
                               (axes[1], "frechet_samples_vs_heldout", "Fréchet distance (lower is better)")):
            for name, info in digits:
                y = 100 * info[key] if key == "sample_accuracy" else info[key]
                ax.scatter(info["seconds"], y, color="C3" if name in ("official", "--fast") else "C0")
                ax.annotate(name, (info["seconds"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("sampling seconds (500 digits)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle("digits model: quality vs sampling time per setting")
        fig.tight_layout()
        png = os.path.join(plot_dir or out_dir, "sampling_quality_vs_time.png")
        fig.savefig(png, dpi=120)
    return md, png


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", required=True, metavar="JSON")
    p.add_argument("--out", default=None, help="folder for the .md (default: beside the JSON)")
    p.add_argument("--plot-dir", default=None, help="folder for the .png (default: --out)")
    a = p.parse_args()
    print(*render(a.render, a.out or os.path.dirname(os.path.abspath(a.render)), a.plot_dir), sep="\n")
