"""The Flax LoRA layers of ``lora_muon_jax.flax`` (Linen and NNX).

Oracles: float64 NumPy forward passes written from the definition
``y = x ⋅ K + (α/r)(x ⋅ A) ⋅ B + b``; the plain ``nn.Dense``/``nn.DenseGeneral`` layers
(zero-init adapters must reproduce them); ``find_lora_pairs`` for the tree layout
the optimizer sees; the loss of a reachable teacher for training.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

from lora_muon_jax import LoRADimensionNumbers, find_lora_pairs, lora_muon  # noqa: E402
from lora_muon_jax.flax import INIT_MODES, linen, surgery  # noqa: E402
from lora_muon_jax.flax import nnx as lnnx  # noqa: E402
from lora_muon_jax.flax.linen import LoRADense, LoRADenseGeneral  # noqa: E402

# Forward passes below are float32 sums of at most 64 products of O(1) terms:
# rounding is ~1e-6 relative; 1e-5 gives 10x margin against the float64 oracle.
F32_RTOL, F32_ATOL = 1e-5, 1e-5


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _normal(rng: np.random.Generator, shape, scale: float = 1.0) -> jax.Array:
    """float32 N(0, scale²) from NumPy (no per-shape XLA compile of a JAX sampler)."""
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _random_tree(tree, seed: int):
    """Same structure, every leaf N(0, 1/fan) (non-zero factors)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: _normal(rng, v.shape, 1 / math.sqrt(max(v.shape[0], 1))), tree)


# ---------------------------------------------------------------------------
# Linen: forward, init modes, scale
# ---------------------------------------------------------------------------


def test_linen_zero_init_matches_plain_dense() -> None:
    """Standard init (lora_b = 0): LoRADense(General) == nn.Dense(General) with the same kernel."""
    x = _normal(np.random.default_rng(0), (5, 3, 4))
    cases = [
        (nn.Dense(6), LoRADense(6, rank=2, alpha=16.0)),
        (
            nn.DenseGeneral((2, 5), axis=(-2, -1), use_bias=False),
            LoRADenseGeneral((2, 5), rank=3, axis=(-2, -1), alpha=4.0, use_bias=False),
        ),
    ]
    for plain, lora in cases:
        pre = jax.jit(plain.init)(jax.random.key(1), x)["params"]
        fresh = jax.jit(lora.init)(jax.random.key(2), x)["params"]
        assert not np.any(np.asarray(fresh["lora_b"]))
        assert np.any(np.asarray(fresh["lora_a"]))
        params = surgery.load_pretrained(fresh, pre)
        np.testing.assert_array_equal(
            lora.apply({"params": params}, x), plain.apply({"params": pre}, x)
        )


def test_linen_dense_general_forward_matches_float64_oracle() -> None:
    """Multi-axis in/out, α/r scale, bias: against y = x⋅K + (α/r)(x⋅A)⋅B + b in float64."""
    x = _normal(np.random.default_rng(0), (7, 3, 4))
    layer = LoRADenseGeneral((2, 5), rank=3, axis=(-2, -1), alpha=6.0)
    params = _random_tree(layer.init(jax.random.key(1), x)["params"], seed=3)
    assert {k: v.shape for k, v in params.items()} == {
        "kernel": (3, 4, 2, 5),
        "lora_a": (3, 4, 3),
        "lora_b": (3, 2, 5),
        "bias": (2, 5),
    }
    got = layer.apply({"params": params}, x)
    xs = _np(x).reshape(7, 12)
    k = _np(params["kernel"]).reshape(12, 10)
    a = _np(params["lora_a"]).reshape(12, 3)
    b = _np(params["lora_b"]).reshape(3, 10)
    want = xs @ k + (6.0 / 3) * (xs @ a) @ b + _np(params["bias"]).reshape(1, 10)
    np.testing.assert_allclose(_np(got).reshape(7, 10), want, rtol=F32_RTOL, atol=F32_ATOL)
    assert layer.bind({"params": params}).lora_scale == 2.0


def test_linen_contracts_a_middle_axis() -> None:
    """axis=1 of a (b, d, t) input: the other axes keep their order, like nn.DenseGeneral."""
    x = _normal(np.random.default_rng(0), (2, 4, 5))
    middle = LoRADenseGeneral(3, rank=2, axis=1, use_bias=False)
    params = _random_tree(middle.init(jax.random.key(1), x)["params"], seed=4)
    got = middle.apply({"params": params}, x)
    xs = _np(x)
    w = _np(params["kernel"]) + _np(params["lora_a"]) @ _np(params["lora_b"])
    want = np.einsum("bdt,do->bto", xs, w)
    np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=F32_ATOL)


def test_linen_native_init_has_no_kernel_and_lecun_scale() -> None:
    """init_mode='native': the weight is s·A⋅B, both random; A⋅B has variance ~1/fan_in."""
    m, n, r = 256, 192, 16
    x = _normal(np.random.default_rng(0), (8, m))
    layer = LoRADense(n, rank=r, init_mode="native", alpha=float(r))  # s = 1
    params = layer.init(jax.random.key(1), x)["params"]
    assert set(params) == {"lora_a", "lora_b", "bias"}
    a, b = _np(params["lora_a"]), _np(params["lora_b"])
    assert np.all(a != 0) and np.all(b != 0)
    # Sample variance of 49k product entries; with a fixed seed this is deterministic,
    # and a 15% band excludes the factor-2 errors a wrong fan would give.
    np.testing.assert_allclose(np.var(a @ b) * m, 1.0, rtol=0.15)
    got = layer.apply({"params": params}, x)
    want = _np(x) @ a @ b + _np(params["bias"])[None, :]
    np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=F32_ATOL)


def test_linen_freeze_base_zero_gradients() -> None:
    x = _normal(np.random.default_rng(0), (4, 6))
    for freeze in (True, False):
        layer = LoRADense(5, rank=2, freeze_base=freeze)
        shapes = jax.eval_shape(layer.init, jax.random.key(1), x)["params"]
        params = _random_tree(shapes, seed=2)
        grads = jax.jit(
            jax.grad(lambda p, layer=layer: jnp.sum(layer.apply({"params": p}, x) ** 2))
        )(params)
        assert np.any(np.asarray(grads["lora_a"])) and np.any(np.asarray(grads["lora_b"]))
        assert np.any(np.asarray(grads["kernel"])) != freeze
        assert np.any(np.asarray(grads["bias"])) != freeze


def test_linen_bfloat16_params_and_compute() -> None:
    x = jnp.ones((2, 8), jnp.bfloat16)
    layer = LoRADense(4, rank=2, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)  # dtypes are static
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(variables))
    assert jax.eval_shape(layer.apply, variables, x).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Linen: scale declared to the optimizer
# ---------------------------------------------------------------------------

NUM_LAYERS, WIDTH, RANK, ALPHA = 3, 16, 4, 8.0


class Block(nn.Module):
    rank: int | None = RANK
    alpha: float | None = ALPHA

    @nn.compact
    def __call__(self, x, _):
        if self.rank is None:
            h = nn.Dense(WIDTH, name="mlp")(x)
        else:
            h = LoRADense(WIDTH, rank=self.rank, alpha=self.alpha, name="mlp")(x)
        return x + jnp.tanh(h), None


class ScanModel(nn.Module):
    rank: int | None = RANK
    alpha: float | None = ALPHA

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=NUM_LAYERS,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(self.rank, self.alpha, name="blocks")(x, None)
        head = nn.Dense if self.rank is None else LoRADense
        kwargs = {} if self.rank is None else {"rank": 2}
        return head(WIDTH, name="head", **kwargs)(x)


def test_lora_scale_fn_reads_paths_inside_scan() -> None:
    x = jnp.ones((2, WIDTH), jnp.float32)
    model = ScanModel()
    scales = linen.lora_scales(model, x)
    assert scales == {("blocks", "mlp"): ALPHA / RANK, ("head",): 1.0}
    fn = linen.lora_scale_fn(model, x)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    names = [p.name for p in find_lora_pairs(params)]
    assert sorted(fn(n) for n in names) == [1.0, ALPHA / RANK]
    # Looked up by structured module path: a prefix (the 'params' collection) is fine; an
    # unknown pair raises or gets `default`; a plain string is not parsed.
    assert fn(("params", "blocks", "mlp")) == ALPHA / RANK
    with pytest.raises(KeyError, match=r"other.*known module paths: blocks/mlp, head"):
        fn(("other",))
    assert linen.lora_scale_fn(model, x, default=0.5)(("other",)) == 0.5
    with pytest.raises(TypeError, match="not parsed"):
        fn("['params']['blocks']['mlp']['lora_{a,b}']")


def _train_linen(model, params, tx, x, y, steps: int):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x) - y))
        )(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, np.asarray(losses)


def test_scan_stack_trains_with_lora_muon() -> None:
    """nn.scan-stacked LoRADense: pairs have the layer axis as batch axis; factors train."""
    x = _normal(np.random.default_rng(1), (64, WIDTH))
    model = ScanModel()
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x)["params"])
    pairs = {p.name: (p.a_shape, p.b_shape, p.dims.num_batch_axes) for p in find_lora_pairs(params)}
    assert pairs == {
        "['blocks']['mlp']['lora_{a,b}']": (
            (NUM_LAYERS, WIDTH, RANK),
            (NUM_LAYERS, RANK, WIDTH),
            1,
        ),
        "['head']['lora_{a,b}']": ((WIDTH, 2), (2, WIDTH), 0),
    }
    # Reachable teacher: same base, random factors.
    teacher = _random_factors(params, seed=7, scale=0.5)
    y = jax.jit(model.apply)({"params": teacher}, x)
    labels = surgery.lora_labels(params)
    tx = optax.partition(
        {
            "lora": lora_muon(0.05, lora_scale=linen.lora_scale_fn(model, x)),
            "frozen": optax.set_to_zero(),
        },
        labels,
    )
    trained, losses = _train_linen(model, params, tx, x, y, steps=60)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] / 5, losses[[0, -1]]
    for path in (("blocks", "mlp", "kernel"), ("blocks", "mlp", "bias"), ("head", "kernel")):
        before, after = params, trained
        for k in path:
            before, after = before[k], after[k]
        np.testing.assert_array_equal(after, before, err_msg=f"frozen {path} moved")
    for role in ("lora_a", "lora_b"):
        before = np.asarray(params["blocks"]["mlp"][role])
        after = np.asarray(trained["blocks"]["mlp"][role])
        for i in range(NUM_LAYERS):
            assert not np.array_equal(after[i], before[i]), f"{role}[{i}] never moved"


def _random_factors(params, seed: int, scale: float):
    """``params`` with every lora_a/lora_b replaced by random values (a reachable teacher)."""
    rng = np.random.default_rng(seed)

    def leaf(path, v):
        name = jax.tree_util.keystr(path)
        if "lora_" not in name:
            return v
        return _normal(rng, v.shape, scale / math.sqrt(v.shape[-2]))

    return jax.tree_util.tree_map_with_path(leaf, params)


def test_sharding_annotations_linen_and_scan() -> None:
    """kernel_axes gives logical partitioning; the rank axis is unsharded; scan adds 'layers'."""
    x = jnp.ones((2, 3, 8), jnp.float32)
    layer = LoRADenseGeneral((4, 2), rank=2, kernel_axes=("embed", "heads", "kv"))
    specs = nn.get_partition_spec(layer.init(jax.random.key(0), x))["params"]
    P = jax.sharding.PartitionSpec
    assert specs == {
        "kernel": P("embed", "heads", "kv"),
        "lora_a": P("embed", None),
        "lora_b": P(None, "heads", "kv"),
        "bias": P("heads", "kv"),
    }

    class Blk(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            layer = LoRADense(8, rank=2, kernel_axes=("embed", "mlp"), name="mlp")
            return layer(h), None

    stack = nn.scan(
        Blk,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=2,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    variables = stack().init(jax.random.key(0), x, None)
    specs = nn.get_partition_spec(variables)["params"]["mlp"]
    assert specs["lora_a"] == P("layers", "embed", None)
    assert specs["lora_b"] == P("layers", None, "mlp")
    # Initializers wrapped by the user (nn.with_partitioning) keep their boxes.
    wrapped = LoRADense(
        8,
        rank=2,
        kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model")),
        lora_a_init=nn.with_partitioning(nn.initializers.he_uniform(), ("data", None)),
        lora_b_init=nn.with_partitioning(nn.initializers.zeros_init(), (None, "model")),
    )
    boxed = jax.eval_shape(wrapped.init, jax.random.key(0), x)
    assert nn.get_partition_spec(boxed)["params"] == {
        "kernel": P("data", "model"),
        "lora_a": P("data", None),
        "lora_b": P(None, "model"),
        "bias": P(),
    }
    # Logical -> mesh rules resolve (e.g. for jax.jit(..., out_shardings=...)).
    rules = (("layers", None), ("embed", "data"), ("mlp", "model"))
    mesh_specs = nn.logical_to_mesh(specs, rules)
    assert mesh_specs["lora_a"] == P(None, "data", None)
    assert mesh_specs["kernel"] == P(None, "data", "model")


# ---------------------------------------------------------------------------
# NNX: LoRALinearGeneral
# ---------------------------------------------------------------------------


def test_nnx_linear_general_forward_and_zero_init() -> None:
    x = _normal(np.random.default_rng(0), (5, 3, 4))
    layer = lnnx.LoRALinearGeneral((3, 4), (2, 5), lora_rank=3, alpha=6.0, rngs=nnx.Rngs(0))
    assert isinstance(layer.lora_a, nnx.LoRAParam) and isinstance(layer.lora_b, nnx.LoRAParam)
    assert type(layer.kernel) is nnx.Param
    assert layer.lora_a.shape == (3, 4, 3) and layer.lora_b.shape == (3, 2, 5)
    xs = _np(x).reshape(5, 12)
    base = xs @ _np(layer.kernel[...]).reshape(12, 10) + _np(layer.bias[...]).reshape(1, 10)
    # Zero-init: exactly the base layer (lora_b = 0 contributes exact zeros).
    np.testing.assert_allclose(_np(layer(x)).reshape(5, 10), base, rtol=F32_RTOL, atol=F32_ATOL)
    layer.lora_b.set_value(_normal(np.random.default_rng(3), (3, 2, 5)))
    a, b = _np(layer.lora_a[...]).reshape(12, 3), _np(layer.lora_b[...]).reshape(3, 10)
    want = base + 2.0 * (xs @ a) @ b
    np.testing.assert_allclose(_np(layer(x)).reshape(5, 10), want, rtol=F32_RTOL, atol=F32_ATOL)
    pairs = find_lora_pairs(nnx.state(layer, nnx.LoRAParam))
    assert [(p.a_shape, p.b_shape) for p in pairs] == [((3, 4, 3), (3, 2, 5))]
    assert lnnx.lora_scale_fn(layer)(pairs[0].name) == 2.0


def test_nnx_native_and_lora_scale_fn_with_nnx_lora() -> None:
    class Net(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.native = lnnx.LoRALinearGeneral(8, 6, lora_rank=2, init_mode="native", rngs=rngs)
            self.flax_lora = nnx.LoRALinear(6, 4, lora_rank=2, rngs=rngs)

        def __call__(self, x):
            return self.flax_lora(self.native(x))

    model = Net(rngs=nnx.Rngs(0))
    assert model.native.kernel is None
    assert np.all(np.asarray(model.native.lora_b[...]) != 0)
    x = _normal(np.random.default_rng(1), (3, 8))
    want = _np(x) @ _np(model.native.lora_a[...]) @ _np(model.native.lora_b[...])
    np.testing.assert_allclose(model.native(x), want, rtol=F32_RTOL, atol=F32_ATOL)
    fn = lnnx.lora_scale_fn(model)
    names = sorted(p.name for p in find_lora_pairs(nnx.state(model, nnx.LoRAParam)))
    assert names == ["['flax_lora']['lora']['lora_{a,b}']", "['native']['lora_{a,b}']"]
    assert [fn(n) for n in names] == [1.0, 1.0]


def test_nnx_kernel_axes_metadata() -> None:
    """NNX shards eagerly: under a mesh the factors are placed with the rank axis unsharded."""
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((1, 1, 1), ("embed", "heads", "kv"), axis_types=(auto,) * 3)
    with jax.set_mesh(mesh):
        layer = lnnx.LoRALinearGeneral(
            8, (2, 4), lora_rank=2, kernel_axes=("embed", "heads", "kv"), rngs=nnx.Rngs(0)
        )
    specs = nnx.get_partition_spec(nnx.state(layer))
    P = jax.sharding.PartitionSpec
    assert layer.lora_b[...].sharding.spec == P(None, "heads", "kv")
    assert specs["kernel"].get_value() == P("embed", "heads", "kv")
    assert specs["lora_a"].get_value() == P("embed", None)
    assert specs["lora_b"].get_value() == P(None, "heads", "kv")


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_rank_larger_than_min_in_out_raises() -> None:
    x = jnp.ones((2, 6), jnp.float32)
    with pytest.raises(
        ValueError, match=r"LoRADense\(name='big'\).*rank=5 exceeds min\(in, out\) = min\(6, 4\)"
    ):
        LoRADense(4, rank=5, name="big").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"rank=7 exceeds min\(in, out\) = min\(6, 12\)"):
        lnnx.LoRALinearGeneral(6, (3, 4), lora_rank=7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lnnx.LoRALinearGeneral(6, 4, lora_rank=0, rngs=nnx.Rngs(0))


def test_non_float_dtype_raises() -> None:
    x = jnp.ones((2, 6), jnp.float32)
    with pytest.raises(
        TypeError, match=r"LoRADense\(name='q'\).*param_dtype=int32 is not a floating"
    ):
        LoRADense(4, rank=2, param_dtype=jnp.int32, name="q").init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"dtype=int8 is not a floating"):
        LoRADense(4, rank=2, dtype=jnp.int8).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"param_dtype=int32 is not a floating"):
        lnnx.LoRALinearGeneral(6, 4, lora_rank=2, param_dtype=jnp.int32, rngs=nnx.Rngs(0))


def test_bad_options_raise() -> None:
    x = jnp.ones((2, 6), jnp.float32)
    with pytest.raises(
        ValueError, match=r"unknown init='zeros'; expected one of \['native', 'standard'\]"
    ):
        LoRADense(4, rank=2, init_mode="zeros").init(jax.random.key(0), x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        LoRADense(4, rank=2, alpha=-1.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"kernel_axes=\('a',\) must name every kernel axis"):
        LoRADense(4, rank=2, kernel_axes=("a",)).init(jax.random.key(0), x)
    assert set(INIT_MODES) == {"standard", "native"}


def test_nnx_stacked_layers_pair_per_layer_and_merge() -> None:
    """nnx.vmap-stacked LoRALinearGeneral in nnx.scan: layer axis = batch axis; per-layer merge."""

    class Stack(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs: nnx.Rngs):
                return lnnx.LoRALinearGeneral(
                    8, 8, lora_rank=2, alpha=4.0, init_mode="native", rngs=rngs
                )

            self.layers = create(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def forward(x, layer):
                return jnp.tanh(layer(x))

            return forward(x, self.layers)

    model = Stack(rngs=nnx.Rngs(0))
    pairs = find_lora_pairs(nnx.state(model, nnx.LoRAParam))
    assert [(p.a_shape, p.b_shape, p.dims.num_batch_axes) for p in pairs] == [
        ((3, 8, 2), (3, 2, 8), 1)
    ]
    x = _normal(np.random.default_rng(1), (4, 8))
    adapted = np.asarray(model(x))
    surgery.merge_lora(model)
    a, b = _np(model.layers.lora_a[...]), _np(model.layers.lora_b[...])
    np.testing.assert_allclose(
        model.layers.kernel[...],
        2.0 * np.einsum("lir,lro->lio", a, b),
        rtol=F32_RTOL,
        atol=F32_ATOL,
    )
    np.testing.assert_allclose(model(x), adapted, rtol=F32_RTOL, atol=F32_ATOL)
    surgery.unmerge_lora(model)
    assert model.layers.kernel is None


def test_lora_batch_axes_of_every_nnx_lora_module() -> None:
    """Each module's stacked axes: what its factors hold beyond the one pair it declares."""

    class Net(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs: nnx.Rngs):
                general = lnnx.LoRALinearGeneral((2, 4), (2, 4), lora_rank=2, rngs=rngs)
                return general, nnx.LoRA(6, 2, 4, rngs=rngs)

            self.general, self.flax_lora = create(rngs)
            self.lin = nnx.LoRALinear(6, 4, lora_rank=2, rngs=rngs)  # not stacked
            # an einsum batch axis n: one pair per head, lora_a (n, d, r), lora_b (n, r, h)
            heads = nnx.Einsum("bnd,ndh->bnh", (2, 6, 4), rngs=rngs)
            self.heads = lnnx.LoRAAdapter(heads, lora_rank=2, rngs=rngs)

    model = Net(rngs=nnx.Rngs(0))
    assert lnnx.lora_batch_axes(model) == {
        ("general",): 1,
        ("flax_lora",): 1,
        ("lin", "lora"): 0,
        ("heads",): 1,
    }
    state = nnx.state(model, nnx.LoRAParam)
    with pytest.raises(ValueError, match="more than one reading"):
        find_lora_pairs(state)  # 2 layers (or heads) at rank 2
    pairs = find_lora_pairs(state, dimension_numbers=lnnx.lora_dimension_numbers_fn(model))
    assert {p.module_path: (p.batch_shape, p.rank) for p in pairs} == {
        ("general",): ((2,), 2),
        ("flax_lora",): ((2,), 2),
        ("lin", "lora"): ((), 2),
        ("heads",): ((2,), 2),
    }
    # The map looks pairs up by their structured module path, a prefix allowed.
    fn = lnnx.lora_dimension_numbers_fn(model)
    assert fn(("params", "lin", "lora")) == LoRADimensionNumbers(num_batch_axes=0)
    with pytest.raises(TypeError, match="not parsed back from strings"):
        fn("['lin']['lora']['lora_{a,b}']")
    tx = optax.inject_hyperparams(lora_muon, static_args=("dimension_numbers",))(
        learning_rate=0.1, dimension_numbers=fn
    )
    tx.init(state)
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(lora_muon)(learning_rate=0.1, dimension_numbers=fn).init(state)
    # Factors that disagree with their module are reported, not read some other way.
    model.lin.lora.lora_a = nnx.LoRAParam(jnp.zeros((3, 6, 2)))
    with pytest.raises(ValueError, match=r"LoRA at lin/lora: lora_a \(3, 6, 2\) and lora_b"):
        lnnx.lora_batch_axes(model)
