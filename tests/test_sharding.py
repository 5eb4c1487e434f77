"""LoRA-Muon on 8 CPU devices: sharded == unsharded, state follows params, r×r-only collectives.

Meshes: ``jax.make_mesh((4, 2), ("fsdp", "tp"))`` with Explicit axes (this jax's
default, checked below) and the same mesh with Auto axes. Layouts: FSDP along
m (``lora_a``), along n (``lora_b``), along both, and a Megatron-style
tensor-parallel layout (column-parallel ``q``: A over fsdp, B over tp;
row-parallel ``o``: A over tp, B over fsdp); plain and scanned (stacked, a
leading layer axis) factors, and a non-LoRA leaf for the AdamW fallback.

Oracles: the same steps on one device (``jax.jit`` without shardings); the
exact byte count of the Grams the step must all-reduce (4 r×r float32 Grams per
pair whose both factors are sharded); parsed HLO of the compiled step. Also:
``nnx.Optimizer`` on a model whose LoRA params carry ``out_sharding`` metadata,
and equal-shape pairs with different shardings on an explicit mesh (stacked
only with pairs of equal sharding: no gathers, same result).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_muon_jax import Method, lora_muon, maxtext_dimension_numbers
from lora_muon_jax import sharding as lms
from lora_muon_jax.testing import hlo_collectives

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: tests/conftest.py sets jax_num_cpu_devices=8 before JAX starts",
)

D, H, R, LAYERS, STACK = 64, 96, 4, 3, 2
# Float32 Grams summed in another order (partial sums per shard) differ by a few
# ulps (~1e-7 relative); the r×r inverse-root iterations amplify that a little.
# Measured after three steps: ≤ 6.1e-7 of the largest entry (explicit-tp, auto-fsdp_m).
RTOL_OF_MAX = 2e-6


def make_mesh(kind: str) -> jax.sharding.Mesh:
    if kind == "explicit":
        return jax.make_mesh((4, 2), ("fsdp", "tp"))
    return jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def test_make_mesh_defaults_to_explicit_axes() -> None:
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"))
    assert tuple(mesh.axis_types) == (AxisType.Explicit, AxisType.Explicit)


def make_params(layers: int = LAYERS, rank: int = R, seed: int = 0) -> dict:
    """``layers`` blocks of q (D→H) and o (H→D) adapters, a scanned stack, a norm."""
    shapes: dict = {}
    for i in range(layers):
        shapes[f"block{i}"] = {
            "q": {"lora_a": (D, rank), "lora_b": (rank, H)},
            "o": {"lora_a": (H, rank), "lora_b": (rank, D)},
        }
    shapes["scan"] = {"lora_a": (STACK, D, rank), "lora_b": (STACK, rank, H)}
    shapes["norm"] = (D,)
    flat, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    leaves = [
        jax.random.normal(k, s, jnp.float32) / math.sqrt(max(s[-2:]))
        for k, s in zip(keys, flat, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def layout_specs(params: dict, layout: str) -> dict:
    """PartitionSpecs of one layout; the rank axis is never sharded."""
    both = ("fsdp", "tp")

    def pair(path_keys: tuple[str, ...], a_axis: object, b_axis: object) -> dict:
        batch = (None,) if path_keys[0] == "scan" else ()
        return {"lora_a": P(*batch, a_axis, None), "lora_b": P(*batch, None, b_axis)}

    axes = {
        "fsdp_m": {"q": (both, None), "o": (both, None)},
        "fsdp_n": {"q": (None, both), "o": (None, both)},
        "fsdp": {"q": ("fsdp", "fsdp"), "o": ("fsdp", "fsdp")},
        "tp": {"q": ("fsdp", "tp"), "o": ("tp", "fsdp")},
    }[layout]
    specs: dict = {}
    for name, block in params.items():
        if name == "norm":
            specs[name] = P("fsdp") if layout != "fsdp_n" else P()
        elif name == "scan":
            specs[name] = pair(("scan",), *axes["q"])
        else:
            specs[name] = {k: pair((name,), *axes[k]) for k in block}
    return specs


def gradient_noise(params: dict, steps: int = 3) -> list[dict]:
    """Full-rank Gaussian gradient parts, one tree per step (well-conditioned momenta)."""
    out = []
    for t in range(steps):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(1000 + t), len(leaves))
        noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
        out.append(jax.tree_util.tree_unflatten(treedef, noise))
    return out


def make_step(opt: optax.GradientTransformation):
    def step(params, state, noise):
        # Elementwise (no collectives of its own), depends on the params.
        grads = jax.tree.map(lambda n, p: n + 0.5 * p, noise, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@functools.cache
def reference_run_cached(method: Method) -> dict:
    return reference_run(make_opt(method), make_params())


def make_opt(method: Method = "gram") -> optax.GradientTransformation:
    return lora_muon(0.1, weight_decay=0.01, method=method, fallback_learning_rate=1e-2)


def reference_run(opt: optax.GradientTransformation, params: dict) -> dict:
    step = jax.jit(make_step(opt))
    state = opt.init(params)
    for noise in gradient_noise(params):
        params, state = step(params, state, noise)
    return params


def sharded_run(opt, params: dict, shardings: dict):
    """Same steps with NamedSharding in/out shardings (the successor of pjit)."""
    noises = [jax.device_put(n, shardings) for n in gradient_noise(params)]
    params = jax.device_put(params, shardings)
    state = lms.init_sharded(opt, params, shardings)
    state_shardings = lms.optimizer_state_shardings(opt, params, shardings)
    step = jax.jit(
        make_step(opt),
        in_shardings=(shardings, state_shardings, shardings),
        out_shardings=(shardings, state_shardings),
    )
    compiled_text = step.lower(params, state, noises[0]).compile().as_text()  # cached
    for noise in noises:
        params, state = step(params, state, noise)
    return params, state, state_shardings, compiled_text


def assert_trees_close(actual, expected) -> None:
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(a), e, rtol=0, atol=RTOL_OF_MAX * np.abs(e).max())


def padded_spec(x: jax.Array) -> tuple:
    spec = tuple(getattr(x.sharding, "spec", ()))
    return spec + (None,) * (x.ndim - len(spec))


def assert_same_layout(tree, shardings) -> None:
    def check(x, s):
        if isinstance(s, optax.MaskedNode):
            return
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)

    jax.tree.map(check, tree, shardings, is_leaf=lambda s: isinstance(s, optax.MaskedNode))


# Per layout: (reduction groups = all-reduces per step, r×r Grams all-reduced per pair).
LAYOUT_COLLECTIVES = {
    "fsdp_m": (1, 2),  # only A and M_A are sharded: S_A, P_A over fsdp×tp
    "fsdp_n": (1, 2),  # only B and M_B: S_B, P_B
    "fsdp": (1, 4),  # both factors over fsdp: all four Grams, one fused all-reduce
    "tp": (2, 4),  # Megatron: some factors over fsdp, others over tp: one all-reduce each
}


@pytest.mark.parametrize(
    ("mesh_kind", "layout"),
    [
        ("auto", "fsdp_m"),
        ("explicit", "fsdp_n"),
        ("explicit", "fsdp"),
        ("explicit", "tp"),
    ],
)
def test_sharded_steps_equal_unsharded(mesh_kind: str, layout: str) -> None:
    mesh = make_mesh(mesh_kind)
    params = make_params()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), layout_specs(params, layout))
    actual, state, state_shardings, compiled_text = sharded_run(make_opt(), params, shardings)
    assert_trees_close(actual, reference_run_cached("gram"))
    assert_same_layout(actual, shardings)
    assert_same_layout(state, state_shardings)
    assert_only_rxr_all_reduces(compiled_text, *LAYOUT_COLLECTIVES[layout])


def assert_only_rxr_all_reduces(
    compiled_text: str | None, groups: int, grams_per_pair: int
) -> None:
    """The compiled step (synthetic grads, update, apply) against the Gram-count oracle."""
    collectives = hlo_collectives(compiled_text)
    # No factor ever moves between devices: no gather, scatter, permute or all-to-all.
    assert [c for c in collectives if c.kind != "all-reduce"] == []
    pairs = 2 * LAYERS + STACK
    for c in collectives:
        for _, dims in c.shapes:
            rxr = len(dims) >= 2 and dims[-2:] == (R, R)
            per_pair_scalars = len(dims) == 1 and dims[0] <= pairs  # overflow-branch maxima
            assert rxr or per_pair_scalars, c
    every_step = [c for c in collectives if not c.conditional]
    assert len(every_step) == groups, every_step
    assert not any(c.in_loop for c in every_step)  # each runs once per step
    # Exactly the Grams — grams_per_pair r×r float32 matrices per adapter — and, fused into
    # the same all-reduce, one float32 Σ|x| per sharded tall array (the fast form's check
    # that a zero Gram comes from a zero array, not from underflow), nothing else.
    assert sum(c.nbytes for c in every_step) == pairs * grams_per_pair * (R * R + 1) * 4


def test_paper_method_sharded_equals_unsharded() -> None:
    """The literal method's Newton–Schulz Grams x xᵀ also contract the sharded axis."""
    mesh = make_mesh("explicit")
    params = make_params()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), layout_specs(params, "tp"))
    actual, _, _, _ = sharded_run(make_opt("paper"), params, shardings)
    assert_trees_close(actual, reference_run_cached("paper"))


def test_state_shardings_follow_params() -> None:
    mesh = make_mesh("explicit")
    params = make_params()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), layout_specs(params, "tp"))
    opt = optax.chain(optax.clip_by_global_norm(1.0), lora_muon(0.1, fallback_learning_rate=0.1))
    state_shardings = lms.optimizer_state_shardings(opt, params, shardings)
    _, partition = state_shardings
    lora_mu = partition.inner_states["lora"].inner_state[0].mu
    adam = partition.inner_states["fallback"].inner_state[0]
    flat_params = jax.tree_util.tree_flatten_with_path(shardings)[0]
    for path, sharding in flat_params:
        is_norm = path[0].key == "norm"  # type: ignore[attr-defined]
        for tree, owns in ((lora_mu, not is_norm), (adam.mu, is_norm), (adam.nu, is_norm)):
            got = tree
            for key in path:
                got = got[key.key]  # type: ignore[attr-defined]
            if owns:
                assert got == sharding, (path, got)
            else:
                assert isinstance(got, optax.MaskedNode), (path, got)
    replicated = NamedSharding(mesh, P())
    assert partition.inner_states["lora"].inner_state[0].count == replicated
    assert adam.count == replicated
    # The state really is laid out so: jit(init) with these out_shardings.
    state = lms.init_sharded(opt, jax.device_put(params, shardings), shardings)
    assert_same_layout(state, state_shardings)
    # Nothing param-sized is replicated: every replicated leaf is a scalar.
    for leaf in jax.tree.leaves(state):
        if leaf.sharding.is_fully_replicated:
            assert leaf.ndim == 0, leaf.shape


def test_param_shardings_names_the_leaf_without_one() -> None:
    with pytest.raises(ValueError, match=r"\['x'\]\['lora_a'\].*\(3, 2\)"):
        lms.param_shardings({"x": {"lora_a": np.ones((3, 2))}})


def test_long_axis_partition_specs() -> None:
    params = {
        "attn": {"kernel_lora_a": np.ones((64, 4)), "kernel_lora_b": np.ones((4, 8, 16))},
        "scan": {"lora_a": np.ones((6, 96, 4)), "lora_b": np.ones((6, 4, 64))},
        "odd": {"lora_a": np.ones((7, 4)), "lora_b": np.ones((4, 8))},
        "bias": np.ones((24,)),
    }
    specs = lms.long_axis_partition_specs(params, "fsdp", 8)
    assert specs["attn"]["kernel_lora_a"] == P("fsdp", None)
    assert specs["attn"]["kernel_lora_b"] == P(None, None, "fsdp")  # 16 > 8: longest
    # Scanned: the layer axis (6 = batch) and the rank axis are never sharded.
    assert specs["scan"]["lora_a"] == P(None, "fsdp", None)
    assert specs["scan"]["lora_b"] == P(None, None, "fsdp")
    assert specs["odd"]["lora_a"] == P(None, None)  # 7 not divisible by 8
    assert specs["bias"] == P("fsdp")
    kept = lms.long_axis_partition_specs(params, ("a", "b"), 8, shard_other_leaves=False)
    assert kept["bias"] == P(None)
    assert kept["attn"]["kernel_lora_a"] == P(("a", "b"), None)


def test_long_axis_partition_specs_skip_batch_axes_anywhere() -> None:
    # MaxText's scanned layout: the layer axis (8, divisible, and the longest) sits at
    # position 1 of both factors; only embed / heads·head_dim may be sharded.
    params = {"wi": {"lora_a": np.ones((6, 8, 2)), "lora_b": np.ones((2, 8, 4, 3))}}
    specs = lms.long_axis_partition_specs(
        params, "fsdp", 2, dimension_numbers=maxtext_dimension_numbers()
    )
    assert specs["wi"]["lora_a"] == P("fsdp", None, None)
    assert specs["wi"]["lora_b"] == P(None, None, "fsdp", None)


# --- The HLO parser ------------------------------------------------------------------------


def test_hlo_collectives_sees_gathers_and_branches() -> None:
    """The parser is not blind: a known all-gather, a branch-only and an in-loop all-reduce."""
    mesh = make_mesh("auto")
    x = jax.device_put(jnp.ones((64, 4)), NamedSharding(mesh, P(("fsdp", "tp"), None)))
    gather = jax.jit(lambda v: v * 2.0, out_shardings=NamedSharding(mesh, P()))
    found = hlo_collectives(gather.lower(x).compile().as_text())
    assert [(c.kind, c.shapes, c.nbytes) for c in found] == [
        ("all-gather", (("f32", (64, 4)),), 64 * 4 * 4)
    ]

    def branchy(v, flag):
        return jax.lax.cond(flag, lambda u: jnp.sum(u), lambda u: jnp.float32(0.0), v)

    found = hlo_collectives(jax.jit(branchy).lower(x, True).compile().as_text())
    assert [(c.kind, c.conditional) for c in found] == [("all-reduce", True)]
    found = hlo_collectives(jax.jit(jnp.sum).lower(x).compile().as_text())
    assert [(c.kind, c.conditional, c.in_loop, c.nbytes) for c in found] == [
        ("all-reduce", False, False, 4)
    ]

    def loop(v):
        return jax.lax.fori_loop(0, 3, lambda i, u: u * jnp.sum(u), v)

    found = hlo_collectives(jax.jit(loop).lower(x).compile().as_text())
    assert [(c.kind, c.conditional, c.in_loop) for c in found] == [("all-reduce", False, True)]


# --- flax NNX: nnx.Optimizer with sharding metadata ----------------------------------------


def test_nnx_optimizer_with_sharding_metadata() -> None:
    """Variables annotated with ``out_sharding`` are sharded at creation under ``jax.set_mesh``;
    nnx.Optimizer's state inherits those shardings; the steps equal the unsharded run.

    Auto mesh: flax's ``nnx.LoRA`` forward (``x @ lora_a @ lora_b``) gives no
    ``out_sharding`` to its matmuls, which explicit meshes require.
    """
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs, sharded: bool):
            def meta(spec: tuple) -> dict:
                return {"out_sharding": spec} if sharded else {}

            nonzero = nnx.initializers.normal(0.1)
            self.up = nnx.LoRA(
                D, R, H, a_metadata=meta(("fsdp", None)), b_metadata=meta((None, "tp")),
                b_initializer=nonzero, rngs=rngs,
            )  # fmt: skip
            self.down = nnx.LoRA(
                H, R, D, a_metadata=meta(("tp", None)), b_metadata=meta((None, "fsdp")), rngs=rngs
            )  # standard init: lora_b = 0
            self.scale = nnx.Param(jnp.ones((D,)), **meta(("fsdp",)))

        def __call__(self, x):
            return self.down(jnp.tanh(self.up(x))) * self.scale[...][None, :]

    x = jax.random.normal(jax.random.key(1), (16, D))
    y = jax.random.normal(jax.random.key(2), (16, D))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x) - y)))(model)
        optimizer.update(model, grads)
        return loss

    def train(sharded: bool):
        model = Model(nnx.Rngs(0), sharded)
        optimizer = nnx.Optimizer(model, make_opt(), wrt=nnx.Param)
        losses = [float(step(model, optimizer)) for _ in range(3)]
        return model, optimizer, losses

    ref_model, _, ref_losses = train(False)
    with jax.set_mesh(make_mesh("auto")):
        model, optimizer, losses = train(True)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    params = nnx.state(model, nnx.Param)
    assert_trees_close(params, nnx.state(ref_model, nnx.Param))
    assert padded_spec(model.up.lora_a[...]) == ("fsdp", None)
    assert padded_spec(model.up.lora_b[...]) == (None, "tp")
    # Every param-shaped state leaf sits where its parameter sits; the rest are scalars.
    specs = {
        tuple(str(getattr(k, "key", k)) for k in path[:-1]): padded_spec(v)
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    checked = 0
    for path, v in jax.tree_util.tree_flatten_with_path(nnx.state(optimizer.opt_state))[0]:
        names = tuple(str(getattr(k, "key", k)) for k in path[:-1])
        owner = [p for p in specs if names[-len(p) :] == p]
        if v.ndim == 0:
            assert not owner
            continue
        assert len(owner) == 1, names
        assert padded_spec(v) == specs[owner[0]], (names, v.sharding)
        checked += 1
    assert checked == 4 + 2  # 4 LoRA momenta, AdamW mu and nu of `scale`


def test_equal_shapes_with_different_shardings_on_explicit_mesh() -> None:
    """Two (64, 4)/(4, 32) pairs, one over fsdp/tp, the other over tp/replicated."""
    mesh = make_mesh("explicit")
    keys = jax.random.split(jax.random.key(3), 4)
    params = {
        name: {
            "lora_a": jax.random.normal(keys[2 * i], (D, R)) / 8.0,
            "lora_b": jax.random.normal(keys[2 * i + 1], (R, 32)) / 8.0,
        }
        for i, name in enumerate(("x", "y"))
    }
    specs = {
        "x": {"lora_a": P("fsdp", None), "lora_b": P(None, "tp")},
        "y": {"lora_a": P("tp", None), "lora_b": P(None, None)},
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    opt = make_opt()
    actual, _, _, compiled_text = sharded_run(opt, params, shardings)
    assert_trees_close(actual, reference_run(opt, params))
    assert [c for c in hlo_collectives(compiled_text) if c.kind != "all-reduce"] == []


def test_scanned_layer_axis_sharded_on_explicit_mesh() -> None:
    """Two scanned (8, 64, 4)/(8, 4, 48) stacks with the layer axis over all 8 devices,
    then two replicated 2-D pairs of one shape.

    The layer-sharded stacks' r×r batches are sharded along their batch axis: before the
    fix the r×r iterations multiplied them with a replicated identity and JAX refused the
    matmul (``float32[32,4,4]`` vs ``float32[32@layers,4,4]``), and the replicated pairs'
    runtime split must not be keyed on those sharded results (slicing two values out of
    them fails on an explicit mesh). Steps equal the unsharded ones and the updates keep
    their layouts. Not communication-free: concatenating layer-sharded stacks and cutting
    them back reshuffles r×r and factor blocks between devices (measured:
    collective-permutes, all-gathers and all-to-alls); shard the long axes for that.
    """
    mesh = jax.make_mesh((8,), ("layers",))
    keys = jax.random.split(jax.random.key(5), 8)
    params = {
        name: {
            "lora_a": jax.random.normal(keys[2 * i], (*batch, D, R)) / 8.0,
            "lora_b": jax.random.normal(keys[2 * i + 1], (*batch, R, 48)) / 2.0,
        }
        for i, (name, batch) in enumerate((("p0", (8,)), ("p1", (8,)), ("q0", ()), ("q1", ())))
    }
    shardings = {
        name: jax.tree.map(lambda _, spec=spec: NamedSharding(mesh, spec), params[name])
        for name, spec in (("p0", P("layers")), ("p1", P("layers")), ("q0", P()), ("q1", P()))
    }
    opt = make_opt()
    actual, _, _, _ = sharded_run(opt, params, shardings)
    assert_trees_close(actual, reference_run(opt, params))
    assert_same_layout(actual, shardings)
