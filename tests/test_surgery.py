"""Model surgery, factor-only training, merge/unmerge, and qwix interop of ``lora_muon_jax.flax``.

Oracles: the pretrained model itself (a LoRA-fied model must reproduce it bit for bit
at init); the plain model run on merged weights (must equal the adapted model); the
adapted tree (unmerge must give it back); qwix-made trees (the same factor values must
get the same LoRA-Muon update as this package's trees).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
qwix = pytest.importorskip("qwix")

from lora_muon_jax import (  # noqa: E402
    LoRADimensionNumbers,
    find_lora_pairs,
    lora_muon,
    maxtext_dimension_numbers,
)
from lora_muon_jax.flax import linen, surgery  # noqa: E402
from lora_muon_jax.flax import nnx as lnnx  # noqa: E402
from lora_muon_jax.flax.linen import LoRADense, LoRADenseGeneral  # noqa: E402

BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

# qwix 0.1.8 uses APIs that flax 0.12.8 deprecates; conftest turns warnings into
# errors, so exactly these third-party deprecations are ignored for qwix tests.
QWIX_WARNINGS = (
    r"ignore:The 'm\.iter_modules\(\)' method is deprecated:DeprecationWarning",
    r"ignore:'\.value' access is now deprecated:DeprecationWarning",
    r"ignore:'VariableState' was removed:DeprecationWarning",
)


def qwix_warnings(test):
    for spec in QWIX_WARNINGS:
        test = pytest.mark.filterwarnings(spec)(test)
    return test


# Merged vs adapted: x⋅(K + s A⋅B) and x⋅K + s(x⋅A)⋅B differ by float32 reassociation of
# ≤ 64-term sums of O(1) values: ~1e-6; 1e-5 is a 10x margin.
F32_TOL = 1e-5


def _arrays(state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(tuple(p)).removesuffix(".value"): np.asarray(v) for p, v in leaves}


def _normal(rng: np.random.Generator, shape, scale: float = 1.0) -> jax.Array:
    """float32 N(0, scale²) from NumPy (no per-shape XLA compile of a JAX sampler)."""
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _randomize(tree, seed: int, scale: float = 0.5):
    """Every ``*lora_a``/``*lora_b`` leaf random (so merges and updates are non-trivial)."""
    rng = np.random.default_rng(seed)

    def leaf(path, v):
        if "lora_" not in jax.tree_util.keystr(path):
            return v
        return _normal(rng, v.shape, scale / math.sqrt(v.shape[-2]))

    return jax.tree_util.tree_map_with_path(leaf, tree)


# ---------------------------------------------------------------------------
# NNX: lorafy a pretrained model
# ---------------------------------------------------------------------------


class Pretrained(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(12, 16, rngs=rngs)
        self.heads = nnx.Einsum("bd,dnh->bnh", (16, 2, 4), (2, 4), rngs=rngs)
        self.out = nnx.Einsum("bnh,nhd->bd", (2, 4, 8), (8,), rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.out(jnp.tanh(self.heads(jnp.tanh(self.embed(x))))))


def _train_nnx(model, tx, x, y, steps: int) -> np.ndarray:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean(jnp.square(m(x) - y)), argnums=nnx.DiffState(0, nnx.LoRAParam)
        )(model)
        optimizer.update(model, grads)
        return loss

    return np.asarray([float(step(model, optimizer)) for _ in range(steps)])


def test_lorafy_keeps_outputs_and_trains_only_factors() -> None:
    x = _normal(np.random.default_rng(1), (32, 12))
    model = Pretrained(rngs=nnx.Rngs(0))
    y_pretrained = model(x)
    base_before = _arrays(nnx.state(model, nnx.Param))
    surgery.lorafy(model, "heads|out", rank=2, alpha=4.0, rngs=nnx.Rngs(5))
    assert isinstance(model.heads, lnnx.LoRAAdapter) and isinstance(model.out, lnnx.LoRAAdapter)
    assert type(model.embed) is nnx.Linear  # not matched: untouched
    # Pretrained weights kept bit for bit (now under base_module), outputs unchanged exactly.
    base_now = _arrays(nnx.state(model, BASE))
    renamed = {k.replace("['base_module']", ""): v for k, v in base_now.items()}
    assert renamed.keys() == base_before.keys()
    for k, v in base_before.items():
        np.testing.assert_array_equal(renamed[k], v, err_msg=k)
    np.testing.assert_array_equal(model(x), y_pretrained)
    pairs = {
        p.name: (p.a_shape, p.b_shape) for p in find_lora_pairs(nnx.state(model, nnx.LoRAParam))
    }
    assert pairs == {
        "['heads']['lora_{a,b}']": ((16, 2), (2, 2, 4)),
        "['out']['lora_{a,b}']": ((2, 4, 2), (2, 8)),
    }

    teacher = nnx.clone(model)
    nnx.update(teacher, _randomize(nnx.state(teacher, nnx.LoRAParam), seed=3))
    y = teacher(x)
    scale = lnnx.lora_scale_fn(model)
    assert scale(("heads",)) == 2.0  # the pair's structured module path
    losses = _train_nnx(model, lora_muon(0.05, lora_scale=scale), x, y, steps=30)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] / 4, losses[[0, -1]]
    for k, v in _arrays(nnx.state(model, BASE)).items():
        np.testing.assert_array_equal(v, base_now[k], err_msg=f"frozen {k} moved")


class VmapStack(nnx.Module):
    """``layers`` ``nnx.Linear`` (8 -> 6) stacked by ``nnx.vmap``: kernel (layers, 8, 6)."""

    def __init__(self, layers: int, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs):
            return nnx.Linear(8, 6, rngs=rngs)

        self.layers = create(rngs)


def test_lorafy_vmap_stack_with_layers_equal_to_rank_declares_its_layout() -> None:
    # 3 layers at rank 3: lora_a (3, 8, 3), lora_b (3, 3, 6) are 3 pairs of 8×3/6×3 factors
    # or one 24×3/18×3 pair by shape; the model knows they are stacked.
    model = VmapStack(3, rngs=nnx.Rngs(0))
    surgery.lorafy(model, "layers", rank=3, alpha=6.0, rngs=nnx.Rngs(1))
    nnx.update(model, _randomize(nnx.state(model, nnx.LoRAParam), seed=2))
    assert lnnx.lora_batch_axes(model) == {("layers",): 1}
    dims = lnnx.lora_dimension_numbers_fn(model)
    assert dims(("layers",), (3, 8, 3), (3, 3, 6)) == LoRADimensionNumbers(num_batch_axes=1)
    assert dims(("elsewhere",)) is None  # a pair no known module owns: inferred
    fixed = LoRADimensionNumbers(num_batch_axes=0)
    assert lnnx.lora_dimension_numbers_fn(model, default=fixed)(("elsewhere",)) == fixed
    scale = lnnx.lora_scale_fn(model)  # s = 6 / 3
    with pytest.raises(ValueError, match=r"(?s)more than one reading.*lora_dimension_numbers_fn"):
        nnx.Optimizer(model, lora_muon(0.1, lora_scale=scale), wrt=nnx.LoRAParam)
    tx = lora_muon(0.1, weight_decay=0.1, lora_scale=scale, dimension_numbers=dims)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    grads = _randomize(nnx.state(model, nnx.LoRAParam), seed=3)
    optimizer.update(model, grads)
    stepped = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))["layers"]
    # The oracle: each layer's pair stepped alone (2-D factors, nothing to declare).
    g = nnx.to_pure_dict(grads)["layers"]
    alone_tx = lora_muon(0.1, weight_decay=0.1, lora_scale=2.0)
    for i in range(3):
        alone = {k: jnp.asarray(params["layers"][k][i]) for k in ("lora_a", "lora_b")}
        updates, _ = alone_tx.update({k: g[k][i] for k in alone}, alone_tx.init(alone), alone)
        for k, u in updates.items():
            want = np.asarray(alone[k] + u)
            # The same float32 operations per layer, batched or not (bit-equal on CPU).
            np.testing.assert_allclose(stepped[k][i], want, rtol=0, atol=1e-6 * np.abs(u).max())
    # Tree-level helpers take the same declaration.
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match="more than one reading"):
        surgery.merge_lora_params(tree, scale)
    merged = surgery.merge_lora_params(tree, scale, dimension_numbers=dims)
    a, b = np.asarray(stepped["lora_a"]), np.asarray(stepped["lora_b"])
    kernel = np.asarray(tree["layers"]["base_module"]["kernel"])
    np.testing.assert_allclose(
        merged["layers"]["base_module"]["kernel"],
        kernel + 2.0 * np.einsum("lir,lro->lio", a, b),
        rtol=F32_TOL,
        atol=F32_TOL,
    )
    labels = surgery.lora_labels(tree, dimension_numbers=dims)
    assert labels["layers"]["lora_a"] == "lora" and labels["layers"]["base_module"]["kernel"] == (
        "frozen"
    )


def test_lorafy_inherits_kernel_sharding() -> None:
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(auto, auto))
    with jax.set_mesh(mesh):
        layer = nnx.Einsum(
            "bd,dnh->bnh",
            (8, 2, 4),
            kernel_init=nnx.with_partitioning(
                nnx.initializers.lecun_normal(), ("data", None, "model")
            ),
            rngs=nnx.Rngs(0),
        )
        adapter = lnnx.LoRAAdapter(layer, lora_rank=2, rngs=nnx.Rngs(1))
    P = jax.sharding.PartitionSpec
    assert adapter.lora_a[...].sharding.spec == P("data", None)
    assert adapter.lora_b[...].sharding.spec == P(None, None, "model")


def test_lorafy_bad_input() -> None:
    model = Pretrained(rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"pattern 'attn/.\*' matches no .*'embed', 'heads', 'out'"
    ):
        surgery.lorafy(model, "attn/.*", rank=2, rngs=nnx.Rngs(1))
    with pytest.raises(
        ValueError,
        match=r"layer 'out' \(kernel \(2, 4, 8\)\): LoRAAdapter\(Einsum\): rank=9 exceeds .*"
        r"min\(8, 8\)",
    ):
        surgery.lorafy(model, "out", rank=9, rngs=nnx.Rngs(1))
    with pytest.raises(TypeError, match=r"param_dtype=int32 is not a floating"):
        surgery.lorafy(model, "embed", rank=2, param_dtype=jnp.int32, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"kernel axis 'k' of 'bd,dk->b' is summed out"):
        lnnx.einsum_lora_spec("bd,dk->b", (4, 3), 1)
    assert type(model.embed) is nnx.Linear and type(model.out) is nnx.Einsum  # nothing replaced


# ---------------------------------------------------------------------------
# NNX: merge / unmerge
# ---------------------------------------------------------------------------


def test_nnx_merge_unmerge_and_export() -> None:
    class Net(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.pre = Pretrained(rngs=rngs)
            self.native = lnnx.LoRALinearGeneral(
                8, (2, 3), lora_rank=2, init_mode="native", rngs=rngs
            )

        def __call__(self, x):
            return self.native(self.pre(x))

    x = _normal(np.random.default_rng(1), (8, 12))
    model = Net(rngs=nnx.Rngs(0))
    surgery.lorafy(model, "pre/(embed|heads|out)", rank=2, alpha=8.0, rngs=nnx.Rngs(2))
    nnx.update(model, _randomize(nnx.state(model, nnx.LoRAParam), seed=4))
    adapted = np.asarray(model(x))
    kernels = _arrays(nnx.state(model, BASE))
    surgery.merge_lora(model)
    assert model.native.merged and model.native.kernel is not None
    np.testing.assert_allclose(model(x), adapted, rtol=F32_TOL, atol=F32_TOL)
    # Merged kernel == W_pre + s·A⋅B, checked in float64 for the einsum layer.
    heads = model.pre.heads
    want = kernels["['pre']['heads']['base_module']['kernel']"] + 4.0 * np.einsum(
        "dr,rnh->dnh", np.asarray(heads.lora_a[...], np.float64), np.asarray(heads.lora_b[...])
    )
    np.testing.assert_allclose(heads.base_module.kernel[...], want, rtol=F32_TOL, atol=F32_TOL)
    surgery.unmerge_lora(model)
    assert model.native.kernel is None and not model.pre.heads.merged
    for k, v in _arrays(nnx.state(model, BASE)).items():
        np.testing.assert_allclose(v, kernels[k], rtol=0, atol=F32_TOL, err_msg=k)
    np.testing.assert_allclose(model(x), adapted, rtol=F32_TOL, atol=F32_TOL)
    surgery.merge_lora(model, remove_adapters=True)
    assert type(model.pre.heads) is nnx.Einsum and type(model.pre.embed) is nnx.Linear
    np.testing.assert_allclose(model(x), adapted, rtol=F32_TOL, atol=F32_TOL)


# ---------------------------------------------------------------------------
# Linen trees: labels, load_pretrained, merge / unmerge
# ---------------------------------------------------------------------------


class LinenNet(nn.Module):
    """Dense -> DenseGeneral (2 heads) -> DenseGeneral over both axes; LoRA when rank is set."""

    rank: int | None = None
    native_head: bool = False

    @nn.compact
    def __call__(self, x):
        r = self.rank
        if r is None:
            h = nn.Dense(16, name="up")(x)
            h = nn.DenseGeneral((2, 4), name="heads")(jnp.tanh(h))
            return nn.DenseGeneral(5, axis=(-2, -1), name="out")(jnp.tanh(h))
        h = LoRADense(16, rank=r, alpha=8.0, name="up")(x)
        h = LoRADenseGeneral((2, 4), rank=r, name="heads")(jnp.tanh(h))
        mode = "native" if self.native_head else "standard"
        return LoRADenseGeneral(5, rank=r, axis=(-2, -1), init_mode=mode, name="out")(jnp.tanh(h))


def test_linen_labels_and_load_pretrained() -> None:
    x = jnp.ones((2, 6), jnp.float32)
    pretrained = LinenNet().init(jax.random.key(0), x)["params"]
    fresh = LinenNet(rank=2).init(jax.random.key(1), x)["params"]
    params = surgery.load_pretrained(fresh, pretrained)
    for layer in ("up", "heads", "out"):
        np.testing.assert_array_equal(params[layer]["kernel"], pretrained[layer]["kernel"])
        np.testing.assert_array_equal(params[layer]["lora_a"], fresh[layer]["lora_a"])
    labels = surgery.lora_labels(params)
    flat = {k: v for k, v in _arrays(labels).items()}
    assert {k for k, v in flat.items() if v == "lora"} == {
        f"['{layer}']['lora_{ab}']" for layer in ("up", "heads", "out") for ab in "ab"
    }
    assert all(v == "frozen" for k, v in flat.items() if "lora" not in k)
    with pytest.raises(ValueError, match=r"no LoRA factor pairs.*\['up'\]\['kernel'\]: \(6, 16\)"):
        surgery.lora_labels(pretrained)
    with pytest.raises(ValueError, match=r"up/kernel: pretrained \(6, 16\) float32 vs LoRA params"):
        surgery.load_pretrained(
            LinenNet(rank=2).init(jax.random.key(1), x[:, :4])["params"], pretrained
        )
    with pytest.raises(ValueError, match=r"pretrained leaf extra/w \(3,\) has no counterpart"):
        surgery.load_pretrained(fresh, {**pretrained, "extra": {"w": jnp.ones(3)}})


@pytest.mark.parametrize("native_head", [False, True])
def test_linen_merge_equals_adapted_and_unmerge_restores(native_head: bool) -> None:
    x = _normal(np.random.default_rng(1), (6, 6))
    model = LinenNet(rank=2, native_head=native_head)
    params = _randomize(model.init(jax.random.key(0), x)["params"], seed=2)
    scale = linen.lora_scale_fn(model, x)
    merged = surgery.merge_lora_params(params, scale)
    plain_params = LinenNet().init(jax.random.key(0), x)["params"]
    assert jax.tree.structure(merged) == jax.tree.structure(plain_params)
    adapted = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(
        jax.jit(LinenNet().apply)({"params": merged}, x), adapted, rtol=F32_TOL, atol=F32_TOL
    )
    want_up = np.asarray(params["up"]["kernel"], np.float64) + 4.0 * (
        np.asarray(params["up"]["lora_a"], np.float64) @ np.asarray(params["up"]["lora_b"])
    )
    np.testing.assert_allclose(merged["up"]["kernel"], want_up, rtol=F32_TOL, atol=F32_TOL)
    restored = surgery.unmerge_lora_params(merged, params, scale)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for k, v in _arrays(params).items():
        np.testing.assert_allclose(_arrays(restored)[k], v, rtol=0, atol=F32_TOL, err_msg=k)


def test_linen_merge_scanned_stack_per_layer() -> None:
    class Blk(nn.Module):
        rank: int | None

        @nn.compact
        def __call__(self, h, _):
            if self.rank is None:
                return jnp.tanh(nn.Dense(8, name="mlp")(h)), None
            return jnp.tanh(LoRADense(8, rank=self.rank, alpha=4.0, name="mlp")(h)), None

    def stack(rank):
        return nn.scan(Blk, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            rank
        )

    x = _normal(np.random.default_rng(1), (4, 8))
    lora_model = stack(2)
    params = _randomize(lora_model.init(jax.random.key(0), x, None)["params"], seed=5)
    merged = surgery.merge_lora_params(params, linen.lora_scale_fn(lora_model, x, None))
    assert merged["mlp"]["kernel"].shape == (3, 8, 8) and "lora_a" not in merged["mlp"]
    got, _ = stack(None).apply({"params": merged}, x, None)
    want, _ = lora_model.apply({"params": params}, x, None)
    np.testing.assert_allclose(got, want, rtol=F32_TOL, atol=F32_TOL)


def test_merge_errors_name_the_pair() -> None:
    params = {
        "layer": {
            "kernel": jnp.zeros((4, 5)),
            "lora_a": jnp.ones((3, 2)),
            "lora_b": jnp.ones((2, 5)),
        }
    }
    with pytest.raises(ValueError, match=r"pair \['layer'\]\['lora_\{a,b\}'\]: lora_a \(3, 2\)"):
        surgery.merge_lora_params(params)


def test_merge_refuses_batch_axes_that_do_not_lead() -> None:
    # MaxText's scanned layout: the layer axis inside both factors and the kernel.
    params = {
        "wi": {
            "kernel": jnp.zeros((8, 3, 6)),
            "lora_a": jnp.ones((8, 3, 2)),
            "lora_b": jnp.ones((2, 3, 6)),
        }
    }
    with pytest.raises(
        ValueError,
        match=r"pair \['wi'\]\['lora_\{a,b\}'\]: merging needs the batch \(stacked-layer\) axes "
        r"to lead both factors, got lora_a batch axes \(1,\) of \(8, 3, 2\)",
    ):
        surgery.merge_lora_params(params, dimension_numbers=maxtext_dimension_numbers())


# ---------------------------------------------------------------------------
# qwix interop
# ---------------------------------------------------------------------------

Q_RANK, Q_ALPHA = 2, 6.0


def _updates_side_by_side(qwix_tree, qwix_grads, our_tree, our_grads, our_scale):
    """One LoRA-Muon update of ``{'qwix': ..., 'ours': ...}``: each tree keeps its own scale.

    One compiled call for both (pairs are independent: the optimizer batches equal
    shapes but never mixes pairs); qwix pairs get ``alpha / rank``, ours the callable.
    """

    def scale(name: str) -> float:
        return Q_ALPHA / Q_RANK if name.startswith("['qwix']") else our_scale(name)

    tx = lora_muon(0.1, lora_scale=scale, fallback_learning_rate=0.1)
    params = {"qwix": qwix_tree, "ours": our_tree}
    grads = {"qwix": qwix_grads, "ours": our_grads}
    updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
    return updates["qwix"], updates["ours"]


@qwix_warnings
def test_qwix_linen_tree_same_update_and_merge() -> None:
    """qwix on nn.Dense/DenseGeneral vs this package's layers with the same factor values.

    qwix flattens DenseGeneral factors (``kernel_lora_b (r, 8)``); this package keeps the
    axes (``lora_b (r, 2, 4)``). Same forward, same gradients (up to the layout), and the
    LoRA-Muon step is layout independent, so the updates agree. Tolerance 1e-5: both runs do
    the same float32 math on reshaped arrays; the differences are from XLA's reassociation
    of the contractions (~1e-7) carried through the polar iterations.
    """
    x = _normal(np.random.default_rng(1), (6, 6))
    provider = qwix.LoraProvider(module_path=".*", rank=Q_RANK, alpha=Q_ALPHA)
    q_model = qwix.apply_lora_to_model(LinenNet(), provider)
    q_params = _randomize(q_model.init(jax.random.key(0), x)["params"], seed=6)
    ours_scale = {
        ("up",): Q_ALPHA / Q_RANK,
        ("heads",): Q_ALPHA / Q_RANK,
        ("out",): Q_ALPHA / Q_RANK,
    }
    template = jax.eval_shape(LinenNet(rank=Q_RANK).init, jax.random.key(0), x)["params"]
    our_params = {
        layer: {
            "kernel": q_params[layer]["kernel"],
            "bias": q_params[layer]["bias"],
            "lora_a": q_params[layer]["kernel_lora_a"].reshape(template[layer]["lora_a"].shape),
            "lora_b": q_params[layer]["kernel_lora_b"].reshape(template[layer]["lora_b"].shape),
        }
        for layer in ("up", "heads", "out")
    }
    # alpha is a dataclass field: build our layers with the same α for every layer.
    ours = _AlphaNet(rank=Q_RANK, alpha=Q_ALPHA)
    np.testing.assert_allclose(
        ours.apply({"params": our_params}, x),
        q_model.apply({"params": q_params}, x),
        rtol=F32_TOL,
        atol=F32_TOL,
    )
    y = jnp.ones((6, 5), jnp.float32)

    def grads_of(apply, p):
        return jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(apply({"params": p}, x) - y))))(p)

    our_scale = linen.lora_scale_fn(ours, x)
    assert our_scale.scales == ours_scale
    q_upd, o_upd = _updates_side_by_side(
        q_params,
        grads_of(q_model.apply, q_params),
        our_params,
        grads_of(ours.apply, our_params),
        our_scale,
    )
    for layer in ("up", "heads", "out"):
        for q_name, o_name in (("kernel_lora_a", "lora_a"), ("kernel_lora_b", "lora_b")):
            q = np.asarray(q_upd[layer][q_name])
            assert np.any(q)
            np.testing.assert_allclose(
                np.asarray(o_upd[layer][o_name]).reshape(q.shape),
                q,
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{layer}/{o_name}",
            )
    # qwix trees merge with the same helper (s = alpha/rank) into the plain model's tree.
    merged = surgery.merge_lora_params(q_params, Q_ALPHA / Q_RANK)
    np.testing.assert_allclose(
        LinenNet().apply({"params": merged}, x),
        q_model.apply({"params": q_params}, x),
        rtol=F32_TOL,
        atol=F32_TOL,
    )


class _AlphaNet(nn.Module):
    rank: int
    alpha: float

    @nn.compact
    def __call__(self, x):
        r, a = self.rank, self.alpha
        h = LoRADense(16, rank=r, alpha=a, name="up")(x)
        h = LoRADenseGeneral((2, 4), rank=r, alpha=a, name="heads")(jnp.tanh(h))
        return LoRADenseGeneral(5, rank=r, alpha=a, axis=(-2, -1), name="out")(jnp.tanh(h))


@qwix_warnings
def test_qwix_nnx_einsum_same_update_as_lorafy() -> None:
    x = _normal(np.random.default_rng(1), (16, 12))
    q_model = qwix.apply_lora_to_model(
        Pretrained(rngs=nnx.Rngs(0)),
        qwix.LoraProvider(module_path="heads|out", rank=Q_RANK, alpha=Q_ALPHA),
        x,
        rngs=nnx.Rngs(1),
    )
    nnx.update(q_model, _randomize(nnx.state(q_model, nnx.LoRAParam), seed=8))
    ours = Pretrained(rngs=nnx.Rngs(0))
    surgery.lorafy(ours, "heads|out", rank=Q_RANK, alpha=Q_ALPHA, rngs=nnx.Rngs(1))
    for layer in ("heads", "out"):
        getattr(ours, layer).lora_a.set_value(getattr(q_model, layer).kernel_lora_a[...])
        getattr(ours, layer).lora_b.set_value(getattr(q_model, layer).kernel_lora_b[...])
    np.testing.assert_allclose(ours(x), q_model(x), rtol=F32_TOL, atol=F32_TOL)
    y = jnp.ones((16, 8), jnp.float32)

    def factors_and_grads(model):
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(lora):
            return jnp.mean(jnp.square(nnx.merge(graphdef, lora, rest)(x) - y))

        lora = nnx.to_pure_dict(lora)
        return lora, jax.jit(jax.grad(loss))(lora)

    q_upd, o_upd = map(
        _arrays,
        _updates_side_by_side(
            *factors_and_grads(q_model), *factors_and_grads(ours), lnnx.lora_scale_fn(ours)
        ),
    )
    for layer in ("heads", "out"):
        for ab in "ab":
            q = q_upd[f"['{layer}']['kernel_lora_{ab}']"]
            assert np.any(q)
            np.testing.assert_allclose(
                o_upd[f"['{layer}']['lora_{ab}']"], q, rtol=1e-5, atol=1e-6, err_msg=layer
            )


def test_qwix_lora_scale_follows_rule_order() -> None:
    rules = [
        qwix.LoraRule(module_path="blocks/.*/attn", rank=4, alpha=16.0),
        qwix.LoraRule(module_path=".*", rank=8, alpha=8.0),
    ]
    scale = surgery.qwix_lora_scale(rules)
    assert scale(("params", "blocks", "0", "attn")) == 4.0
    assert scale(("blocks", "0", "mlp")) == 1.0
    only = surgery.qwix_lora_scale([qwix.LoraRule(module_path="head", rank=2, alpha=6.0)])
    assert only(("head",)) == 3.0
    with pytest.raises(KeyError, match=r"no rule matches the module path 'embed'"):
        only(("embed",))
    # What lora_muon passes: the pair's PairName, a string with its structured path.
    params = {
        "params": {"head": {"kernel_lora_a": jnp.ones((4, 2)), "kernel_lora_b": jnp.ones((2, 3))}}
    }
    (pair,) = find_lora_pairs(params)
    assert only(pair.name) == 3.0 and only(pair) == 3.0
