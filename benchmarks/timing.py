"""Wall-clock timing shared by the benchmarks."""
from __future__ import annotations

import time


def best_times(fns, repeats: int) -> list[float]:
    """Fastest wall time of each function over ``repeats`` rounds; the functions alternate within a
    round so a change of machine load hits them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [min(t) for t in times]
