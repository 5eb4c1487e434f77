"""Compile time of one jitted update: lora_muon (gram, paper) vs optax.adamw.

Run:      python benchmarks/compile_time.py            (~3-6 min on a 2-core CPU)
          python benchmarks/compile_time.py --quick    (smoke: < 1 min)
Hardware: measured on a 2-core x86-64 VM (CPU backend, float32), shared with other jobs.
Expected: a table of trace+lower and XLA compile seconds per optimizer for (i) 1, 4, 8
          distinct pair shapes and (ii) 8, 64, 224 equal-shape pairs, plus the HLO size.

Every measurement uses fresh shapes (a new width per row, never seen before in the
process) and no persistent compilation cache, so each row pays the full compile.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import jax
import numpy as np
import optax

import lora_muon_jax
from lora_muon_jax import lora_muon

_fresh = itertools.count(0)


def adapters(shapes: list[tuple[int, int]], rank: int) -> dict[str, Any]:
    key = jax.random.key(0)
    tree = {}
    for i, (d_in, d_out) in enumerate(shapes):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        tree[f"l{i}"] = {
            "lora_a": jax.random.normal(ka, (d_in, rank)) / np.sqrt(d_in),
            "lora_b": jax.random.normal(kb, (rank, d_out)) / np.sqrt(rank),
        }
    return tree


def measure(opt: optax.GradientTransformation, params: Any) -> tuple[float, float, int]:
    """(trace + lower seconds, XLA compile seconds, HLO ops) of ``jit(update)``."""
    state = opt.init(params)
    grads = jax.tree.map(lambda x: 0.1 * x, params)

    def update(g: Any, s: Any, p: Any) -> Any:
        return opt.update(g, s, p)

    t0 = time.perf_counter()
    lowered = jax.jit(update).lower(grads, state, params)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    ops = lowered.as_text().count(" = ")
    return t1 - t0, t2 - t1, ops


OPTIMIZERS = {
    "optax.adamw": lambda: optax.adamw(1e-3),
    "lora_muon gram": lambda: lora_muon(0.1),
    "lora_muon paper": lambda: lora_muon(0.1, method="paper"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sets (smoke)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, lora_muon_jax "
        f"{lora_muon_jax.__version__} ({lora_muon_jax.__file__}), "
        f"device {jax.devices()[0].device_kind}, config {vars(args)}"
    )
    names = list(OPTIMIZERS) if args.only is None else args.only.split(",")
    for name in names:  # warm-up: the first compile in a process pays one-time costs
        measure(OPTIMIZERS[name](), adapters([(40, 44)], args.rank))
    distinct = (1, 4) if args.quick else (1, 4, 8)
    equal = (8, 64) if args.quick else (8, 64, 224)
    rows: list[tuple[str, list[int | tuple[int, int]]]] = []
    for k in distinct:
        base = 128 + 8 * next(_fresh) * 16
        rows.append((f"{k} distinct shapes", [(base + 8 * j, base + 8 * j + 4) for j in range(k)]))
    for n in equal:
        w = 128 + 8 * next(_fresh) * 16 + 2
        rows.append((f"{n} equal pairs", [(w, w)] * n))
    print("\n| case | optimizer | trace+lower (s) | XLA compile (s) | total (s) | HLO ops |")
    print("|---|---|---|---|---|---|")
    for title, shapes in rows:
        for name in names:
            # A fresh width per optimizer too: nothing is shared with a previous row.
            bump = 2 * (1 + names.index(name))
            params = adapters([(m + bump, n + bump) for m, n in shapes], args.rank)  # type: ignore[misc]
            lower_s, compile_s, ops = measure(OPTIMIZERS[name](), params)
            print(
                f"| {title} | {name} | {lower_s:.2f} | {compile_s:.2f} | "
                f"{lower_s + compile_s:.2f} | {ops} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
