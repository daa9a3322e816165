#!/usr/bin/env bash
# Run xgen on every worker of a Cloud TPU VM slice: create (or reuse) the slice, copy this
# checkout, install it, start `python -m xgen.run <overrides>` on all workers at once (JAX's
# multi-controller runtime joins them: hardware files for TPUs set distributed=true), stream
# the logs, and delete the slice when asked.
#
#   launchers/tpu_pod.sh --name xgen-s3 --zone us-central2-b --hardware tpu_v4_512 -- \
#       experiment=xgen_7b_s3_8k data_dir=gs://my-bucket/xgen
#   launchers/tpu_pod.sh --name xgen-s3 --zone us-central2-b --delete
#
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

name="" zone="" hardware="tpu_v4_8" version="tpu-ubuntu2204-base" delete=0 dry=0 spot=0
usage() { sed -n '2,13p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --hardware) hardware="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; usage ;;
  esac
done
[ -n "$name" ] && [ -n "$zone" ] || { echo "tpu_pod.sh: --name and --zone are required" >&2; usage; }

repo=$(cd "$(dirname "$0")/.." && pwd)
hw_file="$repo/conf/hardware/$hardware.yaml"
[ -f "$hw_file" ] || { echo "tpu_pod.sh: no hardware file $hw_file" >&2; exit 2; }
# The Cloud TPU type comes from the hardware file (it counts TensorCores: tpu_v4_512 is v4-1024).
accelerator=$(grep -E '^accelerator_type:' "$hw_file" | awk '{print $2}')
[ -n "$accelerator" ] || { echo "tpu_pod.sh: $hw_file has no accelerator_type" >&2; exit 2; }

run() { if [ "$dry" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
tpu=(gcloud compute tpus tpu-vm)

if [ "$delete" = 1 ]; then
  run "${tpu[@]}" delete "$name" --zone "$zone" --quiet
  exit 0
fi

if [ "$dry" = 1 ] || ! "${tpu[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  create=("${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$accelerator" --version "$version")
  [ "$spot" = 1 ] && create+=(--spot)
  run "${create[@]}"
fi

archive=/tmp/xgen-$name.tar.gz
run tar -czf "$archive" -C "$repo" --exclude=outputs --exclude=multirun --exclude=.git .
run "${tpu[@]}" scp "$archive" "$name:~/xgen.tar.gz" --zone "$zone" --worker=all
remote="mkdir -p ~/xgen && tar -xzf ~/xgen.tar.gz -C ~/xgen && cd ~/xgen && python3 -m pip install -q -e '.[tpu]'"
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "$remote"
overrides=$(printf '%q ' "hardware=$hardware" "$@")
# All workers start together; every worker's output streams here, prefixed by gcloud.
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "cd ~/xgen && python3 -m xgen.run $overrides"
