"""HF checkpoints in, LoRA on them, PEFT adapters and merged checkpoints out — against the real
``transformers`` and ``peft`` (torch CPU), on tiny random 2-layer checkpoints built offline.

Logit tolerance: both sides compute in float32 from the same weights; they differ only in
the order of float32 operations. Measured max |Δlogit| 2e-7 … 7e-7 on logits of size ~1;
the tests allow 2e-5 (30× that, still 1e-5 of the logits' scale, far below any real
mismatch: a wrong RoPE, norm or head order moves logits by 1e-2 … 1).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from lora_muon_jax import LoRADimensionNumbers, lora_muon
from lora_muon_jax.finetune import adapt, loss_fn, make_mesh, make_optimizer
from lora_muon_jax.flax.nnx import lora_dimension_numbers_fn, lora_scale_fn
from lora_muon_jax.flax.surgery import lorafy
from lora_muon_jax.hf import load_pretrained
from lora_muon_jax.hf.peft import load_peft_adapter, save_merged, save_peft_adapter
from lora_muon_jax.hf.safetensors_io import SafetensorsIndex, write_safetensors
from lora_muon_jax.testing import hlo_collectives
from tests import hf_fixtures as fx

TOL = 2e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    base = tmp_path_factory.mktemp("hf")
    return {
        "llama": fx.make_checkpoint(base / "llama", "llama"),
        "llama3_rope": fx.make_checkpoint(base / "llama3_rope", "llama3_rope", seed=1),
        "qwen2": fx.make_checkpoint(base / "qwen2", "qwen2", seed=2),
        "qwen3_tied": fx.make_checkpoint(base / "qwen3", "qwen3", seed=3, tie=True),
        "llama_sharded": fx.make_checkpoint(base / "sharded", "llama", seed=4, shard=True),
    }


def _ours(model, tokens: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(model(jnp.asarray(tokens))[0], np.float64)


def _perturb_factors(model, seed: int = 3) -> None:  # type: ignore[no-untyped-def]
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


# ----------------------------------------------------------------- checkpoints in


@pytest.mark.parametrize("scan", [False, True], ids=["list", "scanned"])
@pytest.mark.parametrize("kind", ["llama", "llama3_rope", "qwen2", "qwen3_tied", "llama_sharded"])
def test_logits_match_transformers(ckpts: dict[str, pathlib.Path], kind: str, scan: bool) -> None:
    if kind == "llama_sharded":
        assert (ckpts[kind] / "model.safetensors.index.json").is_file()
    tokens = fx.tokens(length=96 if kind == "llama3_rope" else 12)  # past the original context
    model = load_pretrained(ckpts[kind], scan_layers=scan)
    want = fx.torch_logits(ckpts[kind], tokens)
    np.testing.assert_allclose(_ours(model, tokens), want, rtol=0, atol=TOL)


def test_loads_straight_onto_a_mesh(ckpts: dict[str, pathlib.Path]) -> None:
    mesh = make_mesh((2, 2, 2))
    with jax.set_mesh(mesh):
        model = load_pretrained(ckpts["llama"], mesh=mesh)
        q = model.model.layers[0].self_attn.q_proj.kernel
        assert isinstance(q[...].sharding, NamedSharding)
        assert tuple(q[...].sharding.spec) == ("fsdp", "tp")
        assert q.get_metadata()["out_sharding"] == ("fsdp", "tp")
        o = model.model.layers[1].self_attn.o_proj.kernel[...]
        assert tuple(o.sharding.spec) == ("tp", "fsdp")
        # Each device holds only its quarter of the kernel.
        assert {s.data.shape for s in q[...].addressable_shards} == {(32, 32)}
        got = _ours(model, fx.tokens())
    np.testing.assert_allclose(got, fx.torch_logits(ckpts["llama"], fx.tokens()), rtol=0, atol=TOL)


def test_slice_reads_only_touch_the_slice(tmp_path: pathlib.Path) -> None:
    import ml_dtypes

    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    b = (np.arange(12, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16).reshape(3, 4)
    write_safetensors(tmp_path / "model.safetensors", {"a": a, "b": b})
    index = SafetensorsIndex(tmp_path)
    np.testing.assert_array_equal(index.read("a", (slice(1, 3), slice(2, 4))), a[1:3, 2:4])
    np.testing.assert_array_equal(index.read("b"), b)
    import safetensors.numpy

    assert np.array_equal(safetensors.numpy.load_file(tmp_path / "model.safetensors")["a"], a)


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_mistakes_name_the_tensor(
    ckpts: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    # config.json and the tensors disagree.
    bad = _copy(ckpts["llama"], tmp_path / "bad_config")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape .*128.*implies",
    ):
        load_pretrained(bad)
    # A tensor missing, and one config.json has no place for.
    index = SafetensorsIndex(ckpts["llama"])
    tensors = {k: index.read(k) for k in index.tensors}
    for name, edit in (("missing", "drop"), ("extra", "add")):
        d = _copy(ckpts["llama"], tmp_path / name)
        t = dict(tensors)
        if edit == "drop":
            del t["model.layers.1.self_attn.k_proj.weight"]
        else:
            t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"]
        write_safetensors(d / "model.safetensors", t)
        pattern = (
            r"k_proj\.weight.*no safetensors file" if edit == "drop" else r"no place for.*layers\.2"
        )
        with pytest.raises(ValueError, match=pattern):
            load_pretrained(d)
    # An architecture this package does not implement is refused, not approximated.
    other = _copy(ckpts["llama"], tmp_path / "gpt2")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_pretrained(other)


def test_byte_text_needs_256_tokens() -> None:
    from lora_muon_jax.hf.text import ByteTokenizer, load_tokenizer

    assert isinstance(load_tokenizer("/nonexistent", 300), ByteTokenizer)
    with pytest.raises(ValueError, match="at least 256 entries; this model has vocab_size=100"):
        load_tokenizer("/nonexistent", 100)
    np.testing.assert_array_equal(ByteTokenizer().encode("hé"), [104, 195, 169])


# ----------------------------------------------------------------- adapters out and in


@pytest.mark.parametrize("scan", [False, True], ids=["list", "scanned"])
def test_peft_adapter_and_merged_checkpoint_match_the_real_libraries(
    ckpts: dict[str, pathlib.Path], tmp_path: pathlib.Path, scan: bool
) -> None:
    model = load_pretrained(ckpts["llama"], scan_layers=scan)
    lorafy(model, r".*(q|k|v|o|gate|up|down)_proj", rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    _perturb_factors(model)
    tokens = fx.tokens()
    ours = _ours(model, tokens)
    base = fx.torch_logits(ckpts["llama"], tokens)
    assert np.abs(ours - base).max() > 0.1  # the adapter does change the model
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(ckpts["llama"]))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    keys = SafetensorsIndex(tmp_path / "adapter", "adapter_model.safetensors").tensors
    a_key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert keys[a_key].shape == (4, 64) and keys[a_key.replace("lora_A", "lora_B")].shape == (64, 4)
    np.testing.assert_allclose(
        fx.torch_logits(ckpts["llama"], tokens, adapter=tmp_path / "adapter"),
        ours,
        rtol=0,
        atol=TOL,
    )
    save_merged(model, tmp_path / "merged", base_dir=ckpts["llama"])
    np.testing.assert_allclose(fx.torch_logits(tmp_path / "merged", tokens), ours, rtol=0, atol=TOL)
    # ... and back: a fresh model with the adapter loaded is the same model.
    again = load_pretrained(ckpts["llama"], scan_layers=not scan)
    load_peft_adapter(again, tmp_path / "adapter")
    np.testing.assert_allclose(_ours(again, tokens), ours, rtol=0, atol=TOL)


def test_continue_training_from_a_peft_adapter(
    ckpts: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(ckpts["qwen2"], dtype=torch.float32)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "theirs")
    model = load_pretrained(ckpts["qwen2"])
    load_peft_adapter(model, tmp_path / "theirs")
    tokens = fx.tokens()
    np.testing.assert_allclose(
        _ours(model, tokens), fx.torch_logits(ckpts["qwen2"], tokens, tmp_path / "theirs"), atol=TOL
    )
    optimizer = nnx.Optimizer(model, lora_muon(0.02, lora_scale=3.0), wrt=nnx.LoRAParam)
    batch = jnp.asarray(fx.tokens(4, 17, seed=5))

    def loss(m):  # type: ignore[no-untyped-def]
        logits, _ = m(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    losses = []
    for _ in range(5):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    save_peft_adapter(model, tmp_path / "ours", base_model_name_or_path=str(ckpts["qwen2"]))
    np.testing.assert_allclose(
        _ours(model, tokens), fx.torch_logits(ckpts["qwen2"], tokens, tmp_path / "ours"), atol=TOL
    )


def test_adapter_mistakes_name_the_module(
    ckpts: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    model = load_pretrained(ckpts["llama"])
    lorafy(model, r".*(q|v)_proj", rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="x")
    # Made for another base: a base without those modules, or of another width.
    other = load_pretrained(ckpts["llama"])
    lorafy(other, r".*k_proj", rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"q_proj' does not exist in this model.*another base"):
        load_peft_adapter(other, tmp_path / "adapter")
    wide = fx.make_checkpoint(tmp_path / "wide", "llama", hidden=96)
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \(4, 64\).*needs \(4, 96\)"):
        load_peft_adapter(load_pretrained(wide), tmp_path / "adapter")
    # An adapter of another rank than the model's adapters.
    ranked = load_pretrained(ckpts["llama"])
    lorafy(ranked, r".*(q|v)_proj", rank=2, alpha=8.0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"different rank: adapter r=4, model rank 2"):
        load_peft_adapter(ranked, tmp_path / "adapter")
    # A target pattern that matches nothing.
    with pytest.raises(ValueError, match=r"matches no nnx\.Linear"):
        adapt(load_pretrained(ckpts["llama"]), rank=2, alpha=4.0, targets=["qproj"])


@pytest.mark.filterwarnings(
    r"ignore:The 'm\.iter_modules\(\)' method is deprecated:DeprecationWarning"
)
@pytest.mark.filterwarnings(r"ignore:'\.value' access is now deprecated:DeprecationWarning")
@pytest.mark.filterwarnings(r"ignore:'VariableState' was removed:DeprecationWarning")
def test_qwix_route_trains_and_exports(
    ckpts: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    import qwix

    model = load_pretrained(ckpts["llama"])
    provider = qwix.LoraProvider(module_path=r".*(q_proj|v_proj|up_proj)", rank=4, alpha=8.0)
    tokens = jnp.asarray(fx.tokens())
    model = qwix.apply_lora_to_model(model, provider, tokens, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, lora_muon(0.05, lora_scale=8.0 / 4), wrt=nnx.LoRAParam)
    batch = jnp.asarray(fx.tokens(4, 17, seed=6))

    def loss(m):  # type: ignore[no-untyped-def]
        logits, _ = m(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    for _ in range(3):
        _, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
    ours = _ours(model, np.asarray(tokens))
    assert np.abs(ours - fx.torch_logits(ckpts["llama"], np.asarray(tokens))).max() > 1e-4
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="x", lora_scale=2.0)
    np.testing.assert_allclose(
        fx.torch_logits(ckpts["llama"], np.asarray(tokens), tmp_path / "adapter"), ours, atol=TOL
    )
    save_merged(model, tmp_path / "merged", base_dir=ckpts["llama"], lora_scale=2.0)
    np.testing.assert_allclose(
        fx.torch_logits(tmp_path / "merged", np.asarray(tokens)), ours, atol=TOL
    )


# ----------------------------------------------------------------- sharded training


def test_one_rxr_all_reduce_per_optimizer_step_on_a_3d_mesh(ckpts: dict[str, pathlib.Path]) -> None:
    mesh = make_mesh((2, 2, 2))
    with jax.set_mesh(mesh):
        model = load_pretrained(ckpts["llama"], mesh=mesh)
        adapt(model, rank=4, alpha=8.0, mesh=mesh)
        optimizer = nnx.Optimizer(model, lora_muon(0.05, lora_scale=2.0), wrt=nnx.LoRAParam)
        for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            assert set(v[...].sharding.spec) & {("fsdp", "tp")}, v[
                ...
            ].sharding  # long axis split 4x
        for _, v in nnx.to_flat_state(nnx.state(optimizer, nnx.optimizer.OptState)):
            if getattr(v, "ndim", 0) >= 2:  # momenta follow their factors
                assert ("fsdp", "tp") in tuple(v[...].sharding.spec)
        grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.LoRAParam))

        @nnx.jit
        def update(model, optimizer, grads):  # type: ignore[no-untyped-def]
            optimizer.update(model, grads)

        text = update.lower(model, optimizer, grads).compile().as_text()
    every_step = [c for c in hlo_collectives(text) if not c.conditional]
    assert [c.kind for c in every_step] == ["all-reduce"], every_step
    for _, dims in every_step[0].shapes:
        assert (len(dims) >= 2 and dims[-2:] == (4, 4)) or len(dims) == 1, dims


# ----------------------------------------------------------------- scanned layers == rank


def _per_layer(flat: dict) -> dict:
    """A scanned model's flat state ``{(model, layers, *rest): (L, ...)}`` as the list model's."""
    out = {}
    for path, x in flat.items():
        assert path[:2] == ("model", "layers"), path
        for i in range(x.shape[0]):
            out[(*path[:2], i, *path[2:])] = x[i]
    return out


def _flat_factors(tree: nnx.State) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(tree)}


def test_scanned_layers_as_many_as_the_rank_step_like_the_list_model(
    ckpts: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    # The fixture has 2 layers; at r = 2 a scanned q_proj pair is lora_a (2, 64, 2),
    # lora_b (2, 2, 64): 2 pairs of 64×2 factors, or one of 128×2 — ambiguous by shape.
    scanned = load_pretrained(ckpts["llama"], scan_layers=True)
    adapt(scanned, rank=2, alpha=4.0)
    _perturb_factors(scanned)
    q = scanned.model.layers.self_attn.q_proj
    assert (q.lora_a.shape, q.lora_b.shape) == ((2, 64, 2), (2, 2, 64))
    with pytest.raises(ValueError, match=r"(?s)more than one reading.*lora_dimension_numbers_fn"):
        nnx.Optimizer(scanned, lora_muon(0.05, lora_scale=2.0), wrt=nnx.LoRAParam)
    # The oracle: the same checkpoint unscanned, the same adapters (through PEFT: also
    # checks the export of such a scanned model), stepped pair by pair.
    save_peft_adapter(scanned, tmp_path / "adapter", base_model_name_or_path="x")
    listed = load_pretrained(ckpts["llama"])
    load_peft_adapter(listed, tmp_path / "adapter")
    scanned_factors = _per_layer(_flat_factors(nnx.state(scanned, nnx.LoRAParam)))
    for path, x in _flat_factors(nnx.state(listed, nnx.LoRAParam)).items():
        np.testing.assert_array_equal(x, scanned_factors[path])
    batch = jnp.asarray(fx.tokens(4, 17, seed=7))
    grad_fn = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
    grads = grad_fn(scanned, batch)
    layer_grads = _per_layer(_flat_factors(grads))
    # The list model's gradients differ only by float32 reordering (measured ≤ 7e-7 of their
    # scale, as the logits); the steps below are compared on the same gradients.
    list_grads = grad_fn(listed, batch)
    for path, v in nnx.to_flat_state(list_grads):
        scale = np.abs(layer_grads[path]).max()
        np.testing.assert_allclose(v[...], layer_grads[path], rtol=0, atol=1e-5 * scale)
        v.set_value(jnp.asarray(layer_grads[path]))

    def stepped(model, dims, grads):  # type: ignore[no-untyped-def]
        tx = lora_muon(
            0.05, weight_decay=0.1, lora_scale=lora_scale_fn(model), dimension_numbers=dims
        )
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
        start = _flat_factors(nnx.state(model, nnx.LoRAParam))
        optimizer.update(model, grads)
        after = _flat_factors(nnx.state(model, nnx.LoRAParam))
        return {k: after[k] - start[k] for k in after}

    want = stepped(listed, None, list_grads)
    # The other reading (one pair coupling both layers) steps differently: the oracle can tell.
    wrong = _per_layer(stepped(nnx.clone(scanned), LoRADimensionNumbers(num_batch_axes=0), grads))
    assert max(np.abs(wrong[k] - want[k]).max() / np.abs(want[k]).max() for k in want) > 0.1
    # finetune.make_optimizer declares the layout itself.
    nnx.Optimizer(
        nnx.clone(scanned), make_optimizer("lora_muon", 0.05, 10, scanned), wrt=nnx.LoRAParam
    )
    got = _per_layer(stepped(scanned, lora_dimension_numbers_fn(scanned), grads))
    assert sorted(got) == sorted(want) and len(want) == 2 * 7 * 2
    for path, step in want.items():
        # The same float32 operations per layer, batched or not: bit-equal on CPU (measured);
        # 1e-6 of the step leaves room for another backend's reassociation.
        np.testing.assert_allclose(got[path], step, rtol=0, atol=1e-6 * np.abs(step).max())


# ----------------------------------------------------------------- the fixed entry point


def test_finetune_cli_writes_adapter_merged_and_metrics(
    ckpts: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_muon_jax.finetune", "--model", str(ckpts["qwen3_tied"]),
           "--data", str(tmp_path / "text.txt"), "--out", str(out), "--steps", "40", "--rank", "4",
           "--alpha", "8", "--optimizer", "lora_muon", "--lr", "0.05", "--seed", "1",
           "--seq-len", "32", "--eval-every", "20", "--log-every", "10"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[-1]["loss"] < records[0]["loss"] and "eval_loss" in records[-1]
    assert "compilation" in done.stderr
    tokens = fx.tokens()
    merged = fx.torch_logits(out / "merged", tokens)
    np.testing.assert_allclose(
        fx.torch_logits(ckpts["qwen3_tied"], tokens, out / "adapter"), merged, atol=TOL
    )
    assert np.abs(merged - fx.torch_logits(ckpts["qwen3_tied"], tokens)).max() > 1e-3


def test_finetune_cli_scan_layers_with_rank_equal_to_layers(
    ckpts: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    # 2 scanned layers at --rank 2: the layout the model declares, not one the shapes guess.
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(100))
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_muon_jax.finetune", "--model", str(ckpts["llama"]),
           "--data", str(tmp_path / "text.txt"), "--out", str(out), "--steps", "4", "--rank", "2",
           "--alpha", "4", "--optimizer", "lora_muon", "--lr", "0.05", "--scan-layers",
           "--batch", "2", "--seq-len", "16", "--eval-every", "4", "--log-every", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and np.isfinite(records[-1]["loss"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2
    tokens = fx.tokens()
    merged = fx.torch_logits(out / "merged", tokens)
    np.testing.assert_allclose(
        fx.torch_logits(ckpts["llama"], tokens, out / "adapter"), merged, atol=TOL
    )
    assert np.abs(merged - fx.torch_logits(ckpts["llama"], tokens)).max() > 1e-4
