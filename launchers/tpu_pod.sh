#!/usr/bin/env bash
# Run xgen on every worker of a Cloud TPU VM slice: create (or reuse) the slice, copy this
# checkout, install it, start `python -m xgen.launch <supervisor options> -- <overrides>` on all
# workers at once (each worker's supervisor runs `python -m xgen.run` and restarts it after a
# failure; JAX's multi-controller runtime joins the workers: hardware files for TPUs set
# distributed=true), stream the logs, and delete the slice when asked.
#
#   launchers/tpu_pod.sh --name xgen-s3 --zone us-central2-b --hardware tpu_v4_512 --retries 50 -- \
#       experiment=xgen_7b_s3_8k data_dir=/mnt/data hydra.run.dir=/mnt/runs/s3
#   launchers/tpu_pod.sh --name xgen-s3 --zone us-central2-b --delete
#
# Supervisor options, passed on: --retries N, --backoff S, --max-backoff S, --same-failure-limit N,
# --silence-minutes M (docs/launching.md, "Keeping a long run alive"). Every worker must write
# one run directory, on storage every worker sees (a persistent disk or gcsfuse mounted at the
# same path): give hydra.run.dir=<that path>; without it the directory is named once, here
# (outputs/<task>/<time>, relative to ~/xgen on each worker), and a warning says it is not shared.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

name="" zone="" hardware="tpu_v4_8" version="tpu-ubuntu2204-base" delete=0 dry=0 spot=0 launch_opts=()
usage() { sed -n '2,17p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --hardware) hardware="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry=1; shift ;;
    --retries|--backoff|--max-backoff|--same-failure-limit|--silence-minutes)
      [ $# -ge 2 ] || { echo "tpu_pod.sh: $1 needs a value" >&2; exit 2; }
      launch_opts+=("$1" "$2"); shift 2 ;;
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
# One run directory for all workers and all restarts: Hydra would time-stamp it on each
# worker at each start. Named here, once, when the overrides do not name it.
run_dir="" task=pretrain
for arg in "$@"; do
  case "$arg" in
    hydra.run.dir=*|+hydra.run.dir=*|++hydra.run.dir=*) run_dir="${arg#*hydra.run.dir=}" ;;
    task=*|+task=*|++task=*) task="${arg#*task=}" ;;
  esac
done
extra=()
if [ -z "$run_dir" ]; then
  run_dir="outputs/$task/$(date +%Y-%m-%d_%H-%M-%S)"
  extra=("hydra.run.dir=$run_dir")
fi
case "$run_dir" in
  /*) ;;
  *) echo "tpu_pod.sh: warning: hydra.run.dir=$run_dir is on each worker's own disk; give a path on storage every worker sees" >&2 ;;
esac
overrides=$(printf '%q ' "hardware=$hardware" "$@" "${extra[@]}")
launch=""
[ ${#launch_opts[@]} -gt 0 ] && launch=$(printf '%q ' "${launch_opts[@]}")
# All workers start together, each under its own supervisor; every worker's output streams
# here, prefixed by gcloud.
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "cd ~/xgen && python3 -m xgen.launch $launch-- $overrides"
