"""The README's code blocks run, and do what the README says (so they cannot rot)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import hf_fixtures as fx

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def _block(marker: str) -> str:
    """The one README python block that contains ``marker``."""
    found = [b for b in _python_blocks() if marker in b]
    assert len(found) == 1, (marker, len(found))
    return found[0]


OPTAX, NNX, SHARDING = '"norm_scale": jnp.ones(512)', "class Model(nnx.Module)", "init_sharded"
FINETUNE_NNX, FINETUNE_TUNIX = "train_step(model, optimizer, text.windows", "peft_trainer"


def _run_block(marker: str) -> tuple[dict, str]:
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(_block(marker), namespace)
    return namespace, out.getvalue()


def _printed_losses(text: str) -> tuple[float, float]:
    match = re.search(r"loss (\S+) -> (\S+)", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


def test_optax_quickstart_trains() -> None:
    namespace, printed = _run_block(OPTAX)
    first, last = _printed_losses(printed)
    assert last < 0.9 * first
    params = namespace["params"]
    assert float(namespace["losses"][-1]) == pytest.approx(last, rel=1e-4)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params))


def test_nnx_quickstart_trains_only_factors() -> None:
    from flax import nnx

    # The block builds, trains and prints; rebuild the model to check what moved.
    namespace, printed = _run_block(NNX)
    first, last = _printed_losses(printed)
    assert last < 0.9 * first
    model = namespace["Model"](nnx.Rngs(0))
    kernel_before = jnp.array(model.up.kernel[...])
    np.testing.assert_array_equal(np.asarray(namespace["model"].up.kernel[...]), kernel_before)
    assert isinstance(namespace["model"].up.lora.lora_a, nnx.LoRAParam)


def test_quickstart_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    muon = [float(v) for v in re.findall(r"\d\.\d+e[+-]\d+", lines["lora_muon"])]
    # loss at 0/50/300, then the same with rescaled factors: the curve is unchanged at step 50
    assert muon[2] < 1e-4 * muon[0]
    assert abs(muon[4] - muon[1]) <= 1e-3 * muon[1]


def test_sharding_block_shards_and_matches_one_device() -> None:
    import optax

    from lora_muon_jax import lora_muon
    from lora_muon_jax.testing import hlo_collectives

    if jax.device_count() < 2:
        pytest.skip("needs several devices (tests/conftest.py asks for 8 CPU devices)")
    namespace: dict = {}
    exec(_block(SHARDING), namespace)
    params, state, step, grads = (namespace[k] for k in ("params", "state", "step", "grads"))
    for leaf in jax.tree.leaves(params):
        assert "fsdp" in tuple(leaf.sharding.spec)
    # Oracle: the same step on one device, no shardings (the block up to the sharding).
    fresh: dict = {}
    exec(_block(SHARDING).split("specs =")[0], fresh)
    tx = lora_muon(learning_rate=0.1)
    plain = fresh["params"]
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, plain), tx.init(plain), plain)
    expected = optax.apply_updates(fresh["params"], updates)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert jnp.allclose(jax.device_get(got), want, atol=2e-6)
    with jax.set_mesh(namespace["mesh"]):
        text = step.lower(params, state, grads).compile().as_text()
    kinds = {c.kind for c in hlo_collectives(text)}
    assert kinds == {"all-reduce"}, kinds


# ----------------------------------------------------------------- finetuning a checkpoint


def run_in(work: pathlib.Path, args: list[str]) -> str:
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=work,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("marker", [FINETUNE_NNX, FINETUNE_TUNIX], ids=["nnx", "tunix"])
def test_finetune_quickstarts_train_a_checkpoint(tmp_path: pathlib.Path, marker: str) -> None:
    work = fx.clone_after_main_job(tmp_path)
    block = _block(marker)
    assert len(block.strip().splitlines()) <= 26, "the quickstart should stay short"
    first, last = _printed_losses(run_in(work, [sys.executable, "-c", block]))
    assert last < first - 0.3, (first, last)  # bytes of Shakespeare: learnt quickly


def test_finetune_cli_block_writes_what_peft_loads(tmp_path: pathlib.Path) -> None:
    work = fx.clone_after_main_job(tmp_path)
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    (cli,) = [b for b in blocks if "lora_muon_jax.finetune" in b]
    args = cli.replace("\\\n", " ").split()
    assert args[0] == ".venv/bin/python"
    out_dir = pathlib.Path(args[args.index("--out") + 1])
    run_in(work, [sys.executable, *args[1:]])
    tokens = fx.tokens()
    with_adapter = fx.torch_logits(work / fx.QUICK_BASE, tokens, adapter=out_dir / "adapter")
    merged = fx.torch_logits(out_dir / "merged", tokens)
    np.testing.assert_allclose(with_adapter, merged, rtol=0, atol=2e-5)
