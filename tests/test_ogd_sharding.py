"""LoRA-Muon-OGD on 8 CPU devices: sharded == unsharded, and no factor moves between devices.

The layouts, meshes and helpers of ``tests/test_sharding.py``: FSDP along m on an Auto
mesh and Megatron tensor parallel (factors over fsdp and over tp) on an Explicit one, with
plain and scanned factors and a fallback leaf. The constraint bases come from a finished
"task" (``ogd_bases_from_delta`` on the unsharded parameters, ``update_ogd_bases``), are
placed replicated (they are m×k and n×k with k <= r) and the dual is nonzero after the
first step. Oracles: the same steps on one device; the compiled step's collectives —
all-reduces only, each of r×r, k×r or k×k blocks (or per-pair scalars), never a gather,
scatter or permute of a factor.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from lora_muon_jax import lora_muon_ogd, ogd_bases_from_delta, update_ogd_bases
from lora_muon_jax import sharding as lms
from lora_muon_jax.testing import hlo_collectives
from tests.test_sharding import (
    LAYERS,
    STACK,
    R,
    assert_same_layout,
    assert_trees_close,
    gradient_noise,
    layout_specs,
    make_mesh,
    make_params,
    make_step,
)

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: tests/conftest.py sets jax_num_cpu_devices=8 before JAX starts",
)

K = 2  # bases per pair (capacity), k < r


def make_opt():  # type: ignore[no-untyped-def]
    return lora_muon_ogd(0.1, num_bases=K, dual_step_size=0.5, fallback_learning_rate=1e-2)


def task_bases(params: dict) -> dict:
    """The bases a finished task leaves: top-K directions of a random factor move."""
    moved = jax.tree.map(lambda p, n: p + 0.3 * n, params, gradient_noise(params, 1)[0])
    return ogd_bases_from_delta(moved, params, K)


def reference_run(params: dict) -> dict:
    opt = make_opt()
    state = update_ogd_bases(opt.init(params), task_bases(params))
    step = jax.jit(make_step(opt))
    for noise in gradient_noise(params):
        params, state = step(params, state, noise)
    return params


@pytest.mark.parametrize(("mesh_kind", "layout"), [("auto", "fsdp_m"), ("explicit", "tp")])
def test_sharded_ogd_steps_equal_unsharded(mesh_kind: str, layout: str) -> None:
    mesh = make_mesh(mesh_kind)
    params = make_params()
    want = reference_run(params)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), layout_specs(params, layout))
    opt = make_opt()
    state_shardings = lms.optimizer_state_shardings(opt, params, shardings)
    state = update_ogd_bases(opt.init(params), task_bases(params))
    state = jax.device_put(state, state_shardings)
    sharded = jax.device_put(params, shardings)
    noises = [jax.device_put(n, shardings) for n in gradient_noise(params)]
    step = jax.jit(
        make_step(opt),
        in_shardings=(shardings, state_shardings, shardings),
        out_shardings=(shardings, state_shardings),
    )
    compiled = step.lower(sharded, state, noises[0]).compile().as_text()
    for noise in noises:
        sharded, state = step(sharded, state, noise)
    assert_trees_close(sharded, want)
    assert_same_layout(sharded, shardings)
    assert_same_layout(state, state_shardings)
    # The bases did constrain the steps: a nonzero dual on every pair.
    ogd = state.inner_states["lora"].inner_state[0]
    assert all(float(np.abs(np.asarray(d)).max()) > 0 for d in ogd.dual.values())

    collectives = hlo_collectives(compiled)
    assert [c for c in collectives if c.kind != "all-reduce"] == []  # no factor moves
    pairs = 2 * LAYERS + STACK
    small = {(R, R), (K, R), (R, K), (K, K)}
    for c in collectives:
        for _, dims in c.shapes:
            blocks = len(dims) >= 2 and dims[-2:] in small
            per_pair_scalars = len(dims) == 1 and dims[0] <= pairs
            assert blocks or per_pair_scalars or dims == (), c
