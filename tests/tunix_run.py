"""tunix ``PeftTrainer`` + ``lora_muon`` on a LoRA'd HF checkpoint: one process of a run.

    python tests/tunix_run.py CKPT_DIR ROOT STEPS [--accumulate K] [--devices 8]

Trains q/v adapters (``lorafy``, r = 4, α = 8) of the HF checkpoint with
``inject_hyperparams(lora_muon)`` for ``STEPS`` optimizer steps, checkpointing
to ``ROOT/ckpt`` every 2 steps with tunix's own checkpoint manager; a second
process with the same ROOT resumes from the latest checkpoint. Batches are a
fixed sequence. Writes ``ROOT/result.npz`` (every LoRA factor) and
``ROOT/metrics.json`` (tunix's logged loss and learning rate) at the end, and
prints ``STEP k`` after every step (the parent may kill the process then).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("root")
    parser.add_argument("steps", type=int)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx
    from tunix.sft import hooks, metrics_logger, peft_trainer

    from lora_muon_jax import lora_muon
    from lora_muon_jax.finetune import adapt, make_mesh
    from lora_muon_jax.flax.nnx import lora_scale_fn
    from lora_muon_jax.hf import load_pretrained, tunix_model_input

    root = pathlib.Path(args.root)
    mesh = make_mesh((1, args.devices // 2, 2))
    with jax.set_mesh(mesh):
        model = load_pretrained(args.ckpt, mesh=mesh)
        adapt(model, rank=4, alpha=8.0, targets=["q_proj", "v_proj"], mesh=mesh, seed=0)
        schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, 20, end_value=0.005)
        tx = optax.inject_hyperparams(lora_muon, static_args=("lora_scale",))(
            learning_rate=schedule, lora_scale=lora_scale_fn(model)
        )
        config = peft_trainer.TrainingConfig(
            eval_every_n_steps=1000,
            max_steps=args.steps,
            gradient_accumulation_steps=args.accumulate if args.accumulate > 1 else None,
            checkpoint_root_directory=str(root / "ckpt"),
            checkpointing_options=ocp.CheckpointManagerOptions(
                save_interval_steps=2, max_to_keep=4
            ),
            metrics_logging_options=metrics_logger.MetricsLoggerOptions(
                log_dir=str(root / "logs"), flush_every_n_steps=1
            ),
            pbar_description=None,
        )
        trainer = peft_trainer.PeftTrainer(model, tx, config)

        trainer = trainer.with_gen_model_input_fn(tunix_model_input)

        class Report(hooks.TrainingHooks):
            def on_train_start(self, train_ctx):  # type: ignore[no-untyped-def]
                pass

            def on_train_end(self, train_ctx):  # type: ignore[no-untyped-def]
                pass

            def on_train_step_start(self, train_ctx):  # type: ignore[no-untyped-def]
                pass

            def on_train_step_end(self, train_ctx, train_step, train_loss):  # type: ignore[no-untyped-def]
                print(f"STEP {train_step}", flush=True)

            def on_eval_step_start(self, train_ctx):  # type: ignore[no-untyped-def]
                pass

            def on_eval_step_end(self, train_ctx, eval_loss):  # type: ignore[no-untyped-def]
                pass

        trainer.with_training_hooks(Report())

        def batches():  # type: ignore[no-untyped-def]
            # From the start every time: a resumed trainer skips the batches it has seen.
            for i in range(args.steps * args.accumulate):
                rng = np.random.default_rng(1000 + i)
                tokens = rng.integers(0, 256, (8, 24)).astype(np.int32)
                yield peft_trainer.TrainingInput(
                    input_tokens=tokens, input_mask=np.ones_like(tokens, bool)
                )

        trainer.train(batches())
        trainer.close()
        state = nnx.state(model, nnx.LoRAParam)
        flat = {
            "/".join(map(str, k)): np.asarray(jax.device_get(v[...]))
            for k, v in nnx.to_flat_state(state)
        }
        np.savez(root / "result.npz", **flat)
        history = {
            name: [float(v) for v in trainer.metrics_logger.get_metric_history("", name, "train")]
            for name in ("loss", "learning_rate")
            if trainer.metrics_logger.metric_exists("", name, "train")
        }
        (root / "metrics.json").write_text(json.dumps(history))
        print("DONE", flush=True)


if __name__ == "__main__":
    main()
