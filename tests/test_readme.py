"""The README's code blocks run, and do what the README says (so they cannot rot)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_optax_quickstart_trains() -> None:
    namespace: dict = {}
    exec(_python_blocks()[0], namespace)
    params, state, step = namespace["params"], namespace["state"], namespace["step"]
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (64, 512))
    y = x @ jax.random.normal(ky, (512, 512)) * 0.01
    losses = []
    for _ in range(30):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params))


def test_nnx_quickstart_trains_only_factors() -> None:
    from flax import nnx

    namespace: dict = {}
    exec(_python_blocks()[1], namespace)
    model, optimizer, train_step = (
        namespace["model"],
        namespace["optimizer"],
        namespace["train_step"],
    )
    kernel_before = jnp.array(model.up.kernel[...])
    x = jax.random.normal(jax.random.key(2), (32, 64))
    y = jnp.tanh(x[:, ::-1])
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    assert bool(jnp.all(model.up.kernel[...] == kernel_before))
    assert isinstance(model.up.lora.lora_a, nnx.LoRAParam)


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
