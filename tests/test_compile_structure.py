"""The compiled step's kernels do not grow with the number of equal-shape adapters.

XLA's CPU backend compiles every distinct fusion once (tens of ms each on a
small CPU) and identical ones once for all their uses, so the number of
*distinct* fusions is what compile time grows with (benchmarks/step_time.py
measures the seconds). Equal-shape pairs are stacked; the stacked results are
split back at runtime offsets (``_stacking.runtime_offsets``) so every pair's
tail (slice, scale, decay, ``apply_updates``) is the same kernel. With static
slice offsets each pair had its own kernels: 114 distinct fusions at 8 pairs and
154 at 32 (``method="gram"``), 64 and 109 (``"paper"``), measured at the commit
before the runtime offsets (03135c6); after: 97 and 89 (``"gram"``), 53 and 50
(``"paper"``). This counts kernels, not seconds: the instructions per pair still grow
(369 → 472 fusion calls), and compile time with them (benchmarks/step_time.py).
"""

from __future__ import annotations

import re

import jax
import optax
import pytest

from lora_muon_jax import lora_muon


def _fusions(hlo_text: str) -> tuple[int, int]:
    """(fusions called, distinct fused computations) of a compiled HLO module's text.

    Two fused computations are the same kernel when their bodies agree up to
    instruction names and metadata.
    """
    bodies: dict[str, str] = {}
    name, lines = None, []
    for line in hlo_text.splitlines():
        header = re.match(r"^%?([\w.\-]+) \(.*\{$", line)
        if header:
            name, lines = header.group(1), []
        elif name is not None and line == "}":
            bodies[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)

    def canonical(body: str) -> str:
        body = re.sub(r", metadata=\{[^}]*\}", "", body)
        return re.sub(r"%[\w.\-]+", "%x", body)

    # One fusion call per line; its result type may be a tuple with spaces (multi-output).
    called = re.findall(
        r"^\s*(?:ROOT )?%?[\w.\-]+ = .*? fusion\(.*?calls=%?([\w.\-]+)", hlo_text, re.M
    )
    return len(called), len({canonical(bodies[c]) for c in called})


def _compiled_step(num_pairs: int, method: str) -> str:
    key = jax.random.key(0)
    params = {
        f"layer{i}": {
            "lora_a": jax.random.normal(jax.random.fold_in(key, i), (64, 4)) / 8,
            "lora_b": jax.random.normal(jax.random.fold_in(key, 1000 + i), (4, 48)) / 2,
        }
        for i in range(num_pairs)
    }
    opt = lora_muon(0.1, method=method)
    grads = jax.tree.map(lambda x: 0.1 * x, params)

    def step(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    donated = jax.jit(step, donate_argnums=(0, 1))
    return donated.lower(params, opt.init(params), grads).compile().as_text()


@pytest.mark.parametrize("method", ["gram", "paper"])
def test_distinct_kernels_do_not_grow_with_equal_shape_pairs(method: str) -> None:
    few_calls, few_distinct = _fusions(_compiled_step(8, method))
    many_calls, many_distinct = _fusions(_compiled_step(32, method))
    assert many_calls > few_calls  # the per-pair kernels are there, called once per pair
    assert many_distinct <= few_distinct, (few_distinct, many_distinct)
