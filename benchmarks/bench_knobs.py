"""Environment knobs of the benchmark suites."""
import os


def select(env, universe):
    """The comma-separated subset of `universe` named by $env (all of it when unset)."""
    raw = os.environ.get(env)
    if not raw:
        return list(universe)
    chosen = [x.strip() for x in raw.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in universe]
    if unknown:
        raise ValueError(f"{env}: unknown {unknown}; choose from {list(universe)}")
    return chosen
