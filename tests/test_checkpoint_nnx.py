"""``checkpoint.save_nnx`` / ``restore_nnx``: an ``nnx.Optimizer`` + LoRA'd HF model saved on one
mesh and restored onto another mesh and device count.

Oracles: the saved arrays (a restore is compared bit for bit, shardings are the new mesh's),
and an uninterrupted run of the same steps (on the same mesh the continuation is bit-identical;
on another mesh only the float32 reduction order differs, ≤ 1e-5 relative in the loss).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from lora_muon_jax.finetune import adapt, make_mesh, make_optimizer, train_step
from lora_muon_jax.hf import load_pretrained
from tests import hf_fixtures as fx

lmc = pytest.importorskip("lora_muon_jax.checkpoint")

STEPS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return fx.make_checkpoint(tmp_path_factory.mktemp("hf") / "llama", "llama")


def _batch(step: int) -> np.ndarray:
    return np.random.default_rng(step).integers(0, fx.VOCAB, (8, 17), dtype=np.int32)


def _build(directory: pathlib.Path, mesh: jax.sharding.Mesh, rank: int = 4):  # type: ignore[no-untyped-def]
    model = load_pretrained(directory, mesh=mesh)
    adapt(model, rank=rank, alpha=2.0 * rank, mesh=mesh, seed=0)
    optimizer = nnx.Optimizer(
        model, make_optimizer("lora_muon", 0.05, STEPS, model), wrt=nnx.LoRAParam
    )
    return model, optimizer


def _steps(model, optimizer, start: int, stop: int, mesh) -> list[float]:  # type: ignore[no-untyped-def]
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    return [
        float(train_step(model, optimizer, jax.device_put(_batch(t), sharding)))
        for t in range(start, stop)
    ]


def _flat(tree) -> list[tuple[str, jax.Array]]:  # type: ignore[no-untyped-def]
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_restore_onto_another_mesh_and_device_count(
    base: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    mesh8 = make_mesh((2, 2, 2))
    with jax.set_mesh(mesh8):
        model, optimizer = _build(base, mesh8)
        _steps(model, optimizer, 0, 3, mesh8)
        manager = lmc.checkpoint_manager(tmp_path / "ck", enable_async=False)
        assert lmc.save_nnx(manager, 3, model, optimizer)
        saved = _flat(
            {
                "model": nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)),
                "opt": nnx.to_pure_dict(nnx.state(optimizer, nnx.optimizer.OptState)),
            }
        )
        saved = [(k, np.asarray(x)) for k, x in saved]
        reference = _steps(model, optimizer, 3, STEPS, mesh8)

        # Same mesh, fresh objects (factors re-initialised with another seed): bit-identical.
        model2, optimizer2 = _build(base, mesh8)
        assert lmc.restore_nnx(manager, model2, optimizer2) == 3
        assert _steps(model2, optimizer2, 3, STEPS, mesh8) == reference

    # 4 devices, another mesh shape: the arrays come back bitwise, laid out on the new mesh.
    mesh4 = jax.make_mesh(
        (1, 4, 1),
        ("data", "fsdp", "tp"),
        devices=jax.devices()[:4],
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
    )
    with jax.set_mesh(mesh4):
        model4, optimizer4 = _build(base, mesh4)
        assert lmc.restore_nnx(manager, model4, optimizer4) == 3
        restored = _flat(
            {
                "model": nnx.to_pure_dict(nnx.state(model4, nnx.LoRAParam)),
                "opt": nnx.to_pure_dict(nnx.state(optimizer4, nnx.optimizer.OptState)),
            }
        )
        assert [k for k, _ in restored] == [k for k, _ in saved]
        for (key, x), (_, y) in zip(restored, saved, strict=True):
            np.testing.assert_array_equal(np.asarray(x), y, err_msg=key)
            assert x.sharding.mesh.devices.size == 4, key  # type: ignore[union-attr]
        assert int(optimizer4.step[...]) == 3
        continued = _steps(model4, optimizer4, 3, STEPS, mesh4)
    np.testing.assert_allclose(continued, reference, rtol=1e-5)


def test_adapters_plus_base_and_mismatches(base: pathlib.Path, tmp_path: pathlib.Path) -> None:
    mesh = make_mesh((1, 8, 1))
    with jax.set_mesh(mesh):
        model, optimizer = _build(base, mesh)
        _steps(model, optimizer, 0, 1, mesh)
        manager = lmc.checkpoint_manager(tmp_path / "all", enable_async=False)
        lmc.save_nnx(manager, 1, model, optimizer, include_base=True)
        params = [
            (k, np.asarray(x)) for k, x in _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        ]

        other = fx.make_checkpoint(tmp_path / "other_base", "llama", seed=7)
        model2, optimizer2 = _build(other, mesh)
        assert lmc.restore_nnx(manager, model2, optimizer2, include_base=True) == 1
        back = _flat(nnx.to_pure_dict(nnx.state(model2, nnx.Param)))
        assert len(back) == len(params) and len(params) > 28  # base + 28 factors
        for (key, x), (_, y) in zip(back, params, strict=True):
            np.testing.assert_array_equal(np.asarray(x), y, err_msg=key)

        empty = lmc.checkpoint_manager(tmp_path / "empty", enable_async=False)
        assert lmc.restore_nnx(empty, model2, optimizer2) is None

        model8, optimizer8 = _build(base, mesh, rank=8)  # another rank
        with pytest.raises(ValueError, match="does not fit"):
            lmc.restore_nnx(manager, model8, optimizer8, include_base=True)
        with pytest.raises(ValueError, match="include_base=False"):  # saved with the base
            lmc.restore_nnx(manager, model2, optimizer2)
