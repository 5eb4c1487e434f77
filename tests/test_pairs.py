"""Factor-pair discovery: layouts, batch axes, nnx Variables, holes and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_muon_jax import (
    LoRADimensionNumbers,
    default_pair_rule,
    find_lora_pairs,
    lora_param_labels,
)
from lora_muon_jax._pairs import from_math_layout, normalized_path, to_math_layout


def _z(*shape: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    return jnp.zeros(shape, dtype)


def test_default_rule_recognises_the_three_layouts() -> None:
    tree = {
        "flax": {"lora_a": _z(8, 2), "lora_b": _z(2, 6)},
        "qwix": {"kernel": _z(8, 6), "kernel_lora_a": _z(8, 3), "kernel_lora_b": _z(3, 6)},
        "gemma": {"lora": {"a": _z(5, 4), "b": _z(4, 7)}},
        "bias": _z(6),
    }
    pairs = {p.name: p for p in find_lora_pairs(tree)}
    assert set(pairs) == {
        "['flax']['lora_{a,b}']",
        "['qwix']['kernel_lora_{a,b}']",
        "['gemma']['lora']['{a,b}']",
    }
    assert pairs["['flax']['lora_{a,b}']"].rank == 2
    assert pairs["['qwix']['kernel_lora_{a,b}']"].rank == 3
    assert pairs["['gemma']['lora']['{a,b}']"].rank == 4
    labels = lora_param_labels(tree)
    assert labels["bias"] == "fallback"
    assert labels["qwix"]["kernel"] == "fallback"
    assert labels["qwix"]["kernel_lora_a"] == labels["qwix"]["kernel_lora_b"] == "lora"
    assert labels["gemma"]["lora"]["a"] == "lora"


def test_rule_on_paths() -> None:
    assert default_pair_rule(("x", "lora_a")) == (("x", "lora_{a,b}"), "a")
    assert default_pair_rule(("x", "w_lora_b")) == (("x", "w_lora_{a,b}"), "b")
    assert default_pair_rule(("x", "lora", "a")) == (("x", "lora", "{a,b}"), "a")
    assert default_pair_rule(("x", "_lora_a")) is None  # no base name
    assert default_pair_rule(("x", "a")) is None
    assert default_pair_rule(()) is None


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "num_batch_axes"),
    [
        ((8, 4), (4, 6), 0),  # nnx.LoRA
        ((16, 4), (4, 2, 8), 0),  # qwix einsum 'btd,dnh->btnh'
        ((3, 8, 4), (4, 8), 0),  # qwix conv kernel (k, in, r), (r, out)
        ((5, 8, 4), (5, 4, 6), 1),  # scanned layers
        ((2, 5, 8, 4), (2, 5, 4, 6), 2),  # two stacking axes
        ((4, 8, 2), (4, 2, 6), 1),  # unbatched, lora_b's rank axis would hold 4 != 2
        ((3, 4, 2), (3, 2, 4), 1),  # m == n == layers + 1: still only the stacked reading
    ],
)
def test_batch_axes_inferred(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], num_batch_axes: int
) -> None:
    (pair,) = find_lora_pairs({"lora_a": _z(*a_shape), "lora_b": _z(*b_shape)})
    assert pair.dims.num_batch_axes == num_batch_axes


def test_explicit_dimension_numbers_peft_layout() -> None:
    tree = {"lora_a": _z(4, 8), "lora_b": _z(6, 4)}  # PEFT: lora_A (r, in), lora_B (out, r)
    dims = LoRADimensionNumbers(a_rank_axis=0, b_rank_axis=-1)
    (pair,) = find_lora_pairs(tree, dimension_numbers=dims)
    assert pair.rank == 4
    a = jnp.arange(32.0).reshape(4, 8)
    assert to_math_layout(a, pair, "a").shape == (1, 8, 4)
    np.testing.assert_array_equal(to_math_layout(a, pair, "a")[0], a.T)
    # The default (flax) reading of the same tree is not a pair: a clear error.
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(6, 4\)"):
        find_lora_pairs(tree)


def test_dimension_numbers_callable_per_pair() -> None:
    tree = {"x": {"lora_a": _z(4, 4, 4), "lora_b": _z(4, 4, 4)}}

    def dims(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> LoRADimensionNumbers:
        del a_shape, b_shape
        assert name == "['x']['lora_{a,b}']"
        return LoRADimensionNumbers(num_batch_axes=0)

    (pair,) = find_lora_pairs(tree, dimension_numbers=dims)
    assert pair.dims.num_batch_axes == 0
    # Shapes alone admit both readings (4 layers of 4x4, or one 16x4 pair): no guess.
    with pytest.raises(ValueError, match="more than one reading"):
        find_lora_pairs(tree)
    # A callable returning None leaves the pair to inference (and its naming).
    (pair,) = find_lora_pairs(
        {"x": {"lora_a": _z(4, 8, 2), "lora_b": _z(4, 2, 6)}},
        dimension_numbers=lambda name, a, b: None,
    )
    assert pair.dims.num_batch_axes == 1


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((8, 4), (4, 6)), ((3, 8, 4), (4, 8)), ((5, 8, 4), (5, 4, 6)), ((16, 4), (4, 2, 8))],
)
def test_math_layout_round_trip(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    tree = {"lora_a": _z(*a_shape), "lora_b": _z(*b_shape)}
    (pair,) = find_lora_pairs(tree)
    rng = np.random.default_rng(0)
    for role, shape in (("a", a_shape), ("b", b_shape)):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        y = to_math_layout(x, pair, role)  # type: ignore[arg-type]
        assert y.ndim == 3 and y.shape[-1] == pair.rank
        np.testing.assert_array_equal(from_math_layout(y, pair, role), x)  # type: ignore[arg-type]
    # B of the math layout is lora_bᵀ: the product is x @ lora_a @ lora_b.
    a = jnp.asarray(rng.standard_normal(a_shape), jnp.float32)
    b = jnp.asarray(rng.standard_normal(b_shape), jnp.float32)
    am, bm = to_math_layout(a, pair, "a"), to_math_layout(b, pair, "b")
    nb = pair.dims.num_batch_axes or 0
    if nb == 0:
        expected = a.reshape(-1, pair.rank) @ b.reshape(pair.rank, -1)
        np.testing.assert_allclose(am[0] @ bm[0].T, expected, rtol=1e-5, atol=1e-5)


def test_nnx_value_suffix_is_ignored() -> None:
    from flax import nnx

    model = nnx.LoRALinear(8, 6, lora_rank=2, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.LoRAParam)
    paths = [normalized_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert ("lora", "lora_a") in paths
    (pair,) = find_lora_pairs(state)
    assert pair.name == "['lora']['lora_{a,b}']"
    # The plain-array tree nnx.Optimizer passes to update pairs identically.
    arrays = jax.tree.map(lambda v: v, nnx.to_pure_dict(state))
    (pair2,) = find_lora_pairs(arrays)
    assert pair2.name == pair.name


def test_masked_holes_and_placeholders() -> None:
    tree = {"lora_a": _z(8, 2), "lora_b": _z(2, 6), "w": optax.MaskedNode()}
    assert len(find_lora_pairs(tree)) == 1
    both_masked = {"lora_a": optax.MaskedNode(), "lora_b": optax.MaskedNode(), "w": _z(3)}
    assert find_lora_pairs(both_masked) == []
    assert find_lora_pairs({}) == []
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"lora_a": _z(8, 2), "lora_b": _z(2, 6)}
    )
    assert len(find_lora_pairs(abstract)) == 1


def test_errors_name_path_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"\['layer'\]\['lora_a'\].*\(8, 2\).*lora_b"):
        find_lora_pairs({"layer": {"lora_a": _z(8, 2)}})
    with pytest.raises(ValueError, match=r"mismatched ranks.*\(8, 2\).*\(3, 6\)"):
        find_lora_pairs(
            {"layer": {"lora_a": _z(8, 2), "lora_b": _z(3, 6)}},
            dimension_numbers=LoRADimensionNumbers(num_batch_axes=0),
        )
    with pytest.raises(ValueError, match=r"\(8, 2\).*\(3, 6\)"):
        find_lora_pairs({"layer": {"lora_a": _z(8, 2), "lora_b": _z(3, 6)}})
    with pytest.raises(TypeError, match=r"\['layer'\]\['lora_a'\].*int32"):
        find_lora_pairs({"layer": {"lora_a": _z(8, 2, dtype=jnp.int32), "lora_b": _z(2, 6)}})
    with pytest.raises(ValueError, match="same label"):
        find_lora_pairs({"lora_a": _z(8, 2), "lora_b": optax.MaskedNode()})


def test_custom_pair_rule() -> None:
    tree = {"down": _z(8, 2), "up": _z(2, 6), "other": _z(3)}

    def rule(path: tuple[str, ...]):
        return {"down": ("adapter", "a"), "up": ("adapter", "b")}.get(path[-1])

    (pair,) = find_lora_pairs(tree, pair_rule=rule)
    assert pair.rank == 2
    assert lora_param_labels(tree, pair_rule=rule)["other"] == "fallback"
    with pytest.raises(ValueError, match="two leaves claim role 'a'"):
        find_lora_pairs(tree, pair_rule=lambda p: ("g", "a"))


def test_rule_may_return_the_layout_its_naming_implies() -> None:
    # A custom naming whose factors are torch-oriented: the rule says so, no spec needed.
    tree = {"w_down": _z(3, 10), "w_up": _z(8, 3)}

    def rule(path: tuple[str, ...]):
        role = {"w_down": "a", "w_up": "b"}.get(path[-1])
        return (
            None
            if role is None
            else ("w", role, LoRADimensionNumbers(a_rank_axis=0, b_rank_axis=1))
        )

    (pair,) = find_lora_pairs(tree, pair_rule=rule)
    assert (pair.rank, pair.dims.a_rank_axis, pair.dims.b_rank_axis) == (3, 0, 1)
    # An explicit spec's set fields win over the naming; its None fields keep the naming's.
    (pair,) = find_lora_pairs(
        tree, pair_rule=rule, dimension_numbers=LoRADimensionNumbers(num_batch_axes=0)
    )
    assert pair.dims.a_rank_axis == 0
    with pytest.raises(TypeError, match=r"expected \(group, role\)"):
        find_lora_pairs(tree, pair_rule=lambda p: "w")  # type: ignore[arg-type,return-value]


def test_resolved_dims_are_complete_and_backward_compatible() -> None:
    (pair,) = find_lora_pairs({"lora_a": _z(5, 8, 4), "lora_b": _z(5, 4, 6)})
    assert pair.dims == LoRADimensionNumbers(1, -1, 0, (0,), (0,))
    assert (pair.batch_shape, pair.leading_batch_axes, pair.rank) == ((5,), True, 4)
    # the old positional spelling still means leading batch axes
    (same,) = find_lora_pairs(
        {"lora_a": _z(5, 8, 4), "lora_b": _z(5, 4, 6)},
        dimension_numbers=LoRADimensionNumbers(1, -1, 0),
    )
    assert same.dims == pair.dims
    with pytest.raises(ValueError, match=r"num_batch_axes=2 disagrees with a_batch_axes=\(0,\)"):
        find_lora_pairs(
            {"lora_a": _z(5, 8, 4), "lora_b": _z(5, 4, 6)},
            dimension_numbers=LoRADimensionNumbers(2, a_batch_axes=(0,), b_batch_axes=(0,)),
        )
