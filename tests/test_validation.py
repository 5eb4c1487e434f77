"""Never a silently wrong step: hyperparameters, traced values, shapes, fallbacks (issue 12).

* Python / NumPy hyperparameters are checked when the optimizer is built: a
  ``ValueError`` naming the argument and showing the value.
* Traced ones (schedules, ``inject_hyperparams``, jax arrays) cannot raise
  inside ``jit``: an invalid value makes that step a zero update of the factors
  (finite, never amplified), and valid traced values give exactly the static
  result.
* Shape problems (rank 0, a zero-size axis, gradients of the wrong shape) and a
  tree without any LoRA pair raise, naming the paths and shapes.
* Leaves that silently reach the AdamW fallback at the LoRA learning rate are
  reported once; that fallback computes in float32 for 16-bit leaves.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_muon_jax import (
    default_pair_rule,
    lora_muon,
    scale_by_lora_muon,
    scale_by_split_weight_decay,
)
from lora_muon_jax.baselines import dense_muon
from lora_muon_jax.flax import LoRAScaleMap

NAN, INF = float("nan"), float("inf")


def pair_params(seed: int = 0, dtype=jnp.float32, bias: bool = False):
    """Two flax-style pairs (``attn``, ``mlp``), non-zero factors; optionally a bias."""
    k = jax.random.split(jax.random.key(seed), 5)
    params = {
        "attn": {
            "lora_a": jax.random.normal(k[0], (16, 2)),
            "lora_b": jax.random.normal(k[1], (2, 8)),
        },
        "mlp": {
            "lora_a": jax.random.normal(k[2], (8, 2)),
            "lora_b": jax.random.normal(k[3], (2, 12)),
        },
    }
    if bias:
        params["bias"] = jax.random.normal(k[4], (8,))
    return jax.tree.map(lambda x: x.astype(dtype), params)


def grads_for(params, seed: int = 1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, x.shape).astype(x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )


def steps(tx, params, n: int, *, grads_seed: int = 1):
    """``n`` jitted updates on fixed-seed gradients; returns (list of updates, params, state)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for i in range(n):
        updates, state = update(grads_for(params, grads_seed + i), state, params)
        out.append(updates)
        params = optax.apply_updates(params, updates)
    return out, params, state


def assert_all_zero(tree) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        np.testing.assert_array_equal(np.asarray(x), 0.0, err_msg=jax.tree_util.keystr(path))


def assert_trees_equal(x, y, rtol: float = 0.0) -> None:
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(y), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=rtol, atol=0.0, err_msg=jax.tree_util.keystr(path)
        )


def product_norm(params, name: str) -> float:
    p = params[name]
    return float(jnp.linalg.norm(p["lora_a"] @ p["lora_b"], ord=2))


# ----------------------------------------------------------------- static hyperparameters

BAD_STATIC = [
    # (kwargs of lora_muon, argument named in the message, value shown)
    ({"momentum": 1.5}, "momentum", "1.5"),
    ({"momentum": 1.0}, "momentum", "1.0"),
    ({"momentum": -0.1}, "momentum", "-0.1"),
    ({"momentum": NAN}, "momentum", "nan"),
    ({"momentum": np.float32(1.5)}, "momentum", "1.5"),
    ({"momentum": np.array(NAN)}, "momentum", "nan"),  # a 0-d NumPy array is a number
    ({"learning_rate": -0.1}, "learning_rate", "-0.1"),
    ({"learning_rate": INF}, "learning_rate", "inf"),
    ({"learning_rate": np.float64(NAN)}, "learning_rate", "nan"),
    ({"weight_decay": -0.01}, "weight_decay", "-0.01"),
    ({"weight_decay": np.array(INF)}, "weight_decay", "inf"),
    ({"learning_rate": 0.5, "weight_decay": 2.0}, "weight_decay * learning_rate", "2.0"),
    ({"learning_rate": np.float32(0.5), "weight_decay": np.array(4.0)}, "weight_decay=", "4.0"),
    ({"lora_scale": 0.0}, "lora_scale", "0.0"),
    ({"lora_scale": -2.0}, "lora_scale", "-2.0"),
    ({"lora_scale": np.float32(INF)}, "lora_scale", "inf"),
    ({"fallback_learning_rate": -1e-3}, "fallback_learning_rate", "-0.001"),
    ({"fallback_learning_rate": NAN}, "fallback_learning_rate", "nan"),
    ({"fallback_weight_decay": -1.0}, "fallback_weight_decay", "-1.0"),
]


@pytest.mark.parametrize(("kwargs", "name", "shown"), BAD_STATIC)
def test_lora_muon_rejects_bad_static_hyperparameters(kwargs, name, shown) -> None:
    kwargs = {"learning_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        lora_muon(**kwargs)
    assert shown in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("build", "name", "shown"),
    [
        (lambda: scale_by_lora_muon(momentum=1.5), "momentum", "1.5"),
        (lambda: scale_by_lora_muon(momentum=np.float16(NAN)), "momentum", "nan"),
        (lambda: scale_by_lora_muon(lora_scale=0.0), "lora_scale", "0.0"),
        (lambda: scale_by_lora_muon(lora_scale=NAN), "lora_scale", "nan"),
        (lambda: scale_by_split_weight_decay(-0.1), "learning_rate", "-0.1"),
        (lambda: scale_by_split_weight_decay(np.array(NAN)), "learning_rate", "nan"),
        (lambda: scale_by_split_weight_decay(0.1, weight_decay=-1.0), "weight_decay", "-1.0"),
        (lambda: scale_by_split_weight_decay(1.0, weight_decay=1.0), "weight_decay *", "1.0"),
        (lambda: scale_by_split_weight_decay(np.float32(2.0), np.float32(0.5)), "< 1", "1.0"),
    ],
)
def test_transforms_reject_bad_static_hyperparameters(build, name, shown) -> None:
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        build()
    assert shown in str(info.value), str(info.value)


def test_edge_values_are_accepted_and_numpy_numbers_equal_python_ones() -> None:
    params = pair_params()
    # momentum 0, learning rate 0 and weight decay 0 are valid.
    lora_muon(0.0, momentum=0.0, weight_decay=0.0, fallback_learning_rate=0.0).init(params)
    # NumPy scalars and 0-d arrays act exactly like the Python numbers they hold.
    python, _, _ = steps(lora_muon(0.1, momentum=0.8, weight_decay=0.5, lora_scale=2.0), params, 2)
    numpy, _, _ = steps(
        lora_muon(
            np.float32(0.1),
            momentum=np.array(0.8),
            weight_decay=np.float64(0.5),
            lora_scale=np.array(2.0, np.float32),
        ),
        params,
        2,
    )
    for a, b in zip(python, numpy, strict=True):
        assert_trees_equal(a, b)
        assert all(float(jnp.max(jnp.abs(x))) > 1e-3 for x in jax.tree.leaves(a))


def test_callable_lora_scale_is_checked_at_init_naming_the_pair() -> None:
    params = pair_params()
    bad = lora_muon(0.1, lora_scale=lambda name: 0.0 if "attn" in name else 1.0)
    with pytest.raises(ValueError, match="lora_scale") as info:
        bad.init(params)
    message = str(info.value)
    assert "attn" in message and "0.0" in message and "mlp" not in message, message
    with pytest.raises(ValueError, match="nan"):
        lora_muon(0.1, lora_scale=lambda name: NAN).init(params)
    with pytest.raises(TypeError, match=r"lora_scale must return a number, got None"):
        scale_by_lora_muon(lora_scale=lambda name: None).init(params)
    # A valid callable scales each pair's step by 1/α (α = 4 on attn: exact in binary).
    tx = lora_muon(0.1, weight_decay=0.0, lora_scale=lambda name: 4.0 if "attn" in name else 1.0)
    (u,), _, _ = steps(tx, params, 1)
    (u1,), _, _ = steps(lora_muon(0.1, weight_decay=0.0, lora_scale=1.0), params, 1)
    assert_trees_equal(u["attn"], jax.tree.map(lambda x: x / 4.0, u1["attn"]))
    assert_trees_equal(u["mlp"], u1["mlp"])


# ----------------------------------------------------------------- traced hyperparameters


@jax.jit
def _traced_step(hyperparams, params, grads):
    """One ``lora_muon`` step with every hyperparameter a tracer (one compile for all values)."""
    tx = lora_muon(**hyperparams)
    return tx.update(grads, tx.init(params), params)[0]


def _hyper(**kwargs):
    base = {"learning_rate": 0.5, "momentum": 0.9, "weight_decay": 0.1, "lora_scale": 1.0}
    return {k: jnp.asarray(v, jnp.float32) for k, v in {**base, **kwargs}.items()}


def test_traced_decay_fraction_at_least_one_is_a_zero_step() -> None:
    """λη ≥ 1 as arrays: no blow-up (before: λη = 2 gave updates ~1000x the factors)."""
    params, grads = pair_params(), grads_for(pair_params())
    valid = _traced_step(_hyper(weight_decay=1.98), params, grads)  # λη = 0.99: s = 0.1
    (static,), _, _ = steps(lora_muon(0.5, weight_decay=1.98), params, 1)
    assert_trees_equal(valid, static, rtol=1e-6)
    for decay_fraction in (1.0, 1.5, 2.0, 1e6, INF, NAN):
        updates = _traced_step(_hyper(weight_decay=decay_fraction / 0.5), params, grads)
        assert_all_zero(updates)
        new = optax.apply_updates(params, updates)
        for name in ("attn", "mlp"):  # ‖A Bᵀ‖ is not amplified (it is unchanged)
            assert product_norm(new, name) == product_norm(params, name)


def test_traced_decoupled_decay_at_least_one_is_a_zero_step() -> None:
    """Dense Muon's W ← (1 − λη) W − η msign(M) with λη ≥ 1 as arrays: zero, never −999 W."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}
    with pytest.raises(TypeError, match=r"static_args=\('is_matrix',\)"):
        optax.inject_hyperparams(dense_muon)(learning_rate=0.5).init(params)
    opt = optax.inject_hyperparams(dense_muon, static_args=("is_matrix",))(
        learning_rate=0.5, weight_decay=0.1
    )

    def update(weight_decay: float) -> jax.Array:
        state = opt.init(params)
        state.hyperparams["weight_decay"] = jnp.asarray(weight_decay, jnp.float32)
        return opt.update(grads, state, params)[0]["w"]

    assert float(jnp.max(jnp.abs(update(1.98)))) > 0  # λη = 0.99: a real step
    for decay_fraction in (1.0, 2.0, 1e3, INF, NAN):
        assert not np.any(np.asarray(update(decay_fraction / 0.5))), decay_fraction


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("learning_rate", (-0.1, NAN, INF)),
        ("momentum", (1.0, 1.5, -0.5, NAN)),
        ("lora_scale", (0.0, -1.0, NAN, INF)),  # before: lora_scale = 0 gave inf / NaN
    ],
)
def test_traced_invalid_hyperparameters_give_a_zero_step(name, values) -> None:
    params, grads = pair_params(), grads_for(pair_params())
    nonzero = _traced_step(_hyper(), params, grads)
    assert all(float(jnp.max(jnp.abs(x))) > 1e-3 for x in jax.tree.leaves(nonzero))
    for value in values:
        # weight_decay = 0: an invalid β or α zeroes the direction, and λη = 0
        # leaves nothing else (an invalid η zeroes the whole step whatever λ).
        assert_all_zero(_traced_step(_hyper(**{name: value}, weight_decay=0.0), params, grads))


def test_traced_valid_hyperparameters_equal_static_ones() -> None:
    params = pair_params(bias=True)
    kw = {"fallback_learning_rate": 1e-3}
    static, _, _ = steps(lora_muon(0.5, momentum=0.8, weight_decay=1.98, **kw), params, 3)
    traced, _, _ = steps(
        lora_muon(
            jnp.asarray(0.5),
            momentum=jnp.asarray(0.8),
            weight_decay=jnp.asarray(1.98),  # λη = 0.99: valid, s = 0.1
            **kw,
        ),
        params,
        3,
    )
    for a, b in zip(static, traced, strict=True):
        assert_trees_equal(a, b, rtol=1e-6)


def test_schedule_crossing_decay_fraction_one_skips_only_those_steps() -> None:
    """η from a schedule: λη = 0.01 at step 0, 2.0 at steps 1-2, 0.01 again at step 3."""
    params = pair_params()
    schedule = optax.piecewise_constant_schedule(0.1, {1: 200.0, 3: 1 / 200.0})
    updates, _, _ = steps(lora_muon(schedule, weight_decay=0.1), params, 4)
    (first,), _, _ = steps(lora_muon(0.1, weight_decay=0.1), params, 1)
    assert_trees_equal(updates[0], first, rtol=1e-6)
    assert_all_zero(updates[1])
    assert_all_zero(updates[2])
    # Step 3 is valid again: a real step, finite, of the size a λη = 0.01 step has.
    for x in jax.tree.leaves(updates[3]):
        assert np.all(np.isfinite(np.asarray(x))) and 1e-4 < float(jnp.max(jnp.abs(x))) < 1.0


def test_inject_hyperparams_invalid_values_are_zero_factor_steps() -> None:
    params = pair_params(bias=True)
    tx = optax.inject_hyperparams(lora_muon)(
        learning_rate=0.5, weight_decay=1.0, fallback_learning_rate=1e-3
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    valid_updates, state = update(grads_for(params), state, params)
    assert all(float(jnp.max(jnp.abs(x))) > 1e-4 for x in jax.tree.leaves(valid_updates))
    # λη = 0.5 is valid: with an invalid β only the direction is dropped and the
    # split decay still applies, A ← s A, i.e. u = −(λη / (1 + s)) A.
    decay_only = 0.5 / (1.0 + np.sqrt(0.5))
    for name, value in (("weight_decay", 2.0), ("weight_decay", 1e30), ("momentum", 1.5)):
        good = state.hyperparams[name]
        state.hyperparams[name] = jnp.asarray(value, jnp.float32)
        updates, state = update(grads_for(params, 7), state, params)
        factors = {"attn": updates["attn"], "mlp": updates["mlp"]}
        if name == "momentum":
            expected = {k: jax.tree.map(lambda x: -decay_only * x, params[k]) for k in factors}
            assert_trees_equal(factors, expected, rtol=1e-6)
        else:
            assert_all_zero(factors)
        # The AdamW fallback has its own (valid) hyperparameters: a normal step.
        assert np.all(np.isfinite(np.asarray(updates["bias"])))
        assert float(jnp.max(jnp.abs(updates["bias"]))) > 1e-4
        state.hyperparams[name] = good
    # Valid values again: a normal, finite step.
    updates, _ = update(grads_for(params, 8), state, params)
    for x in jax.tree.leaves(updates):
        assert np.all(np.isfinite(np.asarray(x))) and float(jnp.max(jnp.abs(x))) > 1e-4


def test_inject_hyperparams_invalid_momentum_keeps_the_momenta() -> None:
    params = pair_params()
    tx = optax.inject_hyperparams(scale_by_lora_muon)(momentum=0.9)
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(grads_for(params), state, params)
    before = state.inner_state.mu
    state.hyperparams["momentum"] = jnp.asarray(NAN, jnp.float32)
    updates, state = update(grads_for(params, 3), state, params)
    assert_all_zero(updates)
    assert_trees_equal(state.inner_state.mu, before)
    assert int(state.inner_state.count) == 2


# ----------------------------------------------------------------- inject_hyperparams + callables


def test_inject_hyperparams_with_a_scale_map_needs_static_args() -> None:
    params = pair_params()
    scales = LoRAScaleMap({("attn",): 4.0}, default=1.0)  # what lora_scale_fn(model) returns
    tx = optax.inject_hyperparams(lora_muon)(learning_rate=0.1, lora_scale=scales)
    with pytest.raises(TypeError, match=re.escape('static_args=("lora_scale",)')):
        tx.init(params)
    # With static_args it works, and equals the optimizer without inject_hyperparams.
    tx = optax.inject_hyperparams(lora_muon, static_args=("lora_scale",))(
        learning_rate=0.1, lora_scale=scales
    )
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads_for(params), state, params)
    (expected,), _, _ = steps(lora_muon(0.1, lora_scale=scales), params, 1)
    assert_trees_equal(updates, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"pair_rule": default_pair_rule}, "pair_rule"), ({"mu_dtype": jnp.bfloat16}, "mu_dtype")],
)
def test_inject_hyperparams_with_a_callable_option_needs_static_args(kwargs, named) -> None:
    """optax calls every callable not in ``static_args`` as a schedule: never a silent default."""
    params = pair_params()
    with pytest.raises(TypeError, match=re.escape(f"static_args=('{named}',)")):
        optax.inject_hyperparams(lora_muon)(learning_rate=0.1, **kwargs).init(params)
    tx = optax.inject_hyperparams(lora_muon, static_args=(named,))(learning_rate=0.1, **kwargs)
    updates, _ = tx.update(grads_for(params), tx.init(params), params)
    (expected,), _, _ = steps(lora_muon(0.1, **kwargs), params, 1)
    assert_trees_equal(updates, expected, rtol=1e-6)


def test_inject_hyperparams_with_lora_scale_fn_of_an_nnx_model() -> None:
    from flax import nnx

    from lora_muon_jax.flax.nnx import LoRALinearGeneral, lora_scale_fn

    model = LoRALinearGeneral(8, 4, lora_rank=2, alpha=8.0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="static_args"):
        nnx.Optimizer(
            model,
            optax.inject_hyperparams(lora_muon)(learning_rate=0.1, lora_scale=lora_scale_fn(model)),
            wrt=nnx.LoRAParam,
        )
    optimizer = nnx.Optimizer(
        model,
        optax.inject_hyperparams(lora_muon, static_args=("lora_scale",))(
            learning_rate=0.1, lora_scale=lora_scale_fn(model)
        ),
        wrt=nnx.LoRAParam,
    )
    assert optimizer.opt_state is not None


# ----------------------------------------------------------------- declared LoRA scale


def _lorafied(alpha: float, rank: int):
    from flax import nnx

    from lora_muon_jax.flax.surgery import lorafy

    class Mlp(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.up = nnx.Linear(8, 16, rngs=rngs)
            self.down = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    model = lorafy(Mlp(nnx.Rngs(0)), "up|down", rank=rank, alpha=alpha, rngs=nnx.Rngs(1))
    # lora_b starts at zero: give it values so the tangent halves are both defined.
    for layer in (model.up, model.down):
        shape = layer.lora_b.shape
        layer.lora_b[...] = jax.random.normal(jax.random.key(2), shape) * 0.1
    return model


def test_a_declared_lora_scale_that_the_optimizer_lacks_raises() -> None:
    from flax import nnx

    model = _lorafied(alpha=32.0, rank=2)  # s = 16
    with pytest.raises(
        ValueError, match=r"\['down'\].*declares lora_scale=16\.0.*given lora_scale=1\.0.*16x"
    ):
        nnx.Optimizer(model, lora_muon(0.1), wrt=nnx.LoRAParam)
    with pytest.raises(ValueError, match=r"declares lora_scale=16\.0.*given lora_scale=2\.0"):
        nnx.Optimizer(
            model,
            optax.inject_hyperparams(lora_muon)(learning_rate=0.1, lora_scale=2.0),
            wrt=nnx.LoRAParam,
        )
    nnx.Optimizer(model, lora_muon(0.1, lora_scale=16.0), wrt=nnx.LoRAParam)  # agrees


def test_the_declared_scale_gives_halves_of_eta_over_two_on_w() -> None:
    """With ``lora_scale_fn(model)`` each tangent half of the step on W = s A Bᵀ is η/2."""
    from flax import nnx

    from lora_muon_jax.flax.nnx import lora_scale_fn

    eta, s = 0.1, 16.0
    model = _lorafied(alpha=32.0, rank=2)
    optimizer = nnx.Optimizer(
        model, lora_muon(eta, weight_decay=0.0, lora_scale=lora_scale_fn(model)), wrt=nnx.LoRAParam
    )
    before = {
        k: (
            np.asarray(getattr(model, k).lora_a[...], np.float64),
            np.asarray(getattr(model, k).lora_b[...], np.float64),
        )
        for k in ("up", "down")
    }
    x = jax.random.normal(jax.random.key(3), (5, 8))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    for k, (a, b) in before.items():
        da = np.asarray(getattr(model, k).lora_a[...], np.float64) - a
        db = np.asarray(getattr(model, k).lora_b[...], np.float64) - b
        # nnx layout: lora_a (in, r), lora_b (r, out); W's change is s(ΔA B + A ΔB).
        for half in (s * da @ b, s * a @ db):
            # the documented float32 trust region: η/2 within 1e-3 (tests/test_trust_region.py)
            np.testing.assert_allclose(np.linalg.norm(half, ord=2), eta / 2, rtol=1e-3)


def test_lora_a_and_lora_b_declaring_different_scales_raise() -> None:
    from flax import nnx

    params = {
        "lora_a": nnx.LoRAParam(jnp.ones((8, 2)), lora_scale=2.0),
        "lora_b": nnx.LoRAParam(jnp.ones((2, 4)), lora_scale=4.0),
    }
    with pytest.raises(
        ValueError, match=re.escape("lora_a declares lora_scale=2.0 but lora_b declares 4.0")
    ):
        lora_muon(0.1, lora_scale=2.0).init(params)


def test_plain_arrays_declare_no_scale() -> None:
    """The check needs the Variables' metadata: ``nnx.as_pure`` trees are not checked."""
    from flax import nnx

    model = _lorafied(alpha=32.0, rank=2)
    lora_muon(0.1).init(nnx.as_pure(nnx.state(model, nnx.LoRAParam)))


# ----------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "what"),
    [
        ((16, 0), (0, 8), "rank 0"),
        # m = 0 / n = 0: pair resolution already refuses a rank above min(m, n)
        ((0, 2), (2, 8), "zero-size axis|m=0"),
        ((16, 2), (2, 0), "zero-size axis|n=0"),
        ((4, 16, 0), (4, 0, 8), "rank 0"),  # stacked, rank 0
        ((0, 16, 2), (0, 2, 8), "zero-size axis"),  # a batch of 0 pairs
    ],
)
@pytest.mark.parametrize("which", ["lora_muon", "scale_by_lora_muon"])
def test_zero_size_pairs_raise_naming_paths_and_shapes(a_shape, b_shape, what, which) -> None:
    params = {"blk": {"lora_a": jnp.ones(a_shape), "lora_b": jnp.ones(b_shape)}}
    tx = lora_muon(0.1) if which == "lora_muon" else scale_by_lora_muon()
    with pytest.raises(ValueError, match=what) as info:
        tx.init(params)
    message = str(info.value)
    for text in ("['blk']['lora_a']", "['blk']['lora_b']", str(a_shape), str(b_shape)):
        assert text in message, message


@pytest.mark.parametrize(
    ("path", "shape"),
    [(("attn", "lora_a"), (16, 3)), (("attn", "lora_b"), (2, 9)), (("bias",), (4,))],
)
@pytest.mark.parametrize("jit", [False, True])
def test_gradients_of_the_wrong_shape_raise_naming_the_path(path, shape, jit) -> None:
    params = pair_params(bias=True)
    tx = lora_muon(0.1, fallback_learning_rate=1e-3)
    state = tx.init(params)
    grads = grads_for(params)
    parent = grads
    for key in path[:-1]:
        parent = parent[key]
    expected = tuple(parent[path[-1]].shape)
    parent[path[-1]] = jnp.ones(shape)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match="shape") as info:
        update(grads, state, params)
    message = str(info.value)
    keystr = "".join(f"['{k}']" for k in path)
    for text in (keystr, str(shape), str(expected)):
        assert text in message, message


def test_gradients_of_the_wrong_shape_raise_in_scale_by_lora_muon_too() -> None:
    params = pair_params()
    tx = scale_by_lora_muon()
    grads = grads_for(params)
    grads["mlp"]["lora_b"] = jnp.ones((3, 12))
    with pytest.raises(ValueError, match=r"\['mlp'\]\['lora_b'\].*\(3, 12\).*\(2, 12\)"):
        tx.update(grads, tx.init(params), params)


def test_gradients_with_extra_leaves_raise_naming_them() -> None:
    params = pair_params(bias=True)
    tx = lora_muon(0.1, fallback_learning_rate=1e-3)
    grads = {**grads_for(params), "extra": jnp.ones(3)}
    with pytest.raises(ValueError, match="only in the gradients: extra"):
        tx.update(grads, tx.init(params), params)


# ----------------------------------------------------------------- no pair / the fallback


def test_a_tree_without_any_pair_raises_unless_allowed() -> None:
    params = {"w": jnp.ones((4, 4)), "bias": jnp.zeros(4)}
    with pytest.raises(ValueError, match="no LoRA pair was found") as info:
        lora_muon(0.1, fallback_learning_rate=1e-3).init(params)
    message = str(info.value)
    for text in ("['w'] (4, 4)", "['bias'] (4,)", "allow_no_pairs=True"):
        assert text in message, message
    # Opted out: plain AdamW on every leaf, exactly optax's.
    tx = lora_muon(0.1, fallback_learning_rate=1e-3, allow_no_pairs=True)
    grads = {"w": jnp.full((4, 4), 0.5), "bias": jnp.arange(4.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    with jax.numpy_dtype_promotion("standard"):  # optax's adamw is not strict-clean
        adamw = optax.adamw(1e-3, weight_decay=0.0)
        expected, _ = adamw.update(grads, adamw.init(params), params)
    assert_trees_equal(updates, expected)


def test_an_empty_tree_raises_unless_allowed() -> None:
    """e.g. nnx.Optimizer(model, tx, wrt=nnx.LoRAParam) on a model without LoRA: a no-op."""
    with pytest.raises(ValueError, match="no LoRA pair"):
        lora_muon(0.1).init({})
    with pytest.raises(ValueError, match="no LoRA pair"):
        scale_by_lora_muon().init({})
    lora_muon(0.1, allow_no_pairs=True).init({})
    scale_by_lora_muon(allow_no_pairs=True).init({})


def test_an_nnx_model_without_lora_params_raises() -> None:
    from flax import nnx

    model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no LoRA pair"):
        nnx.Optimizer(model, lora_muon(0.1), wrt=nnx.LoRAParam)


def test_leaves_on_the_default_fallback_are_reported_once() -> None:
    params = pair_params(bias=True)
    params.update({f"norm{i}": jnp.ones(4) for i in range(6)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = lora_muon(0.1).init(params)
    assert len(caught) == 1, [str(w.message) for w in caught]
    (w,) = caught
    message = str(w.message)
    assert w.category is UserWarning
    for text in ("7 parameter leaves", "['bias']", "(and 2 more)", "(learning_rate=0.1:"):
        assert text in message, message
    assert "lora_a" not in message, message
    assert jax.tree.leaves(state)  # init still returns the state
    with pytest.warns(UserWarning, match="the `learning_rate` schedule"):
        lora_muon(optax.constant_schedule(0.1)).init(params)


def test_no_report_when_the_fallback_is_chosen_or_unused() -> None:
    # conftest.py turns warnings into errors: each init below must not warn.
    params = pair_params(bias=True)
    lora_muon(0.1, fallback_learning_rate=1e-3).init(params)
    lora_muon(0.1, fallback=optax.sgd(1e-3)).init(params)
    lora_muon(0.1).init(pair_params())  # factors only: nothing reaches the fallback
    jax.jit(lora_muon(0.1, fallback_learning_rate=1e-3).init)(params)


def test_nnx_optimizer_wrt_param_on_lora_linear_reports_the_frozen_kernel() -> None:
    """wrt=nnx.Param includes nnx.LoRAParam: the "frozen" kernel trains on the fallback."""
    from flax import nnx

    model = nnx.LoRALinear(8, 4, lora_rank=2, rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"go to the AdamW fallback") as record:
        nnx.Optimizer(model, lora_muon(0.1), wrt=nnx.Param)
    assert "kernel" in str(record[0].message), str(record[0].message)
    nnx.Optimizer(model, lora_muon(0.1), wrt=nnx.LoRAParam)  # factors only: silent


# ----------------------------------------------------------------- fallback precision


def _adamw_reference(grads: list[np.ndarray], param: np.ndarray, lr: float, wd: float):
    """optax.adamw's update rule in float64 NumPy (b1 = 0.9, b2 = 0.999, eps = 1e-8)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = v = np.zeros_like(param, np.float64)
    p = param.astype(np.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        u = -lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
        out.append(u)
        p = p + u
    return out


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"),
    # The update is computed in float32 and rounded once to the param dtype: half an
    # ulp, 2^-11 (float16) or 2^-8 (bfloat16), plus float32 noise and the param
    # trajectory's rounding in the decay term; 1.5x for safety. Updates below
    # float16's smallest normal (6.1e-5) are subnormal, spaced 2^-24 apart: atol.
    [(jnp.float16, 1.5 * 2.0**-11, 2.0**-24), (jnp.bfloat16, 1.5 * 2.0**-8, 0.0)],
)
def test_fallback_moments_do_not_overflow_in_half_precision(dtype, rtol, atol) -> None:
    params = pair_params(dtype=dtype, bias=True)
    rng = np.random.default_rng(0)
    bias_grads = [
        (rng.uniform(1e4, 6e4, 8) * rng.choice([-1.0, 1.0], 8)).astype(np.float32) for _ in range(3)
    ]
    tx = lora_muon(0.1, fallback_learning_rate=1e-3, fallback_weight_decay=0.1)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ours = []
    p = params
    for g in bias_grads:
        grads = {**grads_for(p), "bias": jnp.asarray(g).astype(dtype)}
        u, state = update(grads, state, p)
        assert u["bias"].dtype == dtype
        ours.append(np.asarray(u["bias"], np.float64))
        p = optax.apply_updates(p, u)
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    nus = optax.tree_utils.tree_get_all_with_path(state, "nu")
    assert nus and all(nu["bias"].dtype == jnp.float32 for _, nu in nus), nus
    # The reference sees the same rounded float16 gradients and the param trajectory.
    rounded = [np.asarray(jnp.asarray(g).astype(dtype), np.float64) for g in bias_grads]
    expected = _adamw_reference(rounded, np.asarray(params["bias"], np.float64), 1e-3, 0.1)
    for t, (a, b) in enumerate(zip(ours, expected, strict=True)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"step {t}")


def test_fallback_state_is_float32_for_low_precision_params() -> None:
    params = pair_params(dtype=jnp.bfloat16, bias=True)
    state = lora_muon(0.1, fallback_learning_rate=1e-3).init(params)
    for path, x in optax.tree_utils.tree_get_all_with_path(state, "nu"):
        assert x["bias"].dtype == jnp.float32, path
    for path, x in optax.tree_utils.tree_get_all_with_path(state, "mu"):
        leaves = jax.tree_util.tree_flatten_with_path(x)[0]
        for p, leaf in leaves:
            key = jax.tree_util.keystr(p)
            # the factors' momenta keep mu_dtype (default: the params' dtype);
            # the fallback's first moment is float32.
            want = jnp.float32 if key == "['bias']" else jnp.bfloat16
            assert leaf.dtype == want, (path, key, leaf.dtype)
    # An explicit mu_dtype is kept for the fallback's first moment too.
    state = lora_muon(0.1, fallback_learning_rate=1e-3, mu_dtype=jnp.bfloat16).init(params)
    mus = [
        leaf
        for _, x in optax.tree_utils.tree_get_all_with_path(state, "mu")
        for leaf in jax.tree.leaves(x)
    ]
    assert mus and all(m.dtype == jnp.bfloat16 for m in mus)
