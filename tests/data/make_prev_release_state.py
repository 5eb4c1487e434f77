"""Write ``tests/data/prev_release_state/``: a LoRA-Muon training state in the previous format.

Run against the code of the commit that produced the fixture (b0442fe, the last
commit before 5fd1c6d changed the optimizer-state format: AdamW-fallback moments
of 16-bit leaves went from the leaf's dtype to float32)::

    git worktree add /tmp/oldrel b0442fe
    (cd /tmp && PYTHONPATH=/tmp/oldrel JAX_PLATFORMS=cpu \
        /work/main/.venv/bin/python /work/main/tests/data/make_prev_release_state.py \
        /work/main/tests/data/prev_release_state)
    git worktree remove /tmp/oldrel

It saves ``{"params", "opt_state"}`` after ``STEPS_DONE`` steps with
``lora_muon_jax.checkpoint.save`` (orbax ``StandardSave``, step ``STEPS_DONE``)
and, next to it, ``leaves.npz``: every leaf by its key path as float32/int32
NumPy arrays (an independent copy of what was saved) and the commit's
``__version__``. ``tests/test_optimizer_suite.py`` imports ``make_params``,
``grads_at`` and ``make_optimizer`` from here, so both sides use one problem.
"""

from __future__ import annotations

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

STEPS_DONE = 2
LEARNING_RATE, WEIGHT_DECAY, FALLBACK_LR = 0.1, 0.01, 1e-2


def make_params() -> dict:
    """A float32 pair, a stack of three of its shape, a float32 bias and a bfloat16 norm."""
    rng = np.random.default_rng(20261201)

    def arr(shape, dtype):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-1]), jnp.float32).astype(
            dtype
        )

    return {
        "attn": {"lora_a": arr((8, 2), jnp.float32), "lora_b": arr((2, 6), jnp.float32)},
        "stack": {"lora_a": arr((3, 8, 2), jnp.float32), "lora_b": arr((3, 2, 6), jnp.float32)},
        "bias": arr((6,), jnp.float32),
        "norm": arr((10,), jnp.bfloat16),
    }


def grads_at(params: dict, step: int) -> dict:
    """Deterministic gradients of step ``step`` (a fixed function of the step, not of params)."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1000 + step)
    return jax.tree.unflatten(
        treedef,
        [jnp.asarray(rng.standard_normal(x.shape), jnp.float32).astype(x.dtype) for x in leaves],
    )


def make_optimizer():
    from lora_muon_jax import lora_muon

    # method="paper" only because it compiles ~5x faster than "gram" on CPU; the
    # state format does not depend on the method.
    return lora_muon(
        LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        method="paper",
        fallback_learning_rate=FALLBACK_LR,
    )


def main(out_dir: str) -> None:
    import optax

    import lora_muon_jax
    from lora_muon_jax import checkpoint

    params = make_params()
    tx = make_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(STEPS_DONE):
        updates, state = update(grads_at(params, step), state, params)
        params = optax.apply_updates(params, updates)
    manager = checkpoint.checkpoint_manager(out_dir, enable_async=False)
    checkpoint.save(manager, STEPS_DONE, params, state)
    manager.wait_until_finished()
    tree = {"params": params, "opt_state": state}
    leaves = {
        jax.tree_util.keystr(p): np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    dtypes = {k: str(x.dtype) for k, x in zip(leaves, jax.tree.leaves(tree), strict=True)}
    np.savez(
        f"{out_dir}/leaves.npz",
        __version__=np.asarray(lora_muon_jax.__version__),
        __dtypes__=np.asarray(repr(dtypes)),
        **leaves,
    )


if __name__ == "__main__":
    main(sys.argv[1])
