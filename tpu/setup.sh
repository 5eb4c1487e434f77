#!/usr/bin/env bash
# Per-host setup for a TPU VM worker; idempotent (safe to re-run on every worker).
#
# Command (every worker at once, from your workstation):
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
#       --command="bash ~/lora_muon_jax/tpu/setup.sh"
# (tpu/launch.sh copies the repository and runs this for you.)
# Hardware: a TPU VM (v4 / v5e / v5p / v6e runtime images, Ubuntu, Python >= 3.10).
# Runtime: ~1-2 min the first time (pip downloads), seconds afterwards.
# Expected: prints the JAX version and the number of local TPU devices.
# NOT RUN on real TPU hardware in this project (no TPU available); the pip
# commands are the documented ones for JAX on TPU.
set -euo pipefail

REPO_DIR="${REPO_DIR:-$HOME/lora_muon_jax}"
VENV="${VENV:-$HOME/lora_muon_venv}"
DATA_URL="${DATA_URL:-}"   # optional: where to fetch the training text from
DATA="${DATA:-$HOME/tinyshakespeare.txt}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# pip is idempotent: already-satisfied requirements are skipped.
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "jax[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
"$VENV/bin/pip" install -q -e "$REPO_DIR[hf,orbax]"

if [ ! -f "$DATA" ] && [ -n "$DATA_URL" ]; then
  curl -fsSL "$DATA_URL" -o "$DATA.tmp" && mv "$DATA.tmp" "$DATA"
fi
if [ -n "${MODEL_URI:-}" ] && [ ! -f "$HOME/hf_model/config.json" ]; then  # gs://.../Llama-3.2-1B
  mkdir -p "$HOME/hf_model" && gcloud storage cp -r "$MODEL_URI/*" "$HOME/hf_model/"
fi
[ -f "$DATA" ] || echo "note: $DATA is missing; copy it with gcloud compute tpus tpu-vm scp --worker=all"

"$VENV/bin/python" - <<'PY'
import jax
print(f"jax {jax.__version__}: {jax.local_device_count()} local / {jax.device_count()} devices"
      f" ({jax.devices()[0].device_kind}) on process {jax.process_index()}")
PY
