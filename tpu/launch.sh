#!/usr/bin/env bash
# Run tpu/train.py on every worker of a TPU VM (single host or pod slice).
#
# Command (from the repository root on your workstation):
#   TPU_NAME=lm-v5e16 ZONE=us-west4-a CONFIG=tpu/configs/v5litepod_16.toml \
#   MODEL=gs://YOUR_BUCKET/Llama-3.2-1B DATA=/home/$USER/tinyshakespeare.txt \
#   CKPT=gs://YOUR_BUCKET/lora_muon/v5e16 OUT=/home/$USER/run1 bash tpu/launch.sh
# MODEL: the HF checkpoint directory, either a path that exists on every worker or a
# gs:// prefix that setup.sh copies to ~/hf_model on every worker.
# Optional: PROJECT=..., SETUP=0 (skip copy + setup), OUT=... (PEFT adapter written
# there by worker 0), EXTRA="--steps 100 --merged".
# What it does: copies this repository and the data file to every worker
# (gcloud compute tpus tpu-vm scp --worker=all), runs tpu/setup.sh on every
# worker, then starts the same training command on every worker at once
# (gcloud compute tpus tpu-vm ssh --worker=all --command=...). Each worker's
# jax.distributed.initialize() finds the others by itself. Re-running the same
# command resumes from the latest checkpoint in $CKPT.
# Hardware: any TPU VM; NOT RUN in this project (no TPU available).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${MODEL:?set MODEL}"
: "${DATA:?set DATA}" "${CKPT:?set CKPT}"
MODEL_URI=""
if [[ "$MODEL" == gs://* ]]; then MODEL_URI="$MODEL"; MODEL='~/hf_model'; fi
OUT_FLAG=""
[ -n "${OUT:-}" ] && OUT_FLAG="--out $OUT"
PROJECT_FLAG=()
[ -n "${PROJECT:-}" ] && PROJECT_FLAG=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
REMOTE_REPO='~/lora_muon_jax'
VENV='~/lora_muon_venv'

if [ "${SETUP:-1}" = "1" ]; then
  tarball="$(mktemp -d)/lora_muon_jax.tar.gz"
  git archive --format=tar.gz -o "$tarball" HEAD   # committed files only
  "${TPU[@]}" scp "$tarball" "$TPU_NAME":~/ --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}"
  "${TPU[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}" \
    --command="mkdir -p $REMOTE_REPO && tar -xzf ~/lora_muon_jax.tar.gz -C $REMOTE_REPO"
  if [ -f "$DATA" ]; then  # a local file: copy it to the same path's basename in ~
    "${TPU[@]}" scp "$DATA" "$TPU_NAME":~/ --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}"
    DATA="~/$(basename "$DATA")"
  fi
  "${TPU[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}" \
    --command="MODEL_URI=$MODEL_URI bash $REMOTE_REPO/tpu/setup.sh"
fi

"${TPU[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}" \
  --command="cd $REMOTE_REPO && $VENV/bin/python tpu/train.py --config $CONFIG --model $MODEL --data $DATA --ckpt_dir $CKPT $OUT_FLAG ${EXTRA:-} 2>&1 | tee -a ~/train.log"
