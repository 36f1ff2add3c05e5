"""A pytest-benchmark JSON rendered for people: a Markdown table and a PNG beside it; and what
every benchmark JSON records about the machine it ran on (`machine_info`).

Rows are grouped as the suites group them (one group = one shape/case); each row shows the
median time, the time relative to the fastest path of its group, and the metrics the suite put
in `extra_info` (GB/s, TFLOP/s, fractions of the physical limit, speed-ups over peers). The
Markdown opens with the machine (GPU, driver, versions, djepa._C build, commit). A tuning table
(`djepa tune`) is rendered too: one Markdown table of its measurements, no PNG.
"""
import json
import math
import os
import subprocess

_METRIC_ORDER = ("gb_per_s", "fraction_of_copy_bw", "tflops", "fraction_of_matmul", "images_per_s")


class ReportError(ValueError):
    pass


# ----------------------------------------------------------------------------- machine info
def _run(cmd, cwd=None):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(root=None) -> dict:
    """{"commit", "dirty", "from"} of the checkout at `root` (default: the one djepa is imported
    from, else the working directory).
    Where there is no git (the GPU machine gets a copy of the tree without .git), the commit
    and dirty flag of the build record that tools/gpu_run.sh exports ($DJEPA_GIT_COMMIT,
    $DJEPA_GIT_DIRTY), said so."""
    if root is None:
        import djepa

        source = os.path.dirname(os.path.dirname(os.path.abspath(djepa.__file__)))
        root = source if os.path.exists(os.path.join(source, ".git")) else os.getcwd()
    commit = _run(["git", "-C", root, "rev-parse", "HEAD"])
    if commit:
        status = _run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
        return {"commit": commit, "dirty": None if status is None else bool(status), "from": "git"}
    if os.environ.get("DJEPA_GIT_COMMIT"):
        dirty = os.environ.get("DJEPA_GIT_DIRTY", "").lower()
        return {"commit": os.environ["DJEPA_GIT_COMMIT"], "dirty": None if not dirty else dirty in ("1", "true"),
                "from": "the build record of the carried djepa._C (no git here)"}
    return {"commit": None, "dirty": None, "from": "unknown: no git and no build record"}


def machine_info(root=None) -> dict:
    """What a benchmark ran on: the GPU and its driver, CUDA, torch, triton, djepa, djepa._C's
    build (CUDA version of its nvcc, archs, sm_90a ops), whether the sm_90a kernels were on and
    their attention design, and the git commit and dirty flag of the code (see git_state)."""
    import platform

    import torch

    import djepa
    from djepa import backends

    gpu = torch.cuda.is_available()
    info = {"gpu": None, "gpu_capability": None, "gpu_driver": None, "cuda_driver_api": None}
    if gpu:
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = list(torch.cuda.get_device_capability())
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["gpu_driver"] = smi.splitlines()[0].strip() if smi else None
        try:
            info["cuda_driver_api"] = int(torch._C._cuda_getDriverVersion())
        except Exception:  # a CPU build of torch (the fake GPU of tools/fake_gpu), an old torch
            pass
    tri = backends.triton_module()
    ext = backends.cuda_extension()
    info.update({
        "cuda": torch.version.cuda, "torch": torch.__version__, "triton": tri.__version__ if tri else None,
        "djepa": djepa.__version__, "python": platform.python_version(),
        "djepa_C": ({"nvcc": ext.cuda_version, "archs": ext.cuda_archs,
                     "wgmma_ops": list(getattr(ext, "wgmma_ops", ()))} if ext is not None
                    else {"error": backends.cuda_extension_error()}),
        "sm90_kernels": backends.sm90_kernels_enabled(),
        "sm90_attention": _sm90_attention(),
        "git": git_state(root),
    })
    record = os.environ.get("DJEPA_BUILD_RECORD")
    if record and os.path.isfile(record):
        try:
            with open(record) as f:
                info["djepa_C"]["build_record"] = json.load(f)
        except (OSError, ValueError):
            pass
    return info


def _sm90_attention():
    """The sm_90a attention design the ops run (DJEPA_SM90_ATTENTION), or "invalid: ..."."""
    from djepa import backends

    try:
        return backends.sm90_attention_design()
    except ValueError as exc:
        return f"invalid: {exc}"


def machine_line(info: dict) -> str:
    """One line of machine_info for a report's head."""
    if not info:
        return "machine: not recorded"
    c = info.get("djepa_C") or {}
    build = f"_C {c.get('nvcc')} for {c.get('archs')}" if "archs" in c else "no _C"
    git = info.get("git") or {}
    commit = (git.get("commit") or "?")[:12] + ("+dirty" if git.get("dirty") else "")
    return (f"{info.get('gpu')} (driver {info.get('gpu_driver')}, CUDA {info.get('cuda')}), torch {info.get('torch')}, "
            f"triton {info.get('triton')}, djepa {info.get('djepa')} ({build}; sm_90a kernels "
            f"{'on' if info.get('sm90_kernels', True) else 'off'}{_attention_design(info)}), commit {commit}")


def _attention_design(info: dict) -> str:
    on = info.get("sm90_kernels", True) and info.get("sm90_attention")
    return f", attention {info['sm90_attention']}" if on else ""


# ----------------------------------------------------------------------------- benchmark JSON
def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read benchmark JSON {path!r}: {exc}") from exc


def load(path: str) -> list:
    """[(group, name, median_ms, extra_info)] of a pytest-benchmark JSON file."""
    data = _read(path)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path!r} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    rows = []
    for b in data["benchmarks"]:
        try:
            median = float(b["stats"]["median"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path!r}: benchmark {b.get('name')!r} has no stats.median") from exc
        extra = b.get("extra_info") or {}
        ms = float(extra["ms"]) if isinstance(extra.get("ms"), (int, float)) else median * 1e3
        rows.append((b.get("group") or "(no group)", b.get("name", "?"), ms, extra))
    return rows


def _fmt(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"


def markdown(rows: list, title: str = "", machine=None, notes=()) -> str:
    groups = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    lines = [f"# {title}", ""] if title else []
    if machine is not None:
        lines += [machine_line(machine), ""]
    lines += [f"**{n}**" for n in notes] + ([""] if notes else [])
    for group, members in groups.items():
        best = min(m[2] for m in members)
        keys = [k for k in _METRIC_ORDER if any(k in m[3] for m in members)]
        keys += sorted({k for m in members for k in m[3] if k.startswith("speedup")})
        lines += [f"## {group}", "", "| path | median ms | x fastest | " + " | ".join(keys) + " |",
                  "|---|---:|---:|" + "---:|" * len(keys)]
        for _, name, ms, extra in sorted(members, key=lambda m: m[2]):
            cells = [_fmt(extra[k]) if k in extra else "" for k in keys]
            lines.append(f"| {name} | {ms:.4g} | {ms / best:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(rows: list, png: str, title: str = "") -> str:
    """Horizontal bars of median time per path, one panel per group (at most 24 panels)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    names = list(groups)[:24]
    cols = 2 if len(names) > 1 else 1
    nrows = math.ceil(len(names) / cols)
    height = max(2.0, sum(0.25 * len(groups[g]) + 0.8 for g in names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(11 if cols == 2 else 6, height), dpi=110, squeeze=False)
    for ax, group in zip(axes.flat, names):
        members = sorted(groups[group], key=lambda m: -m[2])
        ax.barh([m[1].split("[")[-1].rstrip("]") for m in members], [m[2] for m in members],
                color=["#d62728" if "djepa" in m[1] else "#7f7f7f" for m in members])
        ax.set_title(group, fontsize=8)
        ax.set_xlabel("median ms (lower is better)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def tune_markdown(data: dict, title: str = "") -> str:
    """A tuning table (djepa tune) as Markdown: one row per measured bucket."""
    lines = [f"# {title}", ""] if title else []
    state = "complete" if data.get("complete", True) else f"partial: {data.get('partial', 'cut short')}"
    lines += [f"{data.get('gpu')}, torch {data.get('torch')}, triton {data.get('triton')}, djepa {data.get('djepa')}, "
              f"djepa._C {data.get('c_build')}, sm_90a kernels {'off' if data.get('sm90_kernels') is False else 'on'}"
              f"{_attention_design(data)}; "
              f"{len(data['entries'])} entries ({state}); created {data.get('created')}", "",
              "| op | dtype | bucket | shape | fastest | cuda ms | triton ms | eager ms | not served |",
              "|---|---|---|---|---|---:|---:|---:|---|"]
    for e in data["entries"]:
        b = e["bucket"]
        key = "-".join(str(v) if isinstance(v, str) else f"{k}{v}" for k, v in b.items())
        ms = [_fmt(e["ms"][k]) if k in e["ms"] else "" for k in ("cuda", "triton", "eager")]
        if e.get("sm90_attention") and ms[0]:  # cuda under each sm_90a attention design
            ms[0] += " (" + ", ".join(f"{d} {_fmt(t)}" for d, t in e["sm90_attention"].items()) + ")"
        unserved = "; ".join(f"{k}: {str(v)[:80]}" for k, v in (e.get("unserved") or {}).items())
        lines.append(f"| {e['op']} | {e['dtype']} | {key} | {e.get('shape', '')} | {e['backend']} | "
                     + " | ".join(ms) + f" | {unserved} |")
    return "\n".join(lines)


def render(json_path: str) -> tuple:
    """Write `<json>.md` and `<json>.png` beside the JSON; returns their paths (the PNG's is None
    for a tuning table, which is rendered as Markdown only)."""
    from djepa import tune_table

    data = _read(json_path)
    stem = os.path.splitext(json_path)[0]
    title = os.path.basename(stem)
    if tune_table.is_table(data):
        if not data["entries"]:
            raise ReportError(f"{json_path!r}: a tuning table without entries (nothing was timed)")
        with open(stem + ".md", "w") as f:
            f.write(tune_markdown(data, title) + "\n")
        return stem + ".md", None
    rows = load(json_path)
    if not rows:
        raise ReportError(f"{json_path!r} holds no benchmarks (were they all skipped?)")
    notes = []
    if data.get("partial"):
        notes.append("partial: the session ended before pytest-benchmark wrote its JSON")
    if data.get("cuda_error"):
        err = data["cuda_error"]
        notes.append(f"CUDA error in {err.get('case')} (charged to djepa): {err.get('error')}; the suite stopped there")
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, title, data.get("machine_info"), notes) + "\n")
    return stem + ".md", figure(rows, stem + ".png", title)
