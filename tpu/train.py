"""Multi-host LoRA finetuning of an HF checkpoint with LoRA-Muon (TPU slices; CPU for tests).

Command (every TPU worker runs it; ``tpu/launch.sh`` does that):
    python tpu/train.py --config tpu/configs/v5litepod_16.toml --model /data/Llama-3.2-1B \\
        --data ~/tinyshakespeare.txt --ckpt_dir gs://BUCKET/lora_muon/run1 --out ~/run1
Local, 1 process × 8 CPU devices (what tests/test_tpu_entry.py runs):
    python tpu/train.py --config tpu/configs/cpu8.toml --model HF_DIR \\
        --data ../shared/data/tinyshakespeare.txt --ckpt_dir /tmp/lm_ckpt --cpu_devices 8
Local, 2 processes × 4 CPU devices (start both; same losses as above):
    for i in 0 1; do python tpu/train.py --config tpu/configs/cpu8.toml --model HF_DIR \\
        --data ../shared/data/tinyshakespeare.txt --ckpt_dir /tmp/lm_ckpt2 --cpu_devices 4 \\
        --coordinator localhost:12355 --num_processes 2 --process_id $i & done; wait
``HF_DIR``: any Llama/Mistral/Qwen2/Qwen3 checkpoint directory (``config.json`` +
``*.safetensors``), e.g. the one ``experiments/finetune_study.py`` pretrains and saves
(``experiments/results/finetune_study/quick/base``). Hardware, runtime and expected numbers: the
config file (each states them). Nothing here has run on a TPU (see tpu/README.md).

What it does:
* ``jax.distributed.initialize()`` (arguments auto-detected on TPU; given on CPU);
* a mesh ``(data, fsdp, tp)`` from the config (Auto axes);
* the checkpoint straight onto the mesh (``lora_muon_jax.hf.load_pretrained``:
  every process reads only its devices' slices of the safetensors files, which
  must be readable on every host), Megatron layout for the base weights;
* LoRA on ``targets`` (``lorafy``, scale α/r declared to the optimizer), factors'
  long axes over fsdp×tp and rank axes whole: the LoRA-Muon step needs one r×r
  all-reduce; only the factors train (``nnx.Optimizer(..., wrt=nnx.LoRAParam)``);
* batches: the global batch of step t is a pure function of (seed, t) over the
  tokenized text (the checkpoint's ``tokenizer.json``, else bytes); each process
  builds only its devices' rows (``jax.make_array_from_callback``);
* orbax checkpoints of adapters + optimizer (``checkpoint.save_nnx``, async, with
  per-array content checksums) every ``ckpt_every`` steps; a ``--ckpt_dir`` with a
  checkpoint in it resumes from the newest one that verifies
  (``checkpoint.restore_latest_intact``, onto whatever mesh this run has): a
  corrupt or truncated newest checkpoint is reported (step, why) and skipped for
  the next older one (the corrupt ones are deleted: this run writes those steps
  again), and with none intact the run starts from scratch, saying so;
* at the end, with ``--out``: the PEFT adapter (``OUT/adapter``) and, with
  ``--merged``, the merged HF checkpoint (``OUT/merged``), written by process 0;
* logs (process 0): step, loss, step time, tokens/s; ``--metrics`` appends JSONL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script from anywhere: the package is the repository root's lora_muon_jax.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--config", required=True, help="a tpu/configs/*.toml file")
    p.add_argument("--model", default=None, help="HF checkpoint directory (or [model] path)")
    p.add_argument("--data", required=True, help="a UTF-8 text file (TinyShakespeare)")
    p.add_argument("--ckpt_dir", required=True, help="checkpoint directory (local path or gs://)")
    p.add_argument("--out", default=None, help="write OUT/adapter (PEFT) at the end")
    p.add_argument("--merged", action="store_true", help="also write OUT/merged (HF checkpoint)")
    p.add_argument("--steps", type=int, default=None, help="override [train] steps")
    p.add_argument("--metrics", default=None, help="process 0 appends JSON lines here")
    p.add_argument("--cpu_devices", type=int, default=None, help="CPU only: devices per process")
    p.add_argument("--coordinator", default=None, help="host:port (CPU multi-process)")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument(
        "--crash_after_step",
        type=int,
        default=None,
        help="fault test: hard-exit (os._exit, no cleanup) right after this step",
    )
    return p.parse_args(argv)


def load_config(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        config = tomllib.load(f)
    for section in ("mesh", "model", "train"):
        if section not in config:
            raise ValueError(f"{path}: missing [{section}] section")
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    args.model = args.model or config["model"].get("path")
    if not args.model:
        raise SystemExit(f"no checkpoint: pass --model HF_DIR or set [model] path in {args.config}")

    import jax

    if args.cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.num_processes is not None and args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.cpu_devices is None:
        # TPU VM (single host or pod slice): coordinator, process count and id
        # are auto-detected from the TPU metadata.
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as err:  # e.g. no cluster to detect: one process
            print(f"jax.distributed.initialize() skipped: {err}", flush=True)

    return train(args, config)


def build(model_dir: str, config: dict[str, Any], steps: int, mesh: Any) -> tuple[Any, Any]:
    """The LoRA'd checkpoint on ``mesh`` and its ``nnx.Optimizer`` (LoRA-Muon on the factors).

    η follows linear warmup over ``warmup`` steps, then cosine decay to 10 %.
    ``mesh=None``: one device (what the tests restore checkpoints onto).
    """
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from lora_muon_jax import lora_muon
    from lora_muon_jax.finetune import TARGETS, adapt
    from lora_muon_jax.flax.nnx import lora_dimension_numbers_fn, lora_scale_fn
    from lora_muon_jax.hf import load_pretrained

    mcfg, tcfg = config["model"], config["train"]
    model = load_pretrained(
        model_dir,
        mesh=mesh,
        scan_layers=mcfg.get("scan_layers", False),
        dtype=jnp.dtype(mcfg.get("dtype", "float32")),
    )
    adapt(
        model,
        rank=mcfg["lora_rank"],
        alpha=mcfg["lora_alpha"],
        targets=mcfg.get("targets", TARGETS),
        mesh=mesh,
        seed=tcfg["seed"],
    )
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tcfg["lr"], tcfg["warmup"], max(steps, 2), end_value=0.1 * tcfg["lr"]
    )
    tx = lora_muon(
        schedule,
        weight_decay=tcfg["weight_decay"],
        lora_scale=lora_scale_fn(model),
        dimension_numbers=lora_dimension_numbers_fn(model),  # scanned layers == rank
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)


def global_batch(ids: np.ndarray, step: int, batch: int, length: int, seed: int) -> np.ndarray:
    """``batch`` windows of ``length`` ids at offsets from (seed, step): equal on every host."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(ids) - length, size=batch)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int32)


def train(args: argparse.Namespace, config: dict[str, Any]) -> int:
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from lora_muon_jax import checkpoint
    from lora_muon_jax.finetune import train_step
    from lora_muon_jax.hf import text as text_lib
    from lora_muon_jax.hf.peft import save_merged, save_peft_adapter

    mcfg, tcfg, axes = config["model"], config["train"], config["mesh"]
    steps = args.steps if args.steps is not None else tcfg["steps"]
    mesh_axes = {"data": axes["data"], "fsdp": axes["fsdp"], "tp": axes["tp"]}
    if math.prod(mesh_axes.values()) != jax.device_count():
        raise ValueError(f"mesh {mesh_axes} needs {jax.device_count()} devices in total")
    mesh = jax.make_mesh(
        tuple(mesh_axes.values()), tuple(mesh_axes), axis_types=(AxisType.Auto,) * 3
    )
    lead = jax.process_index() == 0

    def log(msg: str) -> None:
        if lead:
            print(msg, flush=True)

    log(
        f"jax {jax.__version__}, {jax.process_count()} processes, {jax.device_count()} devices "
        f"({jax.devices()[0].device_kind}), mesh {mesh_axes}, config {args.config}, "
        f"model {args.model}"
    )
    batch_sh = NamedSharding(mesh, P(("data", "fsdp"), None))
    with jax.set_mesh(mesh):
        model, optimizer = build(args.model, config, steps, mesh)
        tokenizer = text_lib.load_tokenizer(args.model, model.config.vocab_size)
        ids = tokenizer.encode(Path(args.data).read_text(encoding="utf-8"))
        manager = checkpoint.checkpoint_manager(
            os.path.abspath(args.ckpt_dir) if "://" not in args.ckpt_dir else args.ckpt_dir,
            max_to_keep=tcfg.get("max_to_keep", 3),
            save_interval_steps=tcfg["ckpt_every"],
        )
        # The newest checkpoint that verifies; newer ones that fail are reported and deleted
        # (orbax saves no step at or below the newest on disk; this run writes them again).
        start = (
            checkpoint.restore_latest_intact(
                manager, model, optimizer, log=log, delete_corrupt=True
            )
            or 0
        )
        if start:
            log(f"resumed from step {start} in {args.ckpt_dir}")
        batch_size, seq = tcfg["global_batch"], mcfg["seq_len"]
        metrics = open(args.metrics, "a") if (lead and args.metrics) else None
        last_step, last_time = start, time.perf_counter()
        for t in range(start, steps):
            rows = global_batch(ids, t, batch_size, seq + 1, tcfg["seed"])
            batch = jax.make_array_from_callback(rows.shape, batch_sh, rows.__getitem__)
            loss = train_step(model, optimizer, batch)
            checkpoint.save_nnx(manager, t + 1, model, optimizer, force=t + 1 == steps)
            if (t + 1) % tcfg["log_every"] == 0 or t + 1 == steps or t == start:
                loss_value = float(loss)  # waits for the step
                now = time.perf_counter()
                step_time = (now - last_time) / (t + 1 - last_step)
                if t == start:
                    log(f"step {t + 1} took {step_time:.1f} s: compilation (reused afterwards)")
                last_step, last_time = t + 1, now
                record = {
                    "step": t + 1,
                    "loss": loss_value,
                    "step_time_s": round(step_time, 5),
                    "tokens_per_s": round(batch_size * seq / step_time, 1),
                    "processes": jax.process_count(),
                    "devices": jax.device_count(),
                }
                log(json.dumps(record))
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
            if args.crash_after_step is not None and t + 1 == args.crash_after_step:
                log(f"crash_after_step={t + 1}: hard exit, no cleanup")
                sys.stdout.flush()
                os._exit(42)
        manager.wait_until_finished()
        if args.out:
            out = Path(args.out)
            save_peft_adapter(model, out / "adapter", base_model_name_or_path=args.model)
            if args.merged:
                save_merged(model, out / "merged", base_dir=args.model)
            log(f"wrote {out / 'adapter'}" + (f" and {out / 'merged'}" if args.merged else ""))
    log(json.dumps({"final_step": steps, "checkpoint": manager.latest_step()}))
    if metrics is not None:
        metrics.close()
    manager.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
