"""LoRA-finetune an HF checkpoint (Llama / Qwen family) on a text file, write PEFT + merged.

Run (CPU, or whatever devices JAX sees, sharded over all of them; no network)::

    python -m lora_muon_jax.finetune --model HF_DIR --data TEXT_FILE --out OUT_DIR \\
        --steps 200 --rank 8 --alpha 16 --optimizer lora_muon --lr 0.02 [--seed 0]

adapts q/k/v/o/gate/up/down with ``lorafy`` (rank r, scale α/r), trains only the
factors with ``lora_muon`` (η a spectral radius on each adapted W), AdamW or
LoRA+ (AdamW with a 16× larger learning rate on B), and writes:

* ``OUT_DIR/adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors``
  (``peft.PeftModel.from_pretrained(base, OUT_DIR/adapter)`` loads it);
* ``OUT_DIR/merged/``: the merged HF checkpoint (``transformers`` loads it);
* ``OUT_DIR/metrics.jsonl``: one JSON object per logged step (``step``, ``loss``,
  ``lr``, ``seconds``; ``eval_loss`` every ``--eval-every`` steps).

Text is encoded with the checkpoint's ``tokenizer.json``, or as UTF-8 bytes when
it has none (vocabulary ≥ 256). The last ``--held-out`` fraction of the text is
the evaluation split. Every step below is a public function, so the same run
can be scripted from Python (see docs/finetune.md).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lora_muon_jax import lora_muon
from lora_muon_jax.flax.nnx import lora_dimension_numbers_fn, lora_scale_fn
from lora_muon_jax.flax.surgery import lorafy
from lora_muon_jax.hf import text as text_lib
from lora_muon_jax.hf.checkpoint import load_pretrained
from lora_muon_jax.hf.model import CausalLM
from lora_muon_jax.hf.peft import save_merged, save_peft_adapter
from lora_muon_jax.sharding import long_axis_partition_specs

OptimizerName = Literal["lora_muon", "adamw", "loraplus"]
OPTIMIZERS: dict[str, str] = {
    "lora_muon": "LoRA-Muon on the factors (η: spectral-norm radius of each half on W)",
    "adamw": "AdamW on the factors (the usual LoRA recipe)",
    "loraplus": "LoRA+: AdamW with the learning rate of B multiplied by --loraplus-ratio",
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_mesh(shape: Sequence[int] | None = None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tp)`` mesh; default every device on ``fsdp``."""
    n = jax.device_count()
    shape = tuple(shape) if shape is not None else (1, n, 1)
    if len(shape) != 3 or int(np.prod(shape)) != n:
        raise ValueError(f"mesh shape {shape} must be (data, fsdp, tp) with product {n} devices")
    return jax.make_mesh(
        shape, ("data", "fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )


def adapt(
    model: CausalLM,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = TARGETS,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
) -> CausalLM:
    """``lorafy`` the ``targets`` projections in place; on a mesh, shard every factor's long axis.

    The factors' long axes go over every mesh axis at once (``fsdp`` × ``tp``), the
    rank axis whole: the optimizer step then needs one r×r all-reduce (all Grams
    fused), whatever the base weights' tensor-parallel layout.
    """
    pattern = r".*(" + "|".join(targets) + r")"
    lorafy(model, pattern, rank=rank, alpha=alpha, rngs=nnx.Rngs(seed))
    if mesh is not None:
        state = nnx.state(model, nnx.LoRAParam)
        axes: list[str] = [a for a in ("fsdp", "tp") if mesh.shape[a] > 1] or ["fsdp"]
        size = int(np.prod([mesh.shape[a] for a in axes]))
        specs = long_axis_partition_specs(
            state,
            tuple(axes) if len(axes) > 1 else axes[0],
            size,
            dimension_numbers=lora_dimension_numbers_fn(model),
        )
        placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)
        nnx.update(model, placed)
        for (_, var), (_, spec) in zip(
            nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)),
            nnx.to_flat_state(specs),
            strict=True,
        ):
            var.set_metadata(out_sharding=tuple(spec) + (None,) * (var.ndim - len(spec)))
    return model


def learning_rate_schedule(peak: float, steps: int, warmup: float = 0.05) -> optax.Schedule:
    """Linear warmup over ``warmup`` of the steps, then cosine decay to 10 % of ``peak``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(1, int(warmup * steps)), max(steps, 2), end_value=0.1 * peak
    )


def make_optimizer(
    name: OptimizerName,
    learning_rate: float,
    steps: int,
    model: CausalLM,
    *,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    loraplus_ratio: float = 16.0,
) -> optax.GradientTransformation:
    """The factors' optimizer: linear warmup, then cosine decay to 10 % of ``learning_rate``.

    ``lora_muon`` gets the adapted ``model``'s scales (``lora_scale_fn``) and
    stacked axes (``lora_dimension_numbers_fn``: scanned layers whose count
    equals the rank are ambiguous by shape), so call it after ``adapt``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning rate must be > 0, got {learning_rate}")

    def schedule(peak: float) -> optax.Schedule:
        return learning_rate_schedule(peak, steps, warmup)

    if name == "lora_muon":
        return lora_muon(
            schedule(learning_rate),
            weight_decay=weight_decay,
            lora_scale=lora_scale_fn(model),
            dimension_numbers=lora_dimension_numbers_fn(model),
        )
    if name == "adamw":
        return optax.adamw(schedule(learning_rate), weight_decay=weight_decay)

    return loraplus(schedule(learning_rate), ratio=loraplus_ratio, weight_decay=weight_decay)


def loraplus(
    learning_rate: float | optax.Schedule, *, ratio: float = 16.0, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al., 2024): AdamW on every factor, B's learning rate × ``ratio``.

    B is each pair's ``lora_b`` (the factor next to the output, zero at init). Works
    on plain trees and on ``nnx.Optimizer``'s Variable trees (a whole Variable gets
    one label, so ``optax.partition`` masks Variables, not their values).
    """

    def labels(params: Any) -> Any:
        def label(path: tuple[Any, ...], _: Any) -> str:
            names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            names = [n for n in names if n != "value"]
            return "b" if names and names[-1].endswith("lora_b") else "a"

        return jax.tree_util.tree_map_with_path(
            label, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )

    def scaled(step: Any) -> Any:
        return ratio * (learning_rate(step) if callable(learning_rate) else learning_rate)

    return optax.partition(
        {
            "a": optax.adamw(learning_rate, weight_decay=weight_decay),
            "b": optax.adamw(
                scaled if callable(learning_rate) else ratio * learning_rate,
                weight_decay=weight_decay,
            ),
        },
        labels,
    )


def loss_fn(model: CausalLM, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of ``batch (B, L + 1)``."""
    logits, _ = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch[:, 1:]
    ).mean()


@nnx.jit
def train_step(model: CausalLM, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
    """One step on the LoRA factors (``nnx.LoRAParam``); returns the loss before it."""
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model: CausalLM, batch: jax.Array) -> jax.Array:
    return loss_fn(model, batch)


def run(
    model: CausalLM,
    optimizer: nnx.Optimizer,
    train_ids: np.ndarray,
    eval_ids: np.ndarray | None,
    *,
    steps: int,
    batch: int,
    seq_len: int,
    seed: int,
    mesh: jax.sharding.Mesh | None = None,
    eval_every: int = 50,
    log_every: int = 10,
    lr_schedule: optax.Schedule | None = None,
    log: Callable[[dict[str, Any]], None] = lambda record: None,
) -> list[dict[str, Any]]:
    """The training loop: random windows of ``train_ids``, held-out loss on fixed windows."""
    rng = np.random.default_rng(seed)
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    fixed = None if eval_ids is None else text_lib.eval_windows(eval_ids, seq_len, 4 * batch)

    def put(x: np.ndarray) -> jax.Array:
        return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)

    records = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = put(text_lib.windows(train_ids, batch, seq_len, rng))
        loss = train_step(model, optimizer, x)
        if step == 1:
            jax.block_until_ready(loss)
            first = time.perf_counter() - t0
            print(
                f"step 1 took {first:.1f} s (compilation: later steps reuse it; see "
                "docs/finetune.md for the persistent compilation cache)",
                file=sys.stderr,
            )
            t0 = time.perf_counter()
        if step % log_every == 0 or step == steps or (fixed is not None and step % eval_every == 0):
            record: dict[str, Any] = {"step": step, "loss": float(loss)}
            record["seconds_per_step"] = (time.perf_counter() - t0) / max(1, step - 1)
            if lr_schedule is not None:
                record["lr"] = float(np.asarray(lr_schedule(step - 1)))
            if fixed is not None and (step % eval_every == 0 or step == steps):
                record["eval_loss"] = float(
                    np.mean([float(eval_loss(model, put(w))) for w in np.array_split(fixed, 4)])
                )
            records.append(record)
            log(record)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_muon_jax.finetune", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--data", required=True, help="a UTF-8 text file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="lora_muon")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated modules")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--loraplus-ratio", type=float, default=16.0)
    parser.add_argument("--held-out", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--mesh", default=None, help="data,fsdp,tp sizes (default 1,N,1)")
    parser.add_argument("--scan-layers", action="store_true")
    args = parser.parse_args(argv)

    mesh = make_mesh([int(v) for v in args.mesh.split(",")] if args.mesh else None)
    with jax.set_mesh(mesh):
        model = load_pretrained(args.model, mesh=mesh, scan_layers=args.scan_layers)
        tokenizer = text_lib.load_tokenizer(args.model, model.config.vocab_size)
        ids = tokenizer.encode(pathlib.Path(args.data).read_text(encoding="utf-8"))
        train_ids, eval_ids = text_lib.split_ids(ids, args.held_out)
        adapt(
            model,
            rank=args.rank,
            alpha=args.alpha,
            targets=[t for t in args.targets.split(",") if t],
            mesh=mesh,
            seed=args.seed,
        )
        tx = make_optimizer(
            args.optimizer,
            args.lr,
            args.steps,
            model,
            weight_decay=args.weight_decay,
            loraplus_ratio=args.loraplus_ratio,
        )
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        metrics = (out / "metrics.jsonl").open("w")
        config = {k: v for k, v in vars(args).items()}
        config.update(
            tokenizer=tokenizer.name, devices=jax.device_count(), train_tokens=len(train_ids)
        )
        print(json.dumps({"config": config}), file=sys.stderr)

        def log(record: dict[str, Any]) -> None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            shown = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            )
            print(shown, file=sys.stderr)

        run(
            model,
            optimizer,
            train_ids,
            eval_ids,
            steps=args.steps,
            batch=args.batch,
            seq_len=args.seq_len,
            seed=args.seed,
            mesh=mesh,
            eval_every=args.eval_every,
            log_every=args.log_every,
            lr_schedule=learning_rate_schedule(args.lr, args.steps),
            log=log,
        )
        metrics.close()
        save_peft_adapter(
            model, out / "adapter", base_model_name_or_path=str(pathlib.Path(args.model).resolve())
        )
        save_merged(model, out / "merged", base_dir=args.model)
    print(f"wrote {out / 'adapter'}, {out / 'merged'}, {out / 'metrics.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
