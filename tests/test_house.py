"""The shared base, structured pair identity, import layering, renames and doctests."""

from __future__ import annotations

import ast
import doctest
import importlib
import pathlib
import pkgutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_muon_jax
from lora_muon_jax import (
    LoRAPair,
    find_lora_pairs,
    lora_muon,
    scale_by_lora_muon,
    scale_by_pair_direction,
    scale_by_split_weight_decay,
    with_gauge_rebalancing,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_muon_jax"


# ----------------------------------------------------------------- pair identity


def test_custom_pair_rule_with_string_groups_reaches_scale_maps() -> None:
    # A custom rule whose group is a plain string (no "['key']" name to parse): the
    # scale map finds the owning module from the pair's structured paths, or defaults.
    from lora_muon_jax.flax import LoRAScaleMap

    def rule(path: tuple[str, ...]):  # type: ignore[no-untyped-def]
        if path[-1] in ("down", "up"):
            return f"{'/'.join(path[:-1])}-pair", "a" if path[-1] == "down" else "b"
        return None

    params = {
        "blocks": {"mlp": {"down": jnp.ones((8, 2)), "up": jnp.ones((2, 6))}},
        "head": {"down": jnp.ones((6, 2)), "up": jnp.ones((2, 4))},
    }
    pairs = find_lora_pairs(params, pair_rule=rule)
    assert {p.group for p in pairs} == {"blocks/mlp-pair", "head-pair"}
    assert {p.module_path for p in pairs} == {("blocks", "mlp"), ("head",)}
    scales = LoRAScaleMap({("blocks", "mlp"): 4.0}, default=1.0)
    assert sorted(scales(p.name) for p in pairs) == [1.0, 4.0]
    # ... and inside the optimizer: the scaled pair's step is 1/4 of the other's radius.
    opt = lora_muon(0.1, weight_decay=0.0, pair_rule=rule, lora_scale=scales)
    grads = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape), x.dtype), params
    )
    updates, _ = opt.update(grads, opt.init(params), params)
    mlp, head = updates["blocks"]["mlp"], updates["head"]
    half_mlp = float(jnp.linalg.norm(mlp["down"] @ params["blocks"]["mlp"]["up"], ord=2))
    half_head = float(jnp.linalg.norm(head["down"] @ params["head"]["up"], ord=2))
    np.testing.assert_allclose(4.0 * half_mlp, half_head, rtol=1e-4)  # α = 4 vs 1
    np.testing.assert_allclose(half_head, 0.05, rtol=1e-3)  # η/2


def test_pair_names_keep_their_identity_through_pickling() -> None:
    import pickle

    (pair,) = find_lora_pairs(
        {"x": {"kernel_lora_a": jnp.ones((4, 2)), "kernel_lora_b": jnp.ones((2, 3))}}
    )
    assert isinstance(pair, LoRAPair)
    back = pickle.loads(pickle.dumps(pair.name))
    assert back == pair.name and back.module_path == ("x",)
    assert back.a_path == ("x", "kernel_lora_a")


# ----------------------------------------------------------------- the shared base


def test_scale_by_pair_direction_takes_any_direction() -> None:
    # A toy pair rule on the skeleton: D = M (plain momentum SGD on the factors).
    def direction(pairs, factors, momenta, extra):  # type: ignore[no-untyped-def]
        del factors
        return {i: momenta[i] for p in pairs for i in (p.a_index, p.b_index)}, extra

    from typing import NamedTuple

    class ToyState(NamedTuple):
        count: jax.Array
        mu: optax.Updates

    tx = scale_by_pair_direction(direction, name="toy", state_type=ToyState, momentum=0.5)
    params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
    grads = jax.tree.map(lambda x: 2.0 * x, params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["lora_a"], 1.0)  # 0.5 · 0 + 0.5 · 2
    assert int(state.count) == 1
    with pytest.raises(
        ValueError, match=r"toy\.init: leaves that are not LoRA factors: \['bias'\]"
    ):
        tx.init({**params, "bias": jnp.ones(3)})


def test_gauge_rebalancing_composes_with_any_chain() -> None:
    # The momenta are found by name (optax.tree_utils), not by position: extra transforms
    # before the LoRA-Muon step do not matter.
    rng = np.random.default_rng(1)
    params = {
        "lora_a": jnp.asarray(100.0 * rng.normal(size=(16, 4))),
        "lora_b": jnp.asarray(0.01 * rng.normal(size=(4, 8))),
    }
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    plain = optax.chain(
        optax.clip_by_global_norm(1.0), scale_by_lora_muon(), scale_by_split_weight_decay(0.1)
    )
    tx = with_gauge_rebalancing(plain)
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_bal, _ = tx.update(grads, tx.init(params), params)
    p_plain, p_bal = optax.apply_updates(params, u_plain), optax.apply_updates(params, u_bal)
    w = lambda p: np.asarray(p["lora_a"] @ p["lora_b"], np.float64)  # noqa: E731
    np.testing.assert_allclose(w(p_bal), w(p_plain), rtol=1e-4, atol=1e-5)
    na, nb = (float(jnp.linalg.norm(p_bal[k], ord=2)) for k in ("lora_a", "lora_b"))
    np.testing.assert_allclose(na, nb, rtol=1e-3)
    with pytest.raises(ValueError, match="no factor momenta"):
        with_gauge_rebalancing(optax.sgd(0.1)).init(params)


# ----------------------------------------------------------------- renames


def test_old_names_still_work_with_a_deprecation_warning() -> None:
    from flax import nnx

    from lora_muon_jax.flax import linen as flinen
    from lora_muon_jax.flax import nnx as lnnx

    cases = [
        (lora_muon_jax, "LoraPair", lora_muon_jax.LoRAPair),
        (lora_muon_jax, "LoraDimensionNumbers", lora_muon_jax.LoRADimensionNumbers),
        (lora_muon_jax, "ScaleByLoraMuonState", lora_muon_jax.ScaleByLoRAMuonState),
        (flinen, "LoraDense", flinen.LoRADense),
        (lnnx, "LoraScaleMap", lnnx.LoRAScaleMap),
    ]
    for module, old, new in cases:
        with pytest.warns(DeprecationWarning, match=f"{old} was renamed"):
            assert getattr(module, old) is new
    with pytest.warns(DeprecationWarning, match="rank= was renamed lora_rank="):
        old_layer = lnnx.LoRALinearGeneral(6, 4, rank=2, alpha=4.0, rngs=nnx.Rngs(0))
    new_layer = lnnx.LoRALinearGeneral(6, 4, lora_rank=2, alpha=4.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(old_layer.lora_a[...], new_layer.lora_a[...])
    with pytest.raises(TypeError, match="not both"):
        lnnx.LoRALinearGeneral(6, 4, rank=2, lora_rank=2, rngs=nnx.Rngs(0))


def test_nnx_layers_have_flax_extension_points() -> None:
    from flax import nnx

    from lora_muon_jax.flax import nnx as lnnx

    class Adapter(nnx.LoRAParam):
        pass

    seen = []

    def promote(arrays, dtype=None):  # type: ignore[no-untyped-def]
        seen.append(dtype)
        return nnx.nn.dtypes.promote_dtype(arrays, dtype=dtype)

    layer = lnnx.LoRALinearGeneral(
        6,
        4,
        lora_rank=2,
        lora_param_type=Adapter,
        promote_dtype=promote,
        a_metadata={"tag": "down"},
        a_initializer=nnx.initializers.ones,
        rngs=nnx.Rngs(0),
    )
    assert isinstance(layer.lora_a, Adapter) and isinstance(layer.lora_b, Adapter)
    assert layer.lora_a.get_metadata()["tag"] == "down"
    np.testing.assert_array_equal(layer.lora_a[...], np.ones((6, 2)))
    layer(jnp.ones((3, 6)))
    assert seen == [None]
    base = nnx.Linear(6, 4, rngs=nnx.Rngs(1))
    adapter = lnnx.LoRAAdapter(base, lora_rank=2, lora_param_type=Adapter, rngs=nnx.Rngs(2))
    assert isinstance(adapter.lora_b, Adapter)


# ----------------------------------------------------------------- layering and doctests

# Lower layers never import higher ones; the core imports jax and optax only.
LAYERS = {
    "_deprecation": 0,
    "_coefficients": 0,
    "_stacking": 0,
    "_views": 0,
    "_polar": 1,
    "_pairs": 1,
    "_factors": 2,
    "_checks": 2,
    "_robust": 3,
    "_fallback": 3,
    "_direction": 4,
    "_base": 4,
    "_rebalance": 5,
    "_lora_muon": 6,
    "diagnostics": 6,
    "baselines": 7,
    "sharding": 7,
    "checkpoint": 8,
    "testing": 0,  # stdlib only (an HLO text parser)
    "flax": 8,
    "__init__": 9,
}


def _module_imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for type checkers only do not count
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("lora_muon_jax")
        ):
            parts = node.module.split(".")
            if len(parts) == 1:
                out.update(alias.name for alias in node.names)
            else:
                out.add(parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lora_muon_jax."):
                    out.add(alias.name.split(".")[1])
    return out


def test_import_layering_has_no_upward_imports() -> None:
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        for imported in _module_imports(path):
            if imported in LAYERS and name in LAYERS and imported != name:
                assert LAYERS[imported] < LAYERS[name] or name == "__init__", (name, imported)


def test_no_package_file_over_about_400_lines() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 420, path


def _all_modules() -> list[str]:
    names = ["lora_muon_jax"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="lora_muon_jax."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _all_modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    with warnings.catch_warnings(), jax.numpy_dtype_promotion("standard"):
        # Doctests show user code, written for JAX's default (standard) promotion.
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
