"""A pytest-benchmark JSON rendered for people: a Markdown table and a PNG beside it.

Rows are grouped as the suites group them (one group = one shape/case); each row shows the
median time, the time relative to the fastest path of its group, and the metrics the suite put
in `extra_info` (GB/s, TFLOP/s, fractions of the physical limit, speed-ups over peers).
"""
import json
import math
import os

_METRIC_ORDER = ("gb_per_s", "fraction_of_copy_bw", "tflops", "fraction_of_matmul", "images_per_s")


class ReportError(ValueError):
    pass


def load(path: str) -> list:
    """[(group, name, median_ms, extra_info)] of a pytest-benchmark JSON file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read benchmark JSON {path!r}: {exc}") from exc
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


def markdown(rows: list, title: str = "") -> str:
    groups = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    lines = [f"# {title}", ""] if title else []
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


def render(json_path: str) -> tuple:
    """Write `<json>.md` and `<json>.png` beside the JSON; returns their paths."""
    rows = load(json_path)
    if not rows:
        raise ReportError(f"{json_path!r} holds no benchmarks (were they all skipped?)")
    stem = os.path.splitext(json_path)[0]
    title = os.path.basename(stem)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, title) + "\n")
    return stem + ".md", figure(rows, stem + ".png", title)
