"""optax interoperability of ``lora_muon`` on trees that really contain LoRA pairs.

``test_optax_common.py`` runs optax's generic checks, whose targets have no LoRA
pair (everything goes to the AdamW fallback). Here the same properties are
checked on a tree with a flax-style pair, a stacked qwix-style pair with a
3-D ``lora_b`` and a non-LoRA bias, plus chains, schedules, error messages,
convergence and the split-weight-decay identity (docs/algorithm.md).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_muon_jax
from lora_muon_jax import ScaleByLoRAMuonState, lora_muon

METHODS = ("gram", "paper")

# Shapes: a flax pair (in=32, r=4, out=16); a stack of 3 qwix einsum pairs
# ('bd,dnh->bnh': d=32, r=4, n=8, h=2); a non-LoRA bias.
SHAPES = {
    "layer": {"lora_a": (32, 4), "lora_b": (4, 16)},
    "stack": {"kernel_lora_a": (3, 32, 4), "kernel_lora_b": (3, 4, 8, 2)},
    "bias": (16,),
}


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_params(seed: int = 0, dtype=jnp.float32):
    shapes, treedef = jax.tree_util.tree_flatten(SHAPES, is_leaf=_is_shape)
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    leaves = [
        (jax.random.normal(k, s, jnp.float32) / np.sqrt(s[-1])).astype(dtype)
        for k, s in zip(keys, shapes, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


_X = jax.random.normal(jax.random.key(100), (8, 32), jnp.float32)
_T1 = jax.random.normal(jax.random.key(101), (8, 16), jnp.float32)
_T2 = jax.random.normal(jax.random.key(102), (8, 3, 8, 2), jnp.float32)


def loss_fn(params) -> jax.Array:
    """Regression through both pairs; math in float32 whatever the params' dtype."""
    p = jax.tree.map(lambda v: v.astype(jnp.float32), params)
    h = _X @ p["layer"]["lora_a"] @ p["layer"]["lora_b"] + p["bias"][None, :]
    y = jnp.einsum(
        "bd,ldr,lrnh->blnh", _X, p["stack"]["kernel_lora_a"], p["stack"]["kernel_lora_b"]
    )
    return jnp.mean(jnp.square(h - _T1)) + jnp.mean(jnp.square(y - _T2))


grad_fn = jax.grad(loss_fn)


def run(opt, params, steps: int, *, jit: bool = True):
    """``steps`` updates; returns the final params and state."""

    def step(p, s):
        updates, s = opt.update(grad_fn(p), s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step) if jit else step
    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def assert_trees_close(x, y, *, rtol: float, atol: float = 0.0) -> None:
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(y), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(b, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=jax.tree_util.keystr(path),
        )


def shape_dtypes(tree):
    """(shape, dtype) per leaf; works on arrays and on jax.ShapeDtypeStruct."""
    return jax.tree.map(lambda v: (tuple(v.shape), jnp.dtype(v.dtype)), tree)


def leaves_named(tree, name: str) -> list[tuple[str, jax.Array]]:
    """Leaves under a NamedTuple field ``name`` (e.g. every momentum ``mu``)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(isinstance(k, jax.tree_util.GetAttrKey) and k.name == name for k in path):
            out.append((jax.tree_util.keystr(path), leaf))
    return out


def lora_muon_states(tree) -> list[ScaleByLoRAMuonState]:
    return [
        x
        for x in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, ScaleByLoRAMuonState))
        if isinstance(x, ScaleByLoRAMuonState)
    ]


# ---------------------------------------------------------------------------
# optax's interop battery, on a tree with LoRA pairs
# ---------------------------------------------------------------------------


def test_pairs_in_the_test_tree() -> None:
    """The tree exercises a 2-D pair, a stacked 3-D pair and the fallback."""
    pairs = lora_muon_jax.find_lora_pairs(make_params())
    assert sorted((p.a_shape, p.b_shape, p.dims.num_batch_axes) for p in pairs) == [
        ((3, 32, 4), (3, 4, 8, 2), 1),
        ((32, 4), (4, 16), 0),
    ]
    labels = lora_muon_jax.lora_param_labels(make_params())
    assert labels["bias"] == "fallback"
    assert labels["stack"]["kernel_lora_b"] == "lora"


def test_no_recompile_on_second_update() -> None:
    opt = lora_muon(0.05, fallback_learning_rate=0.05)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        updates, s = opt.update(grad_fn(p), s, p, an_extra_arg_nobody_expects=1)
        return optax.apply_updates(p, updates), s

    params = make_params()
    state = opt.init(params)
    params, state = step(params, state)
    assert len(traces) == 1
    params2, state2 = step(params, state)
    assert len(traces) == 1, "second update retraced (state or param types changed)"
    assert shape_dtypes(state2) == shape_dtypes(state)
    # And it moved: the LoRA factors change on the second step.
    assert not np.allclose(params2["layer"]["lora_a"], params["layer"]["lora_a"])


def test_map_params_maps_every_momentum() -> None:
    opt = lora_muon(0.05, fallback_learning_rate=0.05)
    _, state = run(opt, make_params(), 2)
    mapped = optax.tree.map_params(opt, lambda v: jnp.full_like(v, 7.0), state)
    mus = leaves_named(mapped, "mu") + leaves_named(mapped, "nu")
    names = sorted(name for name, _ in mus)
    # One LoRA-Muon momentum per factor (no second moments) + AdamW's mu and nu for the bias.
    assert len(names) == 6, names
    assert sum("lora" in n for n in names) == 4, names
    for name, leaf in mus:
        np.testing.assert_array_equal(np.asarray(leaf), 7.0, err_msg=name)
    # Non-param fields are untouched.
    np.testing.assert_array_equal(
        [int(c) for _, c in leaves_named(mapped, "count")],
        [int(c) for _, c in leaves_named(state, "count")],
    )
    assert all(int(c) == 2 for _, c in leaves_named(state, "count"))


def test_inject_hyperparams_identical() -> None:
    method = "paper"  # a non-numeric argument: must stay static under injection
    hparams = dict(
        learning_rate=0.05,
        momentum=0.8,
        weight_decay=0.1,
        lora_scale=0.5,
        fallback_learning_rate=1e-3,
        fallback_weight_decay=0.01,
    )
    opt = lora_muon(method=method, **hparams)
    opt_inject = optax.inject_hyperparams(lora_muon)(method=method, **hparams)
    assert set(hparams) <= set(opt_inject.init(make_params()).hyperparams)

    params = make_params()
    p1, s1 = run(opt, params, 3)
    p2, s2 = run(opt_inject, params, 3)
    # Traced vs constant-folded hyperparameters may round differently in the last bit.
    assert_trees_close(p2, p1, rtol=1e-6, atol=1e-7)
    assert_trees_close(s2.inner_state, s1, rtol=1e-6, atol=1e-7)


def test_injected_learning_rate_can_be_changed() -> None:
    """Changing the injected η in the state == building the optimizer with that η."""
    params = make_params()
    opt_inject = optax.inject_hyperparams(lora_muon)(learning_rate=0.05, weight_decay=0.1)
    with pytest.warns(UserWarning, match="AdamW fallback"):  # ... and so does the bias
        state = opt_inject.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.02, jnp.float32)
    updates, _ = jax.jit(opt_inject.update)(grad_fn(params), state, params)
    expected_opt = lora_muon(0.02, weight_decay=0.1)
    with pytest.warns(UserWarning, match="AdamW fallback"):  # the bias follows η here
        expected_state = expected_opt.init(params)
    expected, _ = jax.jit(expected_opt.update)(grad_fn(params), expected_state, params)
    assert_trees_close(updates, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mu_dtype", [None, jnp.float32])
def test_bf16_params_give_bf16_updates(mu_dtype) -> None:
    opt = lora_muon(0.05, mu_dtype=mu_dtype, fallback_learning_rate=0.05)
    params = make_params(dtype=jnp.bfloat16)
    state = opt.init(params)
    updates, new_state = jax.jit(opt.update)(grad_fn(params), state, params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if "lora" in jax.tree_util.keystr(path):  # the fallback leaf: next test
            assert u.dtype == jnp.bfloat16, jax.tree_util.keystr(path)
        assert np.all(np.isfinite(np.asarray(u, np.float32)))
    expected = jnp.bfloat16 if mu_dtype is None else mu_dtype
    for st in (state, new_state):
        mus = leaves_named(st, "mu")
        assert len(mus) == 5  # 4 factors + the fallback's bias
        for name, mu in mus:
            # The AdamW fallback runs in float32 for 16-bit leaves (its nu would
            # overflow float16): its first moment is float32 unless mu_dtype is given.
            fallback_mu = "['bias']" in name and mu_dtype is None
            assert mu.dtype == (jnp.float32 if fallback_mu else expected), name
        (nu,) = leaves_named(st, "nu")
        assert nu[1].dtype == jnp.float32, nu[0]
    assert shape_dtypes(new_state) == shape_dtypes(state)


@pytest.mark.parametrize("mu_dtype", [None, jnp.float32])
def test_bf16_fallback_updates_stay_bf16(mu_dtype) -> None:
    """Non-LoRA leaves too: an update's dtype is its param's dtype, whatever mu_dtype.

    optax.adamw(mu_dtype=float32) on bfloat16 params returns float32 updates (optax
    0.2.8, the first moment is not cast back); lora_muon passes mu_dtype to its default
    fallback, so unless it casts the fallback's updates back, mixed trees get float32
    updates for bfloat16 biases while the factors' updates are bfloat16.
    """
    opt = lora_muon(0.05, mu_dtype=mu_dtype, fallback_learning_rate=0.05)
    params = make_params(dtype=jnp.bfloat16)
    updates, _ = jax.jit(opt.update)(grad_fn(params), opt.init(params), params)
    assert updates["bias"].dtype == jnp.bfloat16, updates["bias"].dtype


def test_mu_dtype_below_param_dtype() -> None:
    """float32 params with bfloat16 momenta: updates stay float32, momenta bfloat16."""
    opt = lora_muon(0.05, mu_dtype=jnp.bfloat16, fallback_learning_rate=0.05)
    params = make_params()
    state = opt.init(params)
    updates, new_state = jax.jit(opt.update)(grad_fn(params), state, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
    assert all(mu.dtype == jnp.bfloat16 for _, mu in leaves_named(new_state, "mu"))


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_multi_steps(use_grad_mean: bool) -> None:
    """MultiSteps(k=4): three zero updates, then one update on the accumulated gradient."""
    opt = lora_muon(0.05, weight_decay=0.1, fallback_learning_rate=0.05)
    multi = optax.MultiSteps(opt, every_k_schedule=4, use_grad_mean=use_grad_mean)
    params = make_params()
    grads = [jax.tree.map(lambda g, i=i: g * (1.0 + 0.5 * i), grad_fn(params)) for i in range(4)]
    # optax.MultiSteps (0.2.8) is not strict-promotion clean: its Welford mean divides by
    # an int32 counter and its emit step multiplies int32 by bool, inside optax's code.
    with jax.numpy_dtype_promotion("standard"):
        state = multi.init(params)
        update = jax.jit(multi.update)
        for i in range(3):
            updates, state = update(grads[i], state, params)
            for u in jax.tree.leaves(updates):
                np.testing.assert_array_equal(np.asarray(u), 0.0, err_msg=f"mini-step {i}")
        updates, state = update(grads[3], state, params)
    total = jax.tree.map(lambda *g: sum(g[1:], g[0]), *grads)
    acc = jax.tree.map(lambda g: g / 4.0, total) if use_grad_mean else total
    expected, _ = jax.jit(opt.update)(acc, opt.init(params), params)
    assert all(float(jnp.max(jnp.abs(u))) > 1e-4 for u in jax.tree.leaves(updates))
    assert_trees_close(updates, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_state_stable_under_cond(dtype) -> None:
    """The state keeps its shapes and dtypes through an update (lax.cond demands it)."""
    opt = lora_muon(0.05, fallback_learning_rate=0.05)
    params = make_params(dtype=dtype)

    @jax.jit
    def step(p, s, flag):
        grads = grad_fn(p)
        updates, s = jax.lax.cond(
            flag,
            lambda: opt.update(grads, s, p),
            lambda: (jax.tree.map(jnp.zeros_like, p), s),
        )
        return optax.apply_updates(p, updates), s

    state = opt.init(params)
    before = shape_dtypes(state)
    for flag in (True, False, True):
        new_params, new_state = step(params, state, jnp.asarray(flag))
        state = jax.lax.cond(jnp.asarray(flag), lambda: new_state, lambda: state)  # noqa: B023
        params = new_params
        assert shape_dtypes(state) == before
        assert shape_dtypes(params) == shape_dtypes(make_params(dtype=dtype))
    assert all(int(c) == 2 for _, c in leaves_named(state, "count"))


def test_init_on_shape_dtype_structs() -> None:
    opt = lora_muon(0.05, fallback_learning_rate=0.05)
    params = make_params(dtype=jnp.bfloat16)
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    abstract_state = jax.eval_shape(opt.init, abstract)
    concrete_state = opt.init(params)
    assert jax.tree.structure(abstract_state) == jax.tree.structure(concrete_state)
    assert shape_dtypes(abstract_state) == shape_dtypes(concrete_state)
    # And an abstract update (e.g. to build out_shardings) is consistent too.
    abstract_updates, abstract_new = jax.eval_shape(opt.update, abstract, abstract_state, abstract)
    assert shape_dtypes(abstract_updates) == shape_dtypes(params)
    assert shape_dtypes(abstract_new) == shape_dtypes(concrete_state)


# ---------------------------------------------------------------------------
# Chains, schedules, apply_if_finite
# ---------------------------------------------------------------------------


def test_chain_with_clip_by_global_norm() -> None:
    """chain(clip, lora_muon) == lora_muon on manually clipped gradients."""
    max_norm = 1.0
    big = 100.0  # make sure clipping is active
    chained = optax.chain(
        optax.clip_by_global_norm(max_norm),
        lora_muon(0.05, weight_decay=0.1, fallback_learning_rate=0.05),
    )
    plain = lora_muon(0.05, weight_decay=0.1, fallback_learning_rate=0.05)

    def manual_clip(g):
        norm = optax.tree.norm(g)
        return jax.tree.map(lambda x: x * (max_norm / jnp.maximum(norm, max_norm)), g)

    @jax.jit
    def step(p1, s1, p2, s2):
        g1 = jax.tree.map(lambda g: g * big, grad_fn(p1))
        g2 = jax.tree.map(lambda g: g * big, grad_fn(p2))
        u1, s1 = chained.update(g1, s1, p1)
        u2, s2 = plain.update(manual_clip(g2), s2, p2)
        return optax.apply_updates(p1, u1), s1, optax.apply_updates(p2, u2), s2, g1

    p1 = p2 = make_params()
    s1, s2 = chained.init(p1), plain.init(p2)
    for _ in range(3):
        p1, s1, p2, s2, g1 = step(p1, s1, p2, s2)
        assert float(optax.tree.norm(g1)) > 10 * max_norm
    assert_trees_close(p1, p2, rtol=1e-5, atol=1e-7)
    assert_trees_close(s1[1], s2, rtol=1e-5, atol=1e-7)


def test_warmup_cosine_schedule_equals_manual_per_step_float() -> None:
    """A scheduled η == an optimizer rebuilt every step with the value the schedule gives.

    Both use the same fixed fallback so the two states have the same layout and the
    state can be carried from one rebuilt optimizer to the next. The rebuilt optimizer
    takes the per-step η as a jit argument (one compile instead of one per step).
    """
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=0.1, warmup_steps=3, decay_steps=8, end_value=0.01
    )

    def fallback():
        return optax.adamw(1e-3, weight_decay=0.0)

    params = make_params()
    p1, _ = run(lora_muon(sched, weight_decay=0.1, fallback=fallback()), params, 8)

    @jax.jit
    def manual_step(lr, p, s):
        opt_t = lora_muon(lr, weight_decay=0.1, fallback=fallback())
        updates, s = opt_t.update(grad_fn(p), s, p)
        return optax.apply_updates(p, updates), s

    p2 = params
    state = lora_muon(0.1, weight_decay=0.1, fallback=fallback()).init(p2)
    for t in range(8):
        p2, state = manual_step(jnp.asarray(float(sched(t)), jnp.float32), p2, state)
    assert float(sched(0)) == 0.0 and abs(float(sched(3)) - 0.1) < 1e-7
    assert_trees_close(p1, p2, rtol=1e-5, atol=1e-7)
    assert not np.allclose(p1["layer"]["lora_a"], params["layer"]["lora_a"])


def test_warmup_first_step_is_a_no_op_for_factors() -> None:
    sched = optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 8)
    params = make_params()
    p1, _ = run(lora_muon(sched, weight_decay=0.5, fallback_learning_rate=sched), params, 1)
    for key in ("layer", "stack"):
        for name, leaf in params[key].items():
            np.testing.assert_array_equal(np.asarray(p1[key][name]), np.asarray(leaf))


@pytest.mark.parametrize(
    "schedule",
    [
        optax.cosine_decay_schedule(0.1, 10),
        optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10),
        optax.linear_schedule(0.1, 0.01, 10),
    ],
    ids=["cosine_decay", "warmup_cosine_decay", "linear"],
)
def test_optax_schedules_under_strict_promotion(schedule) -> None:
    """lora_muon keeps working under ``jax_numpy_dtype_promotion='strict'`` (conftest).

    optax's schedules are not strict-clean (``jnp.minimum(int32 count, float)``), so the
    LoRA branch must evaluate ``learning_rate(count)`` under standard promotion, as the
    fallback is traced; otherwise every non-constant schedule raises TypePromotionError.
    """
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    params, _ = run(
        lora_muon(schedule, weight_decay=0.1, fallback_learning_rate=schedule), make_params(), 2
    )
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(params))


def test_constant_schedule_equals_float() -> None:
    """Both η and the fallback's LR (which defaults to η) become schedules."""
    params = make_params()
    # The bias reaches the default fallback at η: reported, and here the point.
    with pytest.warns(UserWarning, match="AdamW fallback"):
        p_float, _ = run(lora_muon(0.05, weight_decay=0.1), params, 5)
    with pytest.warns(UserWarning, match="the `learning_rate` schedule"):
        p_sched, _ = run(lora_muon(optax.constant_schedule(0.05), weight_decay=0.1), params, 5)
    assert_trees_close(p_sched, p_float, rtol=1e-6, atol=1e-8)


def test_apply_if_finite_skips_nan_gradient() -> None:
    opt = optax.apply_if_finite(
        lora_muon(0.05, weight_decay=0.1, fallback_learning_rate=0.05), max_consecutive_errors=3
    )
    params = make_params()
    params, state = run(opt, params, 2)  # non-trivial inner state
    grads = grad_fn(params)
    grads["stack"]["kernel_lora_b"] = grads["stack"]["kernel_lora_b"].at[1, 0, 0, 0].set(jnp.nan)
    update = jax.jit(opt.update)
    updates, new_state = update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    assert_trees_close(new_params, params, rtol=0.0)
    assert_trees_close(new_state.inner_state, state.inner_state, rtol=0.0)
    assert int(new_state.notfinite_count) == 1
    assert not bool(new_state.last_finite)
    # A finite gradient afterwards updates again, with finite results.
    updates, newer_state = update(grad_fn(new_params), new_state, new_params)
    assert int(newer_state.notfinite_count) == 0
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))
    assert float(jnp.max(jnp.abs(updates["layer"]["lora_a"]))) > 1e-4


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_lone_factor_names_path_and_shape() -> None:
    params = {"layer": {"lora_a": jnp.ones((32, 4))}, "bias": jnp.ones((16,))}
    with pytest.raises(ValueError, match=re.escape("['layer']['lora_a']")) as info:
        lora_muon(0.05, fallback_learning_rate=0.05).init(params)
    assert "(32, 4)" in str(info.value)
    assert "lora_b" in str(info.value)


def test_mismatched_ranks_show_both_shapes() -> None:
    params = {"layer": {"lora_a": jnp.ones((32, 4)), "lora_b": jnp.ones((3, 16))}}
    with pytest.raises(ValueError) as info:
        lora_muon(0.05, fallback_learning_rate=0.05).init(params)
    assert "(32, 4)" in str(info.value) and "(3, 16)" in str(info.value)


def test_integer_factor_is_a_type_error() -> None:
    params = {
        "layer": {"lora_a": jnp.ones((32, 4), jnp.int32), "lora_b": jnp.ones((4, 16))},
    }
    with pytest.raises(TypeError, match=r"int32"):
        lora_muon(0.05, fallback_learning_rate=0.05).init(params)


def test_update_without_params_is_a_value_error() -> None:
    opt = lora_muon(0.05, fallback_learning_rate=0.05)
    params = make_params()
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"update\(grads, state, params\)"):
        opt.update(grad_fn(params), state)


@pytest.mark.parametrize(
    "learning_rate, weight_decay", [(1.0, 1.0), (10.0, 0.1), (2.0, 0.6), (0.5, 4.0)]
)
def test_decay_times_learning_rate_at_least_one_is_rejected(
    learning_rate: float, weight_decay: float
) -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        lora_muon(learning_rate, weight_decay=weight_decay, fallback_learning_rate=learning_rate)


def test_decay_times_learning_rate_just_below_one_is_accepted() -> None:
    opt = lora_muon(0.99, weight_decay=1.0, fallback_learning_rate=0.99)
    params, _ = run(opt, make_params(), 1)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# Convergence and gauge invariance on factorised least squares
# ---------------------------------------------------------------------------

_M, _N, _R, _SAMPLES = 32, 24, 4, 128


def _least_squares():
    """Rank-r teacher ``W_t = U diag(σ) Vᵀ``; loss ``mean‖X A B − X W_t‖²`` (flax layout)."""
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((_M, _R)))[0]
    v = np.linalg.qr(rng.standard_normal((_N, _R)))[0]
    w_t = (u * np.array([3.0, 2.0, 1.5, 1.0])) @ v.T
    x = jnp.asarray(rng.standard_normal((_SAMPLES, _M)), jnp.float32)
    target = x @ jnp.asarray(w_t, jnp.float32)
    a0 = jnp.asarray(rng.standard_normal((_M, _R)) / np.sqrt(_M), jnp.float32)
    b0 = jnp.asarray(rng.standard_normal((_R, _N)) / np.sqrt(_N), jnp.float32)

    def loss(p):
        return jnp.mean(jnp.square(x @ (p["lora_a"] @ p["lora_b"]) - target))

    return loss, {"lora_a": a0, "lora_b": b0}


def _loss_curve(opt, loss, params, steps: int) -> np.ndarray:
    def body(carry, _):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), value

    _, values = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), length=steps))(params)
    return np.asarray(values, np.float64)


@pytest.mark.parametrize("method", METHODS)
def test_factorised_least_squares_converges(method: str) -> None:
    """η = 0.1 (the paper's best) with cosine decay; no decay (exact recovery is the optimum).

    Measured (2 CPU cores, float32): the loss drops ~1e7x in 200 steps for both
    methods; a constant η = 0.1 stalls near 1e-3 relative (the step radius), hence
    the decaying schedule.
    """
    loss, params = _least_squares()
    opt = lora_muon(
        optax.cosine_decay_schedule(0.1, 200),
        weight_decay=0.0,
        method=method,
        fallback_learning_rate=optax.cosine_decay_schedule(0.1, 200),
    )
    curve = _loss_curve(opt, loss, params, 200)
    assert np.all(np.isfinite(curve))
    assert curve[0] / curve[-1] > 100.0, (curve[0], curve[-1])


@pytest.mark.parametrize("method", METHODS)
def test_imbalanced_factors_leave_lora_muon_unchanged(method: str) -> None:
    """(A, B) → (1e3 A, 1e-3 B) keeps ABᵀ; LoRA-Muon's curve must not move, AdamW's does.

    Window: 100 steps of η = 0.1 cosine decay (loss drops ~430x). Measured max relative
    difference of the curves ~2e-6 for both methods, so 1e-3 has a wide margin.
    Beyond ~1e-4 of the initial loss the two float32 trajectories drift apart
    chaotically (different rounding of the 1e6-scaled Grams), so longer windows would
    test float32 noise, not the invariance.
    """
    loss, params = _least_squares()
    c = 1e3
    imbalanced = {"lora_a": params["lora_a"] * c, "lora_b": params["lora_b"] / c}
    steps = 100

    def muon():
        return lora_muon(
            optax.cosine_decay_schedule(0.1, steps),
            weight_decay=0.0,
            method=method,
            fallback_learning_rate=optax.cosine_decay_schedule(0.1, steps),
        )

    balanced_curve = _loss_curve(muon(), loss, params, steps)
    imbalanced_curve = _loss_curve(muon(), loss, imbalanced, steps)
    assert balanced_curve[0] / balanced_curve[-1] > 100.0
    np.testing.assert_allclose(imbalanced_curve, balanced_curve, rtol=1e-3)

    # optax.adamw's bias correction (`b1 ** int32 count`) is not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        adamw_balanced = _loss_curve(optax.adamw(1e-2, weight_decay=0.0), loss, params, steps)
        adamw_imbalanced = _loss_curve(optax.adamw(1e-2, weight_decay=0.0), loss, imbalanced, steps)
    # Same start (same product), then AdamW's per-entry steps see the gauge.
    np.testing.assert_allclose(adamw_imbalanced[0], adamw_balanced[0], rtol=1e-5)
    assert adamw_imbalanced[-1] > 10.0 * adamw_balanced[-1], (
        adamw_imbalanced[-1],
        adamw_balanced[-1],
    )


# ---------------------------------------------------------------------------
# Split weight decay
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_split_weight_decay_identity_with_zero_gradients(method: str) -> None:
    """Zero gradients → zero momentum → zero direction: only the split decay acts.

    Each factor becomes ``s·A`` with ``s = √(1 − λη)`` and the product ``(1 − λη) ABᵀ``.
    Tolerances: a few float32 ulps (the update is ``-(λη/(1+s)) A`` added to A).
    """
    learning_rate, weight_decay = 0.1, 0.5
    s = np.sqrt(1.0 - weight_decay * learning_rate)
    opt = lora_muon(
        learning_rate,
        weight_decay=weight_decay,
        method=method,
        fallback_learning_rate=learning_rate,
    )
    params = make_params()
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, state, params)
    new = optax.apply_updates(params, updates)

    f32_eps = float(np.finfo(np.float32).eps)
    for key in ("layer", "stack"):
        for name, leaf in params[key].items():
            np.testing.assert_allclose(
                np.asarray(new[key][name], np.float64),
                s * np.asarray(leaf, np.float64),
                rtol=4 * f32_eps,
                atol=0.0,
                err_msg=f"{key}/{name}",
            )
    a, b = (np.asarray(params["layer"][k], np.float64) for k in ("lora_a", "lora_b"))
    a2, b2 = (np.asarray(new["layer"][k], np.float64) for k in ("lora_a", "lora_b"))
    np.testing.assert_allclose(
        a2 @ b2, (1.0 - weight_decay * learning_rate) * (a @ b), rtol=1e-6, atol=1e-7
    )
    sa, sb = (
        np.asarray(params["stack"][k], np.float64) for k in ("kernel_lora_a", "kernel_lora_b")
    )
    sa2, sb2 = (np.asarray(new["stack"][k], np.float64) for k in ("kernel_lora_a", "kernel_lora_b"))
    np.testing.assert_allclose(
        np.einsum("ldr,lrnh->ldnh", sa2, sb2),
        (1.0 - weight_decay * learning_rate) * np.einsum("ldr,lrnh->ldnh", sa, sb),
        rtol=1e-6,
        atol=1e-7,
    )
    # The fallback (AdamW, fallback_weight_decay=0) does not move the bias on zero grads.
    np.testing.assert_array_equal(np.asarray(new["bias"]), np.asarray(params["bias"]))
