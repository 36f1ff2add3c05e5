"""The shapes that make a kernel variant hot: the presets' (tiny/B/L/H) and the benchmarks'
(read from benchmarks/test_bench_*.py without importing them: they need a GPU)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench_attention_assignments():
    """{name: value expression} of the module-level assignments of benchmarks/test_bench_attention.py."""
    tree = ast.parse((ROOT / "benchmarks" / "test_bench_attention.py").read_text())
    return {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def bench_attention_shapes():
    """SHAPES of benchmarks/test_bench_attention.py (read, not imported: it needs a GPU)."""
    found = _bench_attention_assignments()
    if "SHAPES" not in found:
        raise RuntimeError("benchmarks/test_bench_attention.py has no SHAPES dict")
    return ast.literal_eval(found["SHAPES"])


def bench_attention_dropout():
    """({id: (B, N, H, D)}, p): the shapes and dropout_p of the attention benchmark's dropout
    mode (DROPOUT_SHAPES, DROPOUT_P; no shapes when MODES has no "fwdbwd-dropout")."""
    found = _bench_attention_assignments()
    missing = [n for n in ("MODES", "DROPOUT_P", "DROPOUT_SHAPES") if n not in found]
    if missing:
        raise RuntimeError(f"benchmarks/test_bench_attention.py has no {', '.join(missing)}")
    shapes = bench_attention_shapes()
    p = float(ast.literal_eval(found["DROPOUT_P"]))
    if "fwdbwd-dropout" not in ast.literal_eval(found["MODES"]):
        return {}, p
    # DROPOUT_SHAPES is an expression over SHAPES (a comprehension): evaluated with nothing else in scope
    expr = ast.Expression(found["DROPOUT_SHAPES"])
    ids = eval(compile(expr, "test_bench_attention.py:DROPOUT_SHAPES", "eval"), {"__builtins__": {}},  # noqa: S307
               {"SHAPES": shapes})
    return {sid: shapes[sid] for sid in ids}, p


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

