"""Step time, compile time and state size of lora_muon vs optax baselines, side by side.

Run:      python benchmarks/step_time.py            (full: ~8 min on a 2-core CPU)
          python benchmarks/step_time.py --quick    (smoke: ~1 min)
          python benchmarks/step_time.py --device gpu --scale 1 [--dtype bfloat16]
                                                    (GPU: Llama-7B widths)
Hardware: measured on a 2-core x86-64 VM (CPU backend, float32); runs unchanged on GPU/TPU.
Expected: tables of per-call and training-loop step times with ratios to optax.adamw next
          to their targets (24 pairs of 1024x16; the Llama-2-7B-shaped 224-adapter set),
          compile seconds vs number of adapters (8...512) with the ratio to AdamW's, and the
          whole finetune training step (forward, backward, update) lora_muon vs adamw.

Every number is a median over repeated calls of one jitted `update + apply_updates`,
measured in the same process, interleaved across optimizers (rounds) to share noise, in
two modes that bracket what users see:

* "call": one synchronous call at a time, fresh output buffers (no donation): the
  latency of a single step, allocation included;
* "loop": a training loop — parameters and state donated (`donate_argnums`) and fed
  back, `repeats` steps dispatched before one `block_until_ready`, time per step; every
  round starts again from the same initial parameters and state.

AdamW is memory-bound and gains most from donation (in-place update), so the ratios
against it are larger in "loop" mode; report both.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_muon_jax
from lora_muon_jax import lora_muon

Tree = Any


def adapters(
    shapes: list[tuple[str, int, int]], rank: int, seed: int = 0, dtype: Any = jnp.float32
) -> Tree:
    """A factor tree {name: {lora_a: (in, r), lora_b: (r, out)}} with random factors."""
    key = jax.random.key(seed)
    tree = {}
    for i, (name, d_in, d_out) in enumerate(shapes):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        tree[name] = {
            "lora_a": (jax.random.normal(ka, (d_in, rank)) / np.sqrt(d_in)).astype(dtype),
            "lora_b": (jax.random.normal(kb, (rank, d_out)) / np.sqrt(rank)).astype(dtype),
        }
    return tree


def llama_shapes(scale: int) -> list[tuple[str, int, int]]:
    """Llama-2-7B's 224 adapted matrices (32 layers x q,k,v,o,gate,up,down), widths / scale."""
    d, f = 4096 // scale, 11008 // scale
    out = []
    for layer in range(32):
        for proj, d_in, d_out in [
            ("q", d, d),
            ("k", d, d),
            ("v", d, d),
            ("o", d, d),
            ("gate", d, f),
            ("up", d, f),
            ("down", f, d),
        ]:
            out.append((f"layer{layer}_{proj}", d_in, d_out))
    return out


def step_and_inputs(
    opt: optax.GradientTransformation, params: Tree
) -> tuple[Callable[[Tree, Any, Tree], tuple[Tree, Any]], tuple[Tree, Any, Tree]]:
    """``update + apply_updates`` of ``opt`` and its inputs (params, state, grads = 0.1 params)."""

    def step(p: Tree, s: Any, g: Tree) -> tuple[Tree, Any]:
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    return step, (params, opt.init(params), jax.tree.map(lambda x: 0.1 * x, params))


class Measured:
    def __init__(self, name: str, opt: optax.GradientTransformation, params: Tree) -> None:
        self.name = name
        step, (params, state, grads) = step_and_inputs(opt, params)
        t0 = time.perf_counter()
        self.compiled = jax.jit(step).lower(params, state, grads).compile()
        self.compile_s = time.perf_counter() - t0
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per device
        self.bytes_accessed = float((cost or {}).get("bytes accessed", float("nan")))
        self.args = (params, state, grads)
        jax.block_until_ready(self.compiled(*self.args))
        # Loop mode (compiled on first use): its own copies, consumed at every step.
        self._donating_step = jax.jit(step, donate_argnums=(0, 1))
        jax.block_until_ready(self._donating_step(*self._fresh_carry(), grads))  # compile
        leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "nbytes")]
        self.state_bytes = sum(x.nbytes for x in leaves if x.size > 1)  # arrays, not counters
        self.times: list[float] = []
        self.loop_times: list[float] = []

    def run(self, repeats: int) -> None:
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(self.compiled(*self.args))
            self.times.append(time.perf_counter() - t0)
        # Every round restarts from the same parameters and state, so every round times
        # the same steps. Carried on, the fixed gradient (0.1 x the initial parameters)
        # at lr 0.1 drives lora_muon's factors to where its fast form's gate fails after
        # ~65 steps (measured), and the loop would time its robust form (step_breakdown's
        # row) for part of the rounds: a different program, not the same work.
        grads = self.args[2]
        p, s = jax.block_until_ready(self._fresh_carry())
        t0 = time.perf_counter()
        for _ in range(repeats):
            p, s = self._donating_step(p, s, grads)
        jax.block_until_ready((p, s))
        self.loop_times.append((time.perf_counter() - t0) / repeats)

    def _fresh_carry(self) -> tuple[Tree, Any]:
        """Copies of the initial (params, state): the donated loop consumes its inputs."""
        return jax.tree.map(lambda x: x.copy(), (self.args[0], self.args[1]))

    @property
    def ms(self) -> float:
        return float(np.median(self.times) * 1e3)

    @property
    def loop_ms(self) -> float:
        return float(np.median(self.loop_times) * 1e3)


def compare(
    title: str,
    makers: dict[str, Callable[[], Measured]],
    repeats: int,
    rounds: int,
    baseline: str,
    targets: dict[str, str] | None = None,
) -> dict[str, Measured]:
    """Interleaved rounds of every optimizer; one table row each, ratios to ``baseline``.

    ``targets`` (optimizer name -> text) fills the table's target column: the goal the
    loop-mode ratio is held to. "XLA bytes, all branches" is the compiled step's
    ``bytes accessed`` from XLA's cost model: an estimate, not a measurement, and it
    adds up both branches of every ``lax.cond`` (lora_muon's robust form, rarely
    taken, included), so it is an upper estimate of one step's memory traffic.
    """
    results = {name: make() for name, make in makers.items()}
    for _ in range(rounds):
        for m in results.values():
            m.run(repeats)
    base = results[baseline]
    print(f"\n### {title}\n")
    print(
        f"| optimizer | call (ms) | vs {baseline} | loop (ms) | vs {baseline} | target "
        "| compile (s) | XLA bytes, all branches (MB) | state (MB) | state vs base |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in results.values():
        ratio = m.state_bytes / base.state_bytes if base.state_bytes else float("nan")
        print(
            f"| {m.name} | {m.ms:.3f} | {m.ms / base.ms:.2f}x | {m.loop_ms:.3f} | "
            f"{m.loop_ms / base.loop_ms:.2f}x | {(targets or {}).get(m.name, '')} | "
            f"{m.compile_s:.1f} | {m.bytes_accessed / 1e6:.2f} | "
            f"{m.state_bytes / 1e6:.2f} | {ratio:.3f} |"
        )
    return results


def compile_seconds(opt: optax.GradientTransformation, params: Tree) -> float:
    """Trace, lower and compile one donated ``update + apply_updates`` step (seconds)."""
    step, inputs = step_and_inputs(opt, params)
    t0 = time.perf_counter()
    jax.jit(step, donate_argnums=(0, 1)).lower(*inputs).compile()
    return time.perf_counter() - t0


def compile_scaling(counts: tuple[int, ...], width: int, dtype: Any) -> None:
    """Compile seconds vs number of equal-shape adapters, lora_muon against optax.adamw.

    Every row uses a width never compiled before in the process (no cache hit).
    """
    print(f"\n### compile time vs number of adapters ({width}x16 pairs, fresh shapes per row)\n")
    print("| pairs | optax.adamw (s) | lora_muon gram (s) | ratio | target |")
    print("|---|---|---|---|---|")
    compile_seconds(lora_muon(0.1), adapters([("w", 40, 44)], 16, dtype=dtype))  # warm-up
    for i, n in enumerate(counts):
        w = width + 2 * i
        tree = adapters([(f"l{j}", w, w) for j in range(n)], 16, dtype=dtype)
        base = compile_seconds(optax.adamw(1e-3), tree)
        ours = compile_seconds(
            lora_muon(0.1), adapters([(f"l{j}", w + 1, w + 1) for j in range(n)], 16, dtype=dtype)
        )
        print(f"| {n} | {base:.2f} | {ours:.2f} | {ours / base:.2f}x | <= 2x |", flush=True)


def end_to_end(args: argparse.Namespace, dtype: Any) -> None:
    """The whole training step (forward, backward, update) of ``lora_muon_jax.finetune``.

    A Llama-architecture ``CausalLM`` with random weights (``--e2e-*`` sizes), adapted
    with ``finetune.adapt`` (q/k/v/o/gate/up/down, rank 16), stepped by
    ``finetune.train_step`` under ``nnx.Optimizer`` with ``finetune.make_optimizer``'s
    lora_muon and adamw, interleaved, on the same batches. Needs the ``hf`` extra (flax).
    """
    from flax import nnx

    from lora_muon_jax import finetune
    from lora_muon_jax.hf.config import DecoderConfig
    from lora_muon_jax.hf.model import CausalLM

    d, layers = args.e2e_hidden, args.e2e_layers
    config = DecoderConfig(
        model_type="llama",
        vocab_size=args.e2e_vocab,
        hidden_size=d,
        intermediate_size=int(d * 11008 / 4096) // 16 * 16,
        num_layers=layers,
        num_heads=d // 64,
        num_kv_heads=d // 64,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    batch, seq = args.e2e_batch, args.e2e_seq
    rng = np.random.default_rng(0)
    batches = [
        jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq + 1)), jnp.int32)
        for _ in range(4)
    ]
    steppers = {}
    for name in ("adamw", "lora_muon"):
        model = CausalLM(config, param_dtype=dtype, rngs=nnx.Rngs(0))
        finetune.adapt(model, rank=16, alpha=32.0)
        lr = 0.02 if name == "lora_muon" else 1e-3
        tx = finetune.make_optimizer(name, lr, 1000, model)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
        t0 = time.perf_counter()
        jax.block_until_ready(finetune.train_step(model, optimizer, batches[0]))
        steppers[name] = (model, optimizer, time.perf_counter() - t0, [])
    for round_ in range(args.e2e_rounds):
        order = list(steppers.values())
        for model, optimizer, _, times in order[:: -1 if round_ % 2 else 1]:  # alternate who leads
            t0 = time.perf_counter()
            for i in range(args.repeats):
                loss = finetune.train_step(model, optimizer, batches[i % len(batches)])
            jax.block_until_ready(loss)
            times.append((time.perf_counter() - t0) / args.repeats)
    adapters_count = 7 * layers
    print(
        f"\n### whole training step: finetune.train_step, Llama-architecture {layers} layers, "
        f"hidden {d}, {adapters_count} adapters r=16, batch {batch}x{seq} tokens\n"
    )
    print(
        "| optimizer | step (ms) | vs adamw | per-round ratios (min-max) | target "
        "| first step incl. compile (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (_, _, first, times) in steppers.items():
        ms = float(np.median(times))
        # Each round runs both optimizers back to back: its ratio shares that round's noise.
        ratios = np.asarray(times) / np.asarray(steppers["adamw"][3])
        target = "<= 1.05x" if name == "lora_muon" else ""
        print(
            f"| {name} | {ms * 1e3:.2f} | {float(np.median(ratios)):.3f}x | "
            f"{ratios.min():.3f}-{ratios.max():.3f} | {target} | {first:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sets, few repeats (smoke)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=int, default=8, help="Llama-7B widths divided by this")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu", "tpu"),
        default=None,
        help="JAX platform (default: JAX's own choice)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the parameters (factors; the model in the e2e section)",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to skip: pairs,llama,layer,compile,e2e"
    )
    parser.add_argument("--e2e-layers", type=int, default=4)
    parser.add_argument("--e2e-hidden", type=int, default=512)
    parser.add_argument("--e2e-vocab", type=int, default=4096)
    parser.add_argument("--e2e-batch", type=int, default=4)
    parser.add_argument("--e2e-seq", type=int, default=128)
    parser.add_argument("--e2e-rounds", type=int, default=7, help="interleaved rounds (e2e)")
    args = parser.parse_args()
    if args.device is not None:
        jax.config.update("jax_platforms", args.device)
    dtype = jnp.dtype(args.dtype)
    skip = set(filter(None, args.skip.split(",")))
    repeats, rounds = (3, 1) if args.quick else (args.repeats, args.rounds)
    if args.quick:
        args.repeats, args.rounds = repeats, rounds
        args.e2e_layers, args.e2e_hidden, args.e2e_vocab, args.e2e_seq = 2, 128, 512, 32
        args.e2e_rounds = 2
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, lora_muon_jax "
        f"{lora_muon_jax.__version__}, device {jax.devices()[0].device_kind} "
        f"({jax.devices()[0].platform}), config {vars(args)}"
    )

    def trio(params: Tree) -> dict[str, Callable[[], Measured]]:
        return {
            "optax.adamw": lambda: Measured("optax.adamw", optax.adamw(1e-3), params),
            "lora_muon gram": lambda: Measured("lora_muon gram", lora_muon(0.1), params),
            "lora_muon paper": lambda: Measured(
                "lora_muon paper", lora_muon(0.1, method="paper"), params
            ),
        }

    if "pairs" not in skip:
        n_pairs, width = (4, 256) if args.quick else (24, 1024)
        pairs = adapters([(f"l{i}", width, width) for i in range(n_pairs)], 16, dtype=dtype)
        compare(
            f"{n_pairs} pairs of {width}x16",
            trio(pairs),
            repeats,
            rounds,
            "optax.adamw",
            {"lora_muon gram": "<= 2x (3x at most)"},
        )

    if "llama" not in skip:
        scale = 64 if args.quick else args.scale
        llama = adapters(llama_shapes(scale), 16, dtype=dtype)
        gpu = jax.devices()[0].platform != "cpu"
        llama_results = compare(
            f"Llama-2-7B-shaped: 224 adapters, r=16, widths/{scale}",
            trio(llama),
            repeats,
            rounds,
            "optax.adamw",
            {"lora_muon gram": "<= 1.5x, < 1 ms at widths/1" if gpu else ""},
        )
        ours = llama_results["lora_muon gram"].compile_s
        base = llama_results["optax.adamw"].compile_s
        print(
            f"\nCompile of this step (not donated): lora_muon gram {ours:.1f} s (target <= 10 s "
            f"on the 2-core CPU), {ours / base:.2f}x optax.adamw's {base:.1f} s (target <= 2x)."
        )

    if "layer" not in skip:
        width = 256 if args.quick else 1024
        one_pair = adapters([("layer", width, width)], 16, dtype=dtype)
        dense = {
            "layer": (jax.random.normal(jax.random.key(1), (width, width)) / np.sqrt(width)).astype(
                dtype
            )
        }
        per_layer = compare(
            f"one layer: dense {width}x{width} vs one {width}x16 pair",
            {
                "optax.contrib.muon (dense)": lambda: Measured(
                    "optax.contrib.muon (dense)", optax.contrib.muon(0.02), dense
                ),
                "lora_muon gram (pair)": lambda: Measured(
                    "lora_muon gram (pair)", lora_muon(0.1), one_pair
                ),
            },
            repeats,
            rounds,
            "optax.contrib.muon (dense)",
        )
        dense_m, pair_m = (
            per_layer["optax.contrib.muon (dense)"],
            per_layer["lora_muon gram (pair)"],
        )
        print(
            f"\nLoRA-Muon is {dense_m.ms / pair_m.ms:.0f}x (call) / "
            f"{dense_m.loop_ms / pair_m.loop_ms:.0f}x (loop) faster per layer than dense Muon."
        )

    if "compile" not in skip:
        compile_scaling((2, 8) if args.quick else (8, 32, 128, 512), 256, dtype)

    if "e2e" not in skip:
        end_to_end(args, dtype)


if __name__ == "__main__":
    main()
