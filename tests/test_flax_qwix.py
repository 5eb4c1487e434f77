"""End to end with Flax NNX and qwix: ``nnx.Optimizer(model, lora_muon(...), wrt=nnx.LoRAParam)``.

Every model here is trained towards a *teacher*: the same architecture with the
same frozen base weights (same seed) and random non-zero LoRA factors, so the
student's LoRA can reach zero loss. Students start from the standard LoRA init
(``lora_b = 0``), i.e. through the degenerate-Gram path of the spec.

Checked: the loss decreases, the frozen base weights are bit-identical after
training, ``find_lora_pairs`` sees exactly the pairs the layers created (with
the right batch axes), and with qwix's ``alpha/rank`` declared as ``lora_scale``
the first step on W has singular values η/2 (so η stays a radius on W).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
qwix = pytest.importorskip("qwix")

import lora_muon_jax  # noqa: E402
from lora_muon_jax import lora_muon  # noqa: E402

BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

# qwix 0.1.8 uses three APIs that flax 0.12.8 deprecates (`Module.iter_modules()`,
# `Variable.value`, `nnx.VariableState`); conftest turns warnings into errors, so
# exactly these third-party deprecations are ignored, for the qwix tests only.
_QWIX_DEPRECATIONS = (
    r"ignore:The 'm\.iter_modules\(\)' method is deprecated:DeprecationWarning",
    r"ignore:'\.value' access is now deprecated:DeprecationWarning",
    r"ignore:'VariableState' was removed:DeprecationWarning",
)


def qwix_warnings(test):
    for spec in _QWIX_DEPRECATIONS:
        test = pytest.mark.filterwarnings(spec)(test)
    return test


def _arrays(state) -> dict[str, np.ndarray]:
    """Flat {keystr: numpy array} of an nnx.State."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {_key(p): np.asarray(v) for p, v in leaves}


def _key(path) -> str:
    """keystr without nnx's trailing ``.value`` attribute key."""
    return jax.tree_util.keystr(tuple(path)).removesuffix(".value")


def _randomize_lora(model, seed: int, scale: float) -> None:
    """Give every LoRA factor of ``model`` random values (for a reachable teacher)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        scale * jax.random.normal(k, v.shape, v.dtype) / np.sqrt(v.shape[-1])
        for k, v in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def _train(model, tx, x, y, steps: int) -> np.ndarray:
    """``steps`` jitted nnx steps of mean-squared error; returns the loss curve."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean(jnp.square(model(x) - y))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return np.asarray([float(train_step(model, optimizer, x, y)) for _ in range(steps)])


def _assert_trained(model, base_before, lora_before, losses, *, min_drop: float) -> None:
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] / min_drop, (losses[0], losses[-1])
    base_after = _arrays(nnx.state(model, BASE))
    assert base_after.keys() == base_before.keys()
    for key, value in base_before.items():
        np.testing.assert_array_equal(base_after[key], value, err_msg=f"frozen {key} moved")
    lora_after = _arrays(nnx.state(model, nnx.LoRAParam))
    assert lora_after.keys() == lora_before.keys()
    for key, value in lora_before.items():
        assert not np.array_equal(lora_after[key], value), f"{key} never moved"


# ---------------------------------------------------------------------------
# nnx.LoRALinear and nnx.LoRA
# ---------------------------------------------------------------------------


class NnxLoraNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.LoRALinear(16, 32, lora_rank=4, rngs=rngs)
        self.l2 = nnx.LoRA(32, 4, 8, base_module=nnx.Linear(32, 8, rngs=rngs), rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_lora_modules_train() -> None:
    x = jax.random.normal(jax.random.key(1), (64, 16), jnp.float32)
    teacher = NnxLoraNet(nnx.Rngs(0))
    _randomize_lora(teacher, seed=5, scale=1.0)
    y = teacher(x)

    model = NnxLoraNet(nnx.Rngs(0))
    lora_state = nnx.state(model, nnx.LoRAParam)
    pairs = lora_muon_jax.find_lora_pairs(lora_state)
    assert sorted((p.a_shape, p.b_shape, p.dims.num_batch_axes) for p in pairs) == [
        ((16, 4), (4, 32), 0),
        ((32, 4), (4, 8), 0),
    ]
    # Standard LoRA init: lora_b is zero, so the model starts at its base.
    assert all(not np.any(v) for k, v in _arrays(lora_state).items() if "lora_b" in k)

    base_before = _arrays(nnx.state(model, BASE))
    lora_before = _arrays(lora_state)
    losses = _train(model, lora_muon(0.05), x, y, steps=60)
    _assert_trained(model, base_before, lora_before, losses, min_drop=5.0)


# ---------------------------------------------------------------------------
# qwix: LoRA on nnx.Linear (dot_general) and nnx.Einsum ('btd,dnh->btnh')
# ---------------------------------------------------------------------------

QWIX_RANK, QWIX_ALPHA = 2, 8.0


class QwixNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(16, 12, rngs=rngs)
        self.heads = nnx.Einsum("btd,dnh->btnh", (12, 3, 4), (3, 4), rngs=rngs)

    def __call__(self, x):
        return self.heads(jnp.tanh(self.dense(x)))


def _qwix_model(seed: int):
    x = jax.random.normal(jax.random.key(1), (4, 6, 16), jnp.float32)
    provider = qwix.LoraProvider(module_path=".*", rank=QWIX_RANK, alpha=QWIX_ALPHA)
    model = qwix.apply_lora_to_model(QwixNet(nnx.Rngs(seed)), provider, x, rngs=nnx.Rngs(seed + 1))
    return model, x


@qwix_warnings
def test_qwix_find_lora_pairs() -> None:
    model, _ = _qwix_model(0)
    state = nnx.state(model, nnx.LoRAParam)
    shapes = {k: v.shape for k, v in _arrays(state).items()}
    assert shapes == {
        "['dense']['kernel_lora_a']": (16, QWIX_RANK),
        "['dense']['kernel_lora_b']": (QWIX_RANK, 12),
        "['heads']['kernel_lora_a']": (12, QWIX_RANK),
        "['heads']['kernel_lora_b']": (QWIX_RANK, 3, 4),
    }
    pairs = lora_muon_jax.find_lora_pairs(state)
    found = sorted((p.name, p.a_shape, p.b_shape, p.dims.num_batch_axes, p.rank) for p in pairs)
    assert found == [
        ("['dense']['kernel_lora_{a,b}']", (16, 2), (2, 12), 0, 2),
        ("['heads']['kernel_lora_{a,b}']", (12, 2), (2, 3, 4), 0, 2),
    ]
    # The base weights are plain nnx.Param (not factors): the labels keep them out.
    labels = lora_muon_jax.lora_param_labels(nnx.state(model, nnx.Param))
    flat = {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert {k for k, v in flat.items() if v == "lora"} == set(shapes)
    assert {k for k, v in flat.items() if v == "fallback"} == {
        "['dense']['bias']",
        "['dense']['kernel']",
        "['heads']['bias']",
        "['heads']['kernel']",
    }


class QwixMoreLayouts(nnx.Module):
    """Output projection 'btnh,nhd->btd' (2 contracting axes) and a 1-D conv."""

    def __init__(self, rngs: nnx.Rngs):
        self.out = nnx.Einsum("btnh,nhd->btd", (3, 4, 8), (8,), rngs=rngs)
        self.conv = nnx.Conv(8, 8, kernel_size=(3,), rngs=rngs)

    def __call__(self, x):
        return self.conv(self.out(x))


@qwix_warnings
def test_qwix_find_lora_pairs_multi_axis_factors() -> None:
    x = jax.random.normal(jax.random.key(1), (2, 6, 3, 4), jnp.float32)
    provider = qwix.LoraProvider(module_path=".*", rank=QWIX_RANK, alpha=QWIX_ALPHA)
    model = qwix.apply_lora_to_model(QwixMoreLayouts(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
    pairs = lora_muon_jax.find_lora_pairs(nnx.state(model, nnx.LoRAParam))
    found = sorted((p.name, p.a_shape, p.b_shape, p.dims.num_batch_axes) for p in pairs)
    assert found == [
        ("['conv']['kernel_lora_{a,b}']", (3, 8, 2), (2, 8), 0),
        ("['out']['kernel_lora_{a,b}']", (3, 4, 2), (2, 8), 0),
    ]


@qwix_warnings
def test_qwix_linear_and_einsum_train() -> None:
    x = jax.random.normal(jax.random.key(1), (4, 6, 16), jnp.float32)
    teacher, _ = _qwix_model(0)
    _randomize_lora(teacher, seed=5, scale=0.5)
    y = teacher(x)

    model, _ = _qwix_model(0)
    base_before = _arrays(nnx.state(model, BASE))
    lora_before = _arrays(nnx.state(model, nnx.LoRAParam))
    assert all(not np.any(v) for k, v in lora_before.items() if "lora_b" in k)
    tx = lora_muon(0.05, lora_scale=QWIX_ALPHA / QWIX_RANK)
    losses = _train(model, tx, x, y, steps=60)
    _assert_trained(model, base_before, lora_before, losses, min_drop=5.0)


@qwix_warnings
@pytest.mark.parametrize("method", ["gram", "paper"])
def test_qwix_lora_scale_keeps_eta_a_radius_on_w(method: str) -> None:
    """First step from lora_b = 0: ΔW = (α/r)(A'B' − AB) has all r singular values η/2.

    With B = 0 only the B half moves (ΔA = 0, spec "degenerate Grams"), so by the
    split-decay identity A'B'ᵀ = (1 − λη)ABᵀ + A ΔBᵀ + ... = A ΔBᵀ: the tangent step,
    untouched by the decay (λη = 0.1 here, so a step scaled by s = √(1 − λη) or 1/s
    would be off by 5%). A ΔBᵀ = -(η/2)·msign(·)·(A R_A)ᵀ-like, a partial isometry times
    η/2, so all r singular values equal η/2. The effective W of a qwix pair is
    (α/r)·lora_a·lora_b (trailing axes flattened). Tolerance 5e-3: the matmul-only
    polar iterations are not exact (spec: ~5e-4 relative on well-conditioned factors;
    a fresh he_uniform lora_a is well conditioned), 10x margin.
    """
    x = jax.random.normal(jax.random.key(1), (4, 6, 16), jnp.float32)
    teacher, _ = _qwix_model(0)
    _randomize_lora(teacher, seed=5, scale=0.5)
    y = teacher(x)
    model, _ = _qwix_model(0)
    eta, decay, scale = 0.05, 2.0, QWIX_ALPHA / QWIX_RANK
    _train(model, lora_muon(eta, weight_decay=decay, lora_scale=scale, method=method), x, y, 1)
    for layer in ("dense", "heads"):
        a = np.asarray(getattr(model, layer).kernel_lora_a[...], np.float64)
        b = np.asarray(getattr(model, layer).kernel_lora_b[...], np.float64)
        delta_w = scale * a.reshape(-1, QWIX_RANK) @ b.reshape(QWIX_RANK, -1)
        sigma = np.linalg.svd(delta_w, compute_uv=False)[:QWIX_RANK]
        np.testing.assert_allclose(sigma, eta / 2, rtol=5e-3, err_msg=layer)


# ---------------------------------------------------------------------------
# Stacked (nnx.vmap) layers with an nnx.scan forward
# ---------------------------------------------------------------------------

NUM_LAYERS, WIDTH, RANK = 3, 16, 4


class ScannedStack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=NUM_LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs):
            return nnx.LoRALinear(WIDTH, WIDTH, lora_rank=RANK, rngs=rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, layer):
            return jnp.tanh(layer(x))

        return forward(x, self.layers)


def test_scanned_stack_trains() -> None:
    x = jax.random.normal(jax.random.key(1), (64, WIDTH), jnp.float32)
    teacher = ScannedStack(nnx.Rngs(0))
    _randomize_lora(teacher, seed=5, scale=1.0)
    y = teacher(x)

    model = ScannedStack(nnx.Rngs(0))
    lora_state = nnx.state(model, nnx.LoRAParam)
    pairs = lora_muon_jax.find_lora_pairs(lora_state)
    assert [(p.a_shape, p.b_shape, p.dims.num_batch_axes) for p in pairs] == [
        ((NUM_LAYERS, WIDTH, RANK), (NUM_LAYERS, RANK, WIDTH), 1)
    ]
    base_before = _arrays(nnx.state(model, BASE))
    lora_before = _arrays(lora_state)
    losses = _train(model, lora_muon(0.05), x, y, steps=60)
    _assert_trained(model, base_before, lora_before, losses, min_drop=5.0)
    # Every layer of the stack moved (independent pairs per layer index).
    lora_after = _arrays(nnx.state(model, nnx.LoRAParam))
    for key, value in lora_before.items():
        for i in range(NUM_LAYERS):
            assert not np.array_equal(lora_after[key][i], value[i]), f"{key}[{i}] never moved"
