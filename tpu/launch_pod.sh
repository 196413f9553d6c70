#!/usr/bin/env bash
# Train a jpeft LoRA adapter on a TPU VM pod slice, end to end:
#   1. create the TPU VM slice        (gcloud compute tpus tpu-vm create)
#   2. copy this repository to every worker (git archive + scp --worker=all)
#   3. install jpeft and JAX for TPU on every worker
#   4. run `jpeft train --config CONFIG` (with --config; CONFIG is copied to every worker) or
#      else tpu/train_multihost.py (the toy model) on every worker at once (ssh --worker=all);
#      JAX finds the other hosts by itself (--cluster-auto), process 0 writes the adapter
#   5. gather the adapter from worker 0 (scp --worker=0)
#   6. delete the slice (also on failure, unless --keep)
#
# --dry-run prints every command instead of running it (nothing is created or billed).
#
# Examples:
#   tpu/launch_pod.sh --name jpeft-run --zone us-central2-b --accelerator-type v4-32 \
#       --config llama.toml --out ./adapter --dry-run -- --set train.steps=500
#   tpu/launch_pod.sh --name jpeft-run --accelerator-type v4-32 --out ./adapter --dry-run \
#       -- --steps 200 --fsdp 4 --param-dtype bfloat16 --compute-dtype bfloat16
# Everything after "--" goes to `jpeft train` (with --config) or to tpu/train_multihost.py.
# The config's `model` is a path every worker can read (a folder copied to each worker, or a
# bucket mounted with gcsfuse); --run-dir (its output_dir) must be one folder all workers
# share (a mounted bucket or NFS), because checkpoints are written by all processes together.
set -euo pipefail

NAME="jpeft-pod"
ZONE="us-central2-b"
ACCEL="v4-32"
VERSION="tpu-ubuntu2204-base"
PROJECT=""
OUT="./jpeft_adapter"
REMOTE_OUT="/tmp/jpeft_adapter"
CONFIG=""
RUN_DIR="/tmp/jpeft_run"
DRY_RUN=0
KEEP=0
SPOT=0
TRAIN_ARGS=()

usage() {
  cat <<'EOF'
usage: tpu/launch_pod.sh [options] [-- jpeft train / train_multihost.py args]

Creates a TPU VM pod slice, copies this repository to every worker, runs
`jpeft train --config CONFIG --cluster-auto` (or, without --config, tpu/train_multihost.py)
on all workers, copies the adapter back and deletes the slice.

options:
  --name NAME              TPU VM name                       (default jpeft-pod)
  --zone ZONE              zone                              (default us-central2-b)
  --accelerator-type TYPE  slice type, e.g. v4-8, v4-32, v5litepod-16 (default v4-32)
  --version VERSION        TPU VM software version           (default tpu-ubuntu2204-base)
  --project PROJECT        GCP project                       (default: gcloud's)
  --config FILE            a `jpeft train` TOML (copied to every worker; its model path
                           must be readable there)
  --run-dir DIR            output_dir of `jpeft train` on the workers (default /tmp/jpeft_run);
                           on a multi-host slice a folder all workers share (mounted bucket, NFS)
  --out DIR                local directory for the adapter   (default ./jpeft_adapter)
  --spot                   request spot capacity
  --keep                   do not delete the slice at the end
  --dry-run                print every command, run nothing
  -h, --help               this help
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator-type) ACCEL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --run-dir) RUN_DIR="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "launch_pod.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -n "$CONFIG" && ! -f "$CONFIG" ]]; then
  echo "launch_pod.sh: --config '$CONFIG' is not a file" >&2
  exit 2
fi

if [[ ! "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
  echo "launch_pod.sh: --name '$NAME' is not a valid TPU name (lowercase letters, digits and '-', starting with a letter)" >&2
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE="/tmp/${NAME}-jpeft.tar.gz"
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

# run CMD...: print it (dry run) or print and run it.
run() {
  printf '%q ' "$@" | sed 's/ $//'
  echo
  if [[ $DRY_RUN -eq 0 ]]; then
    "$@"
  fi
}

cleanup() {
  if [[ $KEEP -eq 0 && $DRY_RUN -eq 0 ]]; then
    echo "# deleting $NAME" >&2
    gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet || true
  fi
}

CREATE=(gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" --accelerator-type "$ACCEL" --version "$VERSION")
[[ $SPOT -eq 1 ]] && CREATE+=(--spot)

echo "# 1/6 create the slice" >&2
run "${CREATE[@]}"
[[ $DRY_RUN -eq 0 ]] && trap cleanup EXIT

echo "# 2/6 copy the code to every worker" >&2
run git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:jpeft.tar.gz" "${COMMON[@]}" --worker=all

echo "# 3/6 install on every worker" >&2
SETUP="mkdir -p jpeft && tar xzf jpeft.tar.gz -C jpeft && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ./jpeft"
run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command "$SETUP"

echo "# 4/6 train on every worker" >&2
if [[ -n "$CONFIG" ]]; then
  run gcloud compute tpus tpu-vm scp "$CONFIG" "$NAME:jpeft-config.toml" "${COMMON[@]}" --worker=all
  TRAIN="cd jpeft && python3 -m jpeft.cli train --config ../jpeft-config.toml --cluster-auto --no-progress"
  TRAIN+=" --output-dir $(printf '%q' "$RUN_DIR")"
  GATHER="$RUN_DIR/adapter/*"
else
  TRAIN="cd jpeft && python3 tpu/train_multihost.py --cluster-auto --out $REMOTE_OUT"
  GATHER="$REMOTE_OUT/*"
fi
for a in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do TRAIN+=" $(printf '%q' "$a")"; done
run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command "$TRAIN"

echo "# 5/6 gather the adapter from worker 0 (process 0 wrote it)" >&2
run mkdir -p "$OUT"
run gcloud compute tpus tpu-vm scp --recurse "$NAME:$GATHER" "$OUT/" "${COMMON[@]}" --worker=0

echo "# 6/6 delete the slice" >&2
if [[ $KEEP -eq 1 ]]; then
  echo "# --keep: $NAME is left running; delete it with:" >&2
  echo "#   gcloud compute tpus tpu-vm delete $NAME --zone $ZONE --quiet" >&2
else
  [[ $DRY_RUN -eq 0 ]] && trap - EXIT
  run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
fi
