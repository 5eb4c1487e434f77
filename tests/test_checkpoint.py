"""Orbax checkpoints of LoRA-Muon state: restore bitwise, onto other meshes, resume, atomicity.

Oracles: the saved arrays themselves (restores are compared bit for bit), an
uninterrupted run of the same compiled step (resume must be bit-identical), and
the file system after a writer is SIGKILLed mid-save.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_muon_jax import lora_muon
from lora_muon_jax import sharding as lms

ocp = pytest.importorskip("orbax.checkpoint")
from lora_muon_jax import checkpoint as lmc  # noqa: E402  (needs orbax)

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: tests/conftest.py sets jax_num_cpu_devices=8 before JAX starts",
)

D, H, R = 64, 32, 4


def make_params() -> dict:
    keys = jax.random.split(jax.random.key(0), 5)
    return {
        "attn": {
            "lora_a": jax.random.normal(keys[0], (D, R)) / 8.0,
            "lora_b": jax.random.normal(keys[1], (R, H)) / 8.0,
        },
        "scan": {
            "lora_a": jax.random.normal(keys[2], (2, D, R)) / 8.0,
            "lora_b": jax.random.normal(keys[3], (2, R, H)) / 8.0,
        },
        "norm": jax.random.normal(keys[4], (H,)),
    }


def specs_fsdp_tp() -> dict:
    return {
        "attn": {"lora_a": P("fsdp", None), "lora_b": P(None, "tp")},
        "scan": {"lora_a": P(None, "fsdp", None), "lora_b": P(None, None, "tp")},
        "norm": P("tp"),
    }


def make_opt() -> optax.GradientTransformation:
    return lora_muon(0.1, fallback_learning_rate=1e-2)


def grads_for(step: int, params: dict) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(100 + step), len(leaves))
    noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, noise)


def make_step(opt):
    def step(params, state, noise):
        grads = jax.tree.map(lambda n, p: n + 0.5 * p, noise, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@functools.cache
def compiled_step(mesh_shape: tuple[int, int]):
    """One jitted step per mesh (a fresh closure would recompile for every test)."""
    mesh = jax.make_mesh(mesh_shape, ("fsdp", "tp"))
    opt = make_opt()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs_fsdp_tp())
    state_shardings = lms.optimizer_state_shardings(opt, make_params(), shardings)
    step = jax.jit(
        make_step(opt),
        in_shardings=(shardings, state_shardings, shardings),
        out_shardings=(shardings, state_shardings),
        donate_argnums=(0, 1),
    )
    return opt, shardings, step


def sharded_setup(mesh_shape: tuple[int, int] = (4, 2)):
    opt, shardings, step = compiled_step(mesh_shape)
    params = jax.device_put(make_params(), shardings)
    state = lms.init_sharded(opt, params, shardings)
    return opt, shardings, params, state, step


def run(step, params, state, shardings, steps: range):
    for t in steps:
        params, state = step(params, state, jax.device_put(grads_for(t, params), shardings))
    return params, state


def assert_bitwise(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def assert_layout(tree, target) -> None:
    for x, t in zip(jax.tree.leaves(tree), jax.tree.leaves(target), strict=True):
        assert x.sharding.is_equivalent_to(t.sharding, x.ndim), (x.sharding, t.sharding)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two sharded steps on a (4, 2) fsdp×tp mesh, saved at step 2."""
    opt, shardings, params, state, step = sharded_setup()
    params, state = run(step, params, state, shardings, range(2))
    directory = tmp_path_factory.mktemp("ckpt")
    manager = lmc.checkpoint_manager(directory)
    assert lmc.save(manager, 2, params, state)
    manager.wait_until_finished()
    manager.close()
    host = jax.tree.map(np.asarray, {"params": params, "opt_state": state})
    return opt, directory, host


def test_restore_same_mesh_is_bitwise(trained) -> None:
    opt, directory, host = trained
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs_fsdp_tp())
    target = lmc.abstract_train_state(opt, make_params(), shardings)
    manager = lmc.checkpoint_manager(directory)
    restored = lmc.restore(manager, target)
    assert restored is not None
    step, state = restored
    assert step == 2
    assert_bitwise(state, host)  # NamedTuples and MaskedNodes come back as they were
    assert_layout(state, target)


@pytest.mark.parametrize(
    ("devices", "mesh_shape", "specs"),
    [
        # Other mesh, same 8 devices: axes swapped, every factor sharded along m/n over 8.
        (8, (2, 4), "long8"),
        # Other device count: 4 devices, 1 device.
        (4, (4, 1), "fsdp_tp"),
        (1, (1, 1), "fsdp_tp"),
    ],
)
def test_restore_onto_other_mesh_and_device_count(trained, devices, mesh_shape, specs) -> None:
    opt, directory, host = trained
    mesh = jax.make_mesh(mesh_shape, ("fsdp", "tp"), devices=jax.devices()[:devices])
    if specs == "long8":
        spec_tree = lms.long_axis_partition_specs(make_params(), ("tp", "fsdp"), 8)
    else:
        spec_tree = specs_fsdp_tp()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree)
    target = lmc.abstract_train_state(opt, make_params(), shardings)
    restored = lmc.restore(lmc.checkpoint_manager(directory), target)
    assert restored is not None
    _, state = restored
    assert_bitwise(state, host)
    assert_layout(state, target)
    assert {d.id for x in jax.tree.leaves(state) for d in x.sharding.device_set} == {
        d.id for d in jax.devices()[:devices]
    }


def test_interrupted_run_resumes_bit_identically(tmp_path: Path) -> None:
    """Crash after step 5 (checkpoints every 2 steps: step 5 is lost), resume, finish 6 steps."""
    opt, shardings, params, state, step = sharded_setup()
    expected, expected_state = run(step, params, state, shardings, range(6))

    opt, shardings, params, state, step = sharded_setup()
    manager = lmc.checkpoint_manager(tmp_path, save_interval_steps=2)
    for t in range(5):
        params, state = run(step, params, state, shardings, range(t, t + 1))
        lmc.save(manager, t + 1, params, state)  # orbax: the first save, then every 2nd
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2, 4]
    del params, state, manager  # the "crash": nothing in memory survives

    manager = lmc.checkpoint_manager(tmp_path, save_interval_steps=2)
    restored = lmc.restore(manager, lmc.abstract_train_state(opt, make_params(), shardings))
    assert restored is not None
    last, train_state = restored
    assert last == 4
    params, state = run(
        step, train_state["params"], train_state["opt_state"], shardings, range(last, 6)
    )
    assert_bitwise(params, expected)
    assert_bitwise(state, expected_state)


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import jax, jax.numpy as jnp
    from lora_muon_jax import checkpoint as lmc
    directory = sys.argv[1]
    manager = lmc.checkpoint_manager(directory)
    big = {"lora_a": jnp.arange(4 * 2**20, dtype=jnp.float32).reshape(2**20, 4)}
    lmc.save(manager, 1, big, {"count": jnp.int32(1)})
    manager.wait_until_finished()
    lmc.save(manager, 2, jax.tree.map(lambda x: -x, big), {"count": jnp.int32(2)})
    # Asynchronous save: step 2 is being written into its tmp directory now.
    names = sorted(os.listdir(directory))
    with open(os.path.join(directory, "..", "seen.txt"), "w") as f:
        f.write(" ".join(names))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_writer_never_corrupts_previous_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, str(directory)], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    seen = (tmp_path / "seen.txt").read_text().split()
    # When it died: step 1 finished, step 2 only as a tmp directory.
    assert "1" in seen and "2" not in seen
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in seen), seen
    assert "2" not in os.listdir(directory)

    manager = lmc.checkpoint_manager(directory)
    assert manager.latest_step() == 1
    big = np.arange(4 * 2**20, dtype=np.float32).reshape(2**20, 4)
    target = {
        "params": {"lora_a": jax.ShapeDtypeStruct(big.shape, jnp.float32)},
        "opt_state": {"count": jax.ShapeDtypeStruct((), jnp.int32)},
    }
    restored = lmc.restore(manager, target)
    assert restored is not None
    step, state = restored
    assert step == 1
    np.testing.assert_array_equal(np.asarray(state["params"]["lora_a"]), big)
    assert int(state["opt_state"]["count"]) == 1
    # The directory stays usable: step 2 can be written again.
    lmc.save(manager, 2, {"lora_a": jnp.asarray(-big)}, {"count": jnp.int32(2)})
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2]
