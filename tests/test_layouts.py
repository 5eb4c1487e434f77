"""Every LoRA layout of the JAX ecosystem, each checked by a per-layer oracle, and no silent guess.

Each tree is the one the real library produces where it installs here (flax
``nnx``, qwix, HF PEFT through torch) and otherwise reproduces the documented
names and shapes (MaxText scanned layers, gemma ``peft``, levanter, kauldron
``partial_updates``, kohya). The oracle: stepping the whole tree with
``lora_muon`` equals stepping each layer's pair alone, sliced out of the tree
by hand (NumPy indexing written from the layout, not the package's views) as a
plain 2-D flax pair ``lora_a (m, r)``, ``lora_b (r, n)``.

Tolerance: the two runs do the same float32 arithmetic, batched or not, so
they differ by reassociation only; 1e-6 relative to the largest entry is ~8
float32 ulps at the factors' scale (measured: ≤ 1.1e-7).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_muon_jax import (
    LoRADimensionNumbers,
    find_lora_pairs,
    lora_muon,
    lora_param_labels,
    maxtext_dimension_numbers,
    pair_diagnostics,
)
from lora_muon_jax._pairs import from_math_layout, to_math_layout

LR, WD = 0.1, 0.01
RTOL = 1e-6  # relative to the largest entry (see the module docstring)

Pairs2D = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (lora_a (m, r), lora_b (r, n))
Slicer = Callable[[dict], Pairs2D]


def _randomize(tree: dict, seed: int) -> dict:
    """Random float32 values in every leaf (real libraries init lora_b = 0: a degenerate step)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), jnp.float32), tree)


_ALONE_OPT = lora_muon(LR, weight_decay=WD)
_ALONE_UPDATE = jax.jit(_ALONE_OPT.update)


def _run(tree: dict, grads: list[dict], opt=None, update=None) -> dict:
    opt = opt if opt is not None else _ALONE_OPT
    update = update if update is not None else jax.jit(opt.update)
    state = opt.init(tree)
    for g in grads:
        u, state = update(g, state, tree)
        tree = optax.apply_updates(tree, u)
    return tree


def _assert_per_layer_oracle(tree: dict, slicer: Slicer, **opt_kwargs) -> int:
    """Stepping ``tree`` (2 steps, momentum) == stepping each sliced 2-D pair alone."""
    params = _randomize(tree, 0)
    grads = [_randomize(tree, 1), _randomize(tree, 2)]
    opt = lora_muon(LR, weight_decay=WD, **opt_kwargs)
    stepped = slicer(jax.device_get(_run(params, grads, opt)))
    before = slicer(jax.device_get(params))
    sliced_grads = [slicer(jax.device_get(g)) for g in grads]
    assert set(stepped) == set(before) and before
    for name, (a, b) in before.items():
        m, r = a.shape
        assert b.shape[0] == r and r <= min(m, b.shape[1]), name
        alone = _run(
            {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)},
            [
                {"lora_a": jnp.asarray(g[name][0]), "lora_b": jnp.asarray(g[name][1])}
                for g in sliced_grads
            ],
            update=_ALONE_UPDATE,
        )
        for got, want, what in (
            (stepped[name][0], alone["lora_a"], "a"),
            (stepped[name][1], alone["lora_b"], "b"),
        ):
            want = np.asarray(want)
            scale = float(np.max(np.abs(want)))
            np.testing.assert_allclose(
                got, want, rtol=0, atol=RTOL * scale, err_msg=f"{name}.{what}"
            )
            # the step moved it: the oracle compares a real step, not two no-ops
            assert not np.allclose(got, (a if what == "a" else b)), name
    return len(before)


# ---------------------------------------------------------------------------
# flax nnx (real): nnx.LoRA, nnx.LoRALinear, nnx.vmap-stacked layers
# ---------------------------------------------------------------------------


def test_flax_nnx_lora_and_vmapped_stack() -> None:
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lora = nnx.LoRA(12, 3, 10, rngs=rngs)
            self.linear = nnx.LoRALinear(10, 8, lora_rank=2, rngs=rngs)

            @nnx.split_rngs(splits=4)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return nnx.LoRALinear(8, 8, lora_rank=3, rngs=rngs)

            self.layers = create(rngs)

    tree = nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(0)), nnx.LoRAParam))
    assert tree["layers"]["lora"]["lora_a"].shape == (4, 8, 3)

    def slicer(t: dict) -> Pairs2D:
        out = {
            "lora": (t["lora"]["lora_a"], t["lora"]["lora_b"]),
            "linear": (t["linear"]["lora"]["lora_a"], t["linear"]["lora"]["lora_b"]),
        }
        for i in range(4):
            out[f"layers[{i}]"] = (
                t["layers"]["lora"]["lora_a"][i],
                t["layers"]["lora"]["lora_b"][i],
            )
        return out

    assert _assert_per_layer_oracle(tree, slicer) == 6


# ---------------------------------------------------------------------------
# qwix (real): Linear, Einsum (multi-axis out and in), conv; tunix models use these
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # qwix 0.1.8 on flax 0.12.8
def test_qwix_linear_einsum_conv() -> None:
    nnx = pytest.importorskip("flax.nnx")
    qwix = pytest.importorskip("qwix")

    class Net(nnx.Module):  # tunix-like names: `w` of an einsum projection
        def __init__(self, rngs):
            self.dense = nnx.Linear(6, 12, rngs=rngs)
            self.q = nnx.Einsum("btd,dnh->btnh", (12, 3, 4), rngs=rngs)
            self.o = nnx.Einsum("btnh,nhd->btd", (3, 4, 8), rngs=rngs)
            self.conv = nnx.Conv(8, 8, kernel_size=(3,), rngs=rngs)

        def __call__(self, x):
            return self.conv(self.o(self.q(self.dense(x))))

    x = jnp.ones((2, 5, 6), jnp.float32)
    provider = qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0)
    model = qwix.apply_lora_to_model(Net(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
    tree = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    shapes = {k: {n: v.shape for n, v in d.items()} for k, d in tree.items()}
    assert shapes["q"] == {"kernel_lora_a": (12, 2), "kernel_lora_b": (2, 3, 4)}
    assert shapes["o"] == {"kernel_lora_a": (3, 4, 2), "kernel_lora_b": (2, 8)}
    assert shapes["conv"] == {"kernel_lora_a": (3, 8, 2), "kernel_lora_b": (2, 8)}

    def slicer(t: dict) -> Pairs2D:
        return {
            k: (np.reshape(d["kernel_lora_a"], (-1, 2)), np.reshape(d["kernel_lora_b"], (2, -1)))
            for k, d in t.items()
        }

    assert _assert_per_layer_oracle(tree, slicer) == 4


# ---------------------------------------------------------------------------
# MaxText scanned layers (reproduced): the layer axis inside both factors
# ---------------------------------------------------------------------------

EMBED, LAYERS, R, HEADS, HEAD_DIM, MLP = 16, 3, 2, 2, 4, 12


def _maxtext_tree() -> dict:
    """``scan_layers=True``, ``param_scan_axis=1``: kernels (embed, layers, ...)."""
    z = np.zeros
    return {
        "decoder": {
            "layers": {
                "self_attention": {
                    "query": {
                        "lora_a": z((EMBED, LAYERS, R)),
                        "lora_b": z((R, LAYERS, HEADS, HEAD_DIM)),
                    },
                    "out": {
                        "lora_a": z((HEADS, LAYERS, HEAD_DIM, R)),
                        "lora_b": z((R, LAYERS, EMBED)),
                    },
                },
                "mlp": {"wi": {"lora_a": z((EMBED, LAYERS, R)), "lora_b": z((R, LAYERS, MLP))}},
            },
            "logits_dense": {"lora_a": z((EMBED, R)), "lora_b": z((R, 20))},  # not scanned
        }
    }


def _maxtext_slicer(t: dict) -> Pairs2D:
    out = {}
    layers = t["decoder"]["layers"]
    for name, d in (
        ("query", layers["self_attention"]["query"]),
        ("out", layers["self_attention"]["out"]),
        ("wi", layers["mlp"]["wi"]),
    ):
        a, b = np.asarray(d["lora_a"]), np.asarray(d["lora_b"])
        for i in range(LAYERS):
            out[f"{name}[{i}]"] = (a[:, i].reshape(-1, R), b[:, i].reshape(R, -1))
    d = t["decoder"]["logits_dense"]
    out["logits"] = (np.asarray(d["lora_a"]), np.asarray(d["lora_b"]))
    return out


def _maxtext_dims(name, a_shape, b_shape):
    del a_shape, b_shape
    return maxtext_dimension_numbers() if "layers" in name.module_path else None


def test_maxtext_scanned_layers_need_the_spec_and_then_step_per_layer() -> None:
    tree = _maxtext_tree()
    # By default: an error that names the pair, the readings and the spec, never one
    # (embed·layers)×(layers·heads·head_dim) matrix coupling all layers.
    with pytest.raises(ValueError) as info:
        find_lora_pairs(tree)
    msg = str(info.value)
    assert "['decoder']['layers']['mlp']['wi']['lora_a']" in msg  # the first pair in tree order
    assert "(16, 3, 2)" in msg and "(2, 3, 12)" in msg
    assert "more than one reading" in msg
    assert "a_batch_axes=(1,), b_batch_axes=(1,)" in msg and "num_batch_axes=0" in msg
    assert "maxtext_dimension_numbers()" in msg
    # A global spec fails loudly on the unscanned pair; the per-pair callable reads both.
    with pytest.raises(ValueError, match=r"(?s)logits_dense.*fewer than 2 axes"):
        find_lora_pairs(tree, dimension_numbers=maxtext_dimension_numbers())
    pairs = {p.name: p for p in find_lora_pairs(tree, dimension_numbers=_maxtext_dims)}
    query = pairs["['decoder']['layers']['self_attention']['query']['lora_{a,b}']"]
    assert (query.batch_shape, query.rank, query.leading_batch_axes) == ((LAYERS,), R, False)
    assert query.dims.a_batch_axes == query.dims.b_batch_axes == (1,)
    assert pairs["['decoder']['logits_dense']['lora_{a,b}']"].batch_shape == ()
    # Equal-shape query/wi views stack into one batch (the stacked path) and stay per layer.
    assert _assert_per_layer_oracle(tree, _maxtext_slicer, dimension_numbers=_maxtext_dims) == 10


def test_maxtext_views_invert_exactly() -> None:
    tree = _maxtext_tree()
    rng = np.random.default_rng(0)
    for pair in find_lora_pairs(tree, dimension_numbers=_maxtext_dims):
        for role, shape in (("a", pair.a_shape), ("b", pair.b_shape)):
            x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
            y = to_math_layout(x, pair, role)  # type: ignore[arg-type]
            assert y.shape[0] == int(np.prod(pair.batch_shape)) and y.shape[-1] == R
            np.testing.assert_array_equal(from_math_layout(y, pair, role), x)  # type: ignore[arg-type]


def test_maxtext_diagnostics_per_layer() -> None:
    # One value per layer (batch_shape), not per leading axis of lora_a (its embed axis).
    tree = _randomize(_maxtext_tree(), 3)
    diags = pair_diagnostics(tree, dimension_numbers=_maxtext_dims)
    got = diags["['decoder']['layers']['mlp']['wi']['lora_{a,b}']"]
    assert got.cond_a.shape == got.balance.shape == (LAYERS,)
    wi = tree["decoder"]["layers"]["mlp"]["wi"]
    a, b = np.asarray(wi["lora_a"], np.float64), np.asarray(wi["lora_b"], np.float64)
    for i in range(LAYERS):
        sa = np.linalg.svd(a[:, i], compute_uv=False)
        sb = np.linalg.svd(b[:, i], compute_uv=False)
        # float32 Grams' eigenvalues: ~1e-6 relative at these condition numbers
        np.testing.assert_allclose(float(got.cond_a[i]), sa[0] / sa[-1], rtol=1e-4)
        np.testing.assert_allclose(float(got.balance[i]), sa[0] / sb[0], rtol=1e-4)


def test_batch_axes_at_different_positions_and_orders() -> None:
    # lora_a (in, L1, r, L2), lora_b (L2, r, out, L1): batch axes (1, 3) in a pair with (3, 0) in b.
    a_shape, b_shape = (6, 2, 3, 4), (4, 3, 5, 2)
    dims = LoRADimensionNumbers(a_batch_axes=(1, 3), b_batch_axes=(-1, 0), a_rank_axis=-1)
    tree = {"lora_a": np.zeros(a_shape), "lora_b": np.zeros(b_shape)}
    (pair,) = find_lora_pairs(tree, dimension_numbers=dims)
    assert (pair.batch_shape, pair.rank, pair.dims.b_batch_axes) == ((2, 4), 3, (3, 0))

    def slicer(t: dict) -> Pairs2D:
        a, b = np.asarray(t["lora_a"]), np.asarray(t["lora_b"])
        return {f"[{i},{j}]": (a[:, i, :, j], b[j, :, :, i]) for i in range(2) for j in range(4)}

    assert _assert_per_layer_oracle(tree, slicer, dimension_numbers=dims) == 8
    with pytest.raises(ValueError, match=r"batch axes differ"):
        find_lora_pairs(tree, dimension_numbers=dims._replace(b_batch_axes=(0, 3)))
    with pytest.raises(ValueError, match="give both a_batch_axes and b_batch_axes"):
        find_lora_pairs(tree, dimension_numbers=LoRADimensionNumbers(a_batch_axes=(1, 3)))


# ---------------------------------------------------------------------------
# levanter-style (reproduced): a leading layer axis
# ---------------------------------------------------------------------------


def test_leading_layer_axis_flax_names_and_torch_names() -> None:
    layers, d_in, d_out, r = 4, 10, 6, 3
    z = np.zeros
    tree = {
        # flax names, stacked by nnx.vmap / nn.scan / a levanter Stacked
        "blocks": {"mlp": {"lora_a": z((layers, d_in, r)), "lora_b": z((layers, r, d_out))}},
        # torch names, levanter's LoraLinear (lora_A.weight (r, in), lora_B.weight (out, r))
        "stacked": {
            "q_proj": {
                "lora": {
                    "lora_A": {"weight": z((layers, r, d_in))},
                    "lora_B": {"weight": z((layers, d_out, r))},
                }
            }
        },
    }

    def slicer(t: dict) -> Pairs2D:
        m = t["blocks"]["mlp"]
        q = t["stacked"]["q_proj"]["lora"]
        out = {}
        for i in range(layers):
            out[f"mlp[{i}]"] = (np.asarray(m["lora_a"][i]), np.asarray(m["lora_b"][i]))
            out[f"q[{i}]"] = (
                np.asarray(q["lora_A"]["weight"][i]).T,
                np.asarray(q["lora_B"]["weight"][i]).T,
            )
        return out

    assert _assert_per_layer_oracle(tree, slicer) == 2 * layers


# ---------------------------------------------------------------------------
# gemma peft (reproduced): einsum batch dims in `a` only flatten into m
# ---------------------------------------------------------------------------


def test_gemma_einsum_lora_batch_dims_in_a_only() -> None:
    # gemma.peft's einsum decomposition: 'bijk,bnmjk->bimn' with weights (B, N, M, J, K)
    # gives a (B, J, K, r), b (r, N, M): one pair W[(b,j,k), (n,m)] = A @ B, m = B·J·K.
    b_, n, m_, j, k, r = 2, 5, 6, 3, 4, 7
    tree = {
        "attn": {"q_einsum": {"lora": {"a": np.zeros((8, r)), "b": np.zeros((r, 2, 4))}}},
        "batched": {"lora": {"a": np.zeros((b_, j, k, r)), "b": np.zeros((r, n, m_))}},
    }
    pairs = {p.name: p for p in find_lora_pairs(tree)}
    assert pairs["['batched']['lora']['{a,b}']"].batch_shape == ()

    def slicer(t: dict) -> Pairs2D:
        return {
            "q": (
                np.reshape(t["attn"]["q_einsum"]["lora"]["a"], (8, r)),
                np.reshape(t["attn"]["q_einsum"]["lora"]["b"], (r, 8)),
            ),
            "batched": (
                np.reshape(t["batched"]["lora"]["a"], (-1, r)),
                np.reshape(t["batched"]["lora"]["b"], (r, -1)),
            ),
        }

    assert _assert_per_layer_oracle(tree, slicer) == 2


# ---------------------------------------------------------------------------
# kauldron partial_updates (reproduced): frozen leaves arrive as MaskedNode holes
# ---------------------------------------------------------------------------


def test_kauldron_partial_updates_masked_holes() -> None:
    layers, d, r = 3, 8, 2
    tree = {
        "layer": {
            "kernel": np.zeros((layers, d, d)),  # frozen base weight
            "lora": {"lora_a": np.zeros((layers, d, r)), "lora_b": np.zeros((layers, r, d))},
        },
        "frozen_adapter": {"lora_a": np.zeros((d, r)), "lora_b": np.zeros((r, d))},
    }
    mask = {
        "layer": {"kernel": False, "lora": {"lora_a": True, "lora_b": True}},
        "frozen_adapter": {"lora_a": False, "lora_b": False},
    }
    params = _randomize(tree, 0)
    grads = [_randomize(tree, 1), _randomize(tree, 2)]
    opt = optax.masked(lora_muon(LR, weight_decay=WD), mask)
    stepped = jax.device_get(_run(params, grads, opt))
    # masked leaves pass their gradients through untouched (optax.masked's contract)
    lora = params["layer"]["lora"]
    for i in range(layers):
        alone = _run(
            {"lora_a": lora["lora_a"][i], "lora_b": lora["lora_b"][i]},
            [
                {
                    "lora_a": g["layer"]["lora"]["lora_a"][i],
                    "lora_b": g["layer"]["lora"]["lora_b"][i],
                }
                for g in grads
            ],
            update=_ALONE_UPDATE,
        )
        for role in ("lora_a", "lora_b"):
            want = np.asarray(alone[role])
            np.testing.assert_allclose(
                stepped["layer"]["lora"][role][i], want, rtol=0, atol=RTOL * np.max(np.abs(want))
            )


# ---------------------------------------------------------------------------
# HF PEFT (real, through torch): lora_A (r, in), lora_B (out, r); conv and embedding
# ---------------------------------------------------------------------------


def _peft_state() -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 12, bias=False)
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.embed = torch.nn.Embedding(20, 6)

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "conv", "embed"])
    model = peft.get_peft_model(Net(), config)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _nested(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _peft_slicer(flat_of: Callable[[dict], dict[str, np.ndarray]]) -> Slicer:
    def slicer(t: dict) -> Pairs2D:
        f = flat_of(t)
        pre = "base_model.model."
        a = f[pre + "q_proj.lora_A.default.weight"]
        b = f[pre + "q_proj.lora_B.default.weight"]
        ca = f[pre + "conv.lora_A.default.weight"]
        cb = f[pre + "conv.lora_B.default.weight"]
        ea = f[pre + "embed.lora_embedding_A.default"]
        eb = f[pre + "embed.lora_embedding_B.default"]
        return {
            "q_proj": (np.asarray(a).T, np.asarray(b).T),
            "conv": (np.asarray(ca).reshape(2, -1).T, np.asarray(cb).reshape(8, 2).T),
            "embed": (np.asarray(ea).T, np.asarray(eb).T),
        }

    return slicer


def _flatten(t: dict) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(t)[0]
    return {".".join(str(k.key) for k in path): v for path, v in leaves}  # type: ignore[attr-defined]


def test_peft_trees_flat_and_nested() -> None:
    state = _peft_state()
    factors = {k: v for k, v in state.items() if "lora_" in k}
    assert factors["base_model.model.q_proj.lora_A.default.weight"].shape == (2, 16)
    assert factors["base_model.model.conv.lora_B.default.weight"].shape == (8, 2, 1, 1)
    # flat dotted keys, as loaded from a state dict / safetensors
    pairs = {p.name: p for p in find_lora_pairs(state)}
    assert {p.rank for p in pairs.values()} == {2} and len(pairs) == 3
    q = next(p for p in pairs.values() if p.module_path[-1] == "q_proj")
    assert q.module_path == ("base_model", "model", "q_proj")
    labels = lora_param_labels(state)
    assert labels["base_model.model.q_proj.base_layer.weight"] == "fallback"
    assert labels["base_model.model.conv.base_layer.bias"] == "fallback"
    assert _assert_per_layer_oracle(factors, _peft_slicer(lambda t: t)) == 3
    # nested lora_A: {default: {weight: ...}}
    nested = _nested(factors)
    assert _assert_per_layer_oracle(nested, _peft_slicer(_flatten)) == 3


def test_peft_square_pair_reads_rank_4() -> None:
    # in == out == 64, r = 4: the torch names give the layout, no "rank-64" misreading.
    tree = {"q": {"lora_A": {"weight": np.zeros((4, 64))}, "lora_B": {"weight": np.zeros((64, 4))}}}
    (pair,) = find_lora_pairs(tree)
    assert pair.rank == 4 and pair.dims.a_rank_axis == 0

    def slicer(t: dict) -> Pairs2D:
        q = t["q"]
        return {"q": (np.asarray(q["lora_A"]["weight"]).T, np.asarray(q["lora_B"]["weight"]).T)}

    _assert_per_layer_oracle(tree, slicer)


def test_kohya_down_up() -> None:
    z = np.zeros
    tree = {
        "lora_unet_mid_attn_to_q.lora_down.weight": z((4, 32)),
        "lora_unet_mid_attn_to_q.lora_up.weight": z((24, 4)),
        "lora_unet_mid_attn_to_q.alpha": z(()),
        "lora_unet_conv_in.lora_down.weight": z((4, 3, 3, 3)),
        "lora_unet_conv_in.lora_up.weight": z((8, 4, 1, 1)),
    }
    pairs = find_lora_pairs(tree)
    assert sorted((p.a_shape, p.rank) for p in pairs) == [((4, 3, 3, 3), 4), ((4, 32), 4)]
    assert lora_param_labels(tree)["lora_unet_mid_attn_to_q.alpha"] == "fallback"

    def slicer(t: dict) -> Pairs2D:
        q, c = "lora_unet_mid_attn_to_q.", "lora_unet_conv_in."
        return {
            "q": (np.asarray(t[q + "lora_down.weight"]).T, np.asarray(t[q + "lora_up.weight"]).T),
            "c": (
                np.asarray(t[c + "lora_down.weight"]).reshape(4, -1).T,
                np.asarray(t[c + "lora_up.weight"]).reshape(8, 4).T,
            ),
        }

    factors = {k: v for k, v in tree.items() if not k.endswith("alpha")}
    assert _assert_per_layer_oracle(factors, slicer) == 2


# ---------------------------------------------------------------------------
# No silent guess: ambiguity, impossible ranks, factor-looking names no rule pairs
# ---------------------------------------------------------------------------


def test_stacked_or_conv_plus_einsum_is_ambiguous() -> None:
    tree = {"blk": {"lora_a": np.zeros((4, 16, 4)), "lora_b": np.zeros((4, 4, 8))}}
    with pytest.raises(ValueError) as info:
        find_lora_pairs(tree)
    msg = str(info.value)
    for part in (
        "['blk']['lora_a']",
        "['blk']['lora_b']",
        "(4, 16, 4)",
        "(4, 4, 8)",
        "more than one reading",
        "LoRADimensionNumbers(num_batch_axes=1): 4 independent",
        "LoRADimensionNumbers(num_batch_axes=0): one pair of A 64×4, B 32×4",
        "dimension_numbers=",
    ):
        assert part in msg, part
    # through the optimizer too, at init
    with pytest.raises(ValueError, match="more than one reading"):
        lora_muon(LR).init(_randomize(tree, 0))
    (pair,) = find_lora_pairs(tree, dimension_numbers=LoRADimensionNumbers(num_batch_axes=1))
    assert pair.batch_shape == (4,)


def test_square_pair_under_flax_names_raises_rank_above_min() -> None:
    tree = {"q": {"lora_a": np.zeros((4, 64)), "lora_b": np.zeros((64, 4))}}
    with pytest.raises(ValueError) as info:
        find_lora_pairs(tree)
    msg = str(info.value)
    assert "rank larger than min(m, n)" in msg and "(m=4, n=4, r=64)" in msg
    assert "['q']['lora_a']" in msg and "(4, 64)" in msg and "(64, 4)" in msg
    # the hint: the torch layout reads it as rank 4
    assert "LoRADimensionNumbers(num_batch_axes=0, a_rank_axis=0, b_rank_axis=-1)" in msg
    assert "(m=64, n=64, r=4)" in msg
    dims = LoRADimensionNumbers(a_rank_axis=0, b_rank_axis=-1)
    (pair,) = find_lora_pairs(tree, dimension_numbers=dims)
    assert pair.rank == 4
    # an explicit spec is checked too
    with pytest.raises(ValueError, match="rank larger than min"):
        find_lora_pairs(tree, dimension_numbers=LoRADimensionNumbers(num_batch_axes=0))


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"q": {"Lora_A": np.zeros((2, 8)), "Lora_B": np.zeros((8, 2))}}, "Lora_A"),
        ({"q": {"lora_A": {"default": {"extra": {"weight": np.zeros((2, 8))}}}}}, "lora_A"),
        ({"q.LORA_DOWN.weight": np.zeros((2, 8))}, "LORA_DOWN"),
        ({"q": {"attn_LoRA_A": np.zeros((2, 8))}}, "attn_LoRA_A"),
    ],
)
def test_factor_looking_names_no_rule_pairs_raise(tree: dict, key: str) -> None:
    with pytest.raises(ValueError) as info:
        find_lora_pairs(tree)
    msg = str(info.value)
    assert f"looks like a LoRA factor ({key!r})" in msg and "(2, 8)" in msg and "pair_rule=" in msg
    with pytest.raises(ValueError, match="looks like a LoRA factor"):
        lora_muon(LR).init(_randomize(tree, 0))


@pytest.mark.parametrize(
    ("tree", "missing"),
    [
        ({"q": {"lora_A": {"weight": np.zeros((2, 8))}}}, r"\['q'\]\['lora_A'\]\['weight'\]"),
        ({"q.lora_down.weight": np.zeros((2, 8))}, r"\['q.lora_down.weight'\]"),
        ({"q": {"lora_a": np.zeros((8, 2))}}, r"\['q'\]\['lora_a'\]"),
    ],
)
def test_lone_factors_of_every_naming_raise(tree: dict, missing: str) -> None:
    with pytest.raises(ValueError, match=missing + r" \(shape \(\d+, \d+\)\) has no matching"):
        find_lora_pairs(tree)


def test_non_factor_neighbours_stay_fallback() -> None:
    z = np.zeros
    tree = {
        "q": {
            "lora_A": {"default": {"weight": z((2, 8))}},
            "lora_B": {"default": {"weight": z((8, 2)), "bias": z((8,))}},
        },
        "lora_scale": z(()),
        "lora_magnitude_vector": {"default": {"weight": z((8,))}},
    }
    labels = _flatten(lora_param_labels(tree))
    assert labels["q.lora_B.default.bias"] == "fallback"
    assert labels["lora_scale"] == labels["lora_magnitude_vector.default.weight"] == "fallback"
    assert labels["q.lora_A.default.weight"] == labels["q.lora_B.default.weight"] == "lora"
