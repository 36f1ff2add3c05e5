"""The shapes that make a kernel variant hot: the presets' (tiny/B/L/H) and the benchmarks'
(read from benchmarks/test_bench_*.py without importing them: they need a GPU)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_attention_shapes():
    """SHAPES of benchmarks/test_bench_attention.py (read, not imported: it needs a GPU)."""
    tree = ast.parse((ROOT / "benchmarks" / "test_bench_attention.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SHAPES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("benchmarks/test_bench_attention.py has no SHAPES dict")


def bench_denoise_sizes():
    """The default token counts of benchmarks/test_bench_denoise.py (DJEPA_BENCH_DENOISE_M)."""
    text = (ROOT / "benchmarks" / "test_bench_denoise.py").read_text()
    m = re.search(r'"DJEPA_BENCH_DENOISE_M",\s*"([\d,]+)"', text)
    t = re.search(r'"DJEPA_BENCH_DENOISE_TRAIN_M",\s*"(\d+)"', text)
    if not m or not t:
        raise RuntimeError("benchmarks/test_bench_denoise.py: default sizes not found")
    return [int(s) for s in m.group(1).split(",")], int(t.group(1))


def bench_ema_presets():
    text = (ROOT / "benchmarks" / "test_bench_ema.py").read_text()
    m = re.search(r'"DJEPA_BENCH_EMA_PRESETS",\s*"([\w,]+)"', text)
    if not m:
        raise RuntimeError("benchmarks/test_bench_ema.py: default presets not found")
    return m.group(1).split(",")


def hot_shapes():
    """Head dims and denoise widths the presets and benchmarks launch."""
    from djepa.models.presets import PRESETS

    dims = {c.embed_dim // c.num_heads for c in PRESETS.values()}
    dims |= {c.pred_embed_dim // c.pred_num_heads for c in PRESETS.values()}
    dims |= {D for (_, _, _, D) in bench_attention_shapes().values()}
    widths = {c.diffloss_width for c in PRESETS.values()}
    return dims, widths

