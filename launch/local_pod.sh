#!/usr/bin/env bash
# A miniature pod on this machine: N JAX processes on CPU, each with K CPU devices, joined by
# gloo collectives, each running `python -m mae_jax.main ARGS...`. Try a multi-host launch
# here before paying for one.
#
#   launch/local_pod.sh N [--devices_per_process=K] [--module=M] -- ARGS...
#
# Every output line carries its process's prefix, "[i/N] ". The pod fails as soon as one
# process fails: the others are killed, and the exit status is the failed process's. Ctrl-C
# kills them all. A SIGTERM to this script is passed on to every process, as a preemption of
# the whole pod: training saves a checkpoint at a step all processes agree on, then stops.
#
# --devices_per_process=K sets K (default 4); --module=M runs `python -m M` instead of
# mae_jax.main. Environment: PYTHON (default python3) runs the processes.
set -euo pipefail

usage() {
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
}

num_processes=""
devices_per_process=4
module=mae_jax.main
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process=*) devices_per_process=${1#*=} ;;
    --module=*) module=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *)
      if [[ -n $num_processes || ! $1 =~ ^[0-9]+$ ]]; then
        echo "local_pod.sh: unexpected argument '$1'." >&2
        usage
        exit 2
      fi
      num_processes=$1
      ;;
  esac
  shift
done
if [[ ! $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "local_pod.sh: give the number of processes N >= 1 as the first argument." >&2
  usage
  exit 2
fi
if [[ ! $devices_per_process =~ ^[1-9][0-9]*$ ]]; then
  echo "local_pod.sh: --devices_per_process must be a whole number >= 1." >&2
  exit 2
fi

python=${PYTHON:-python3}
# A port the kernel just handed out, so pods started side by side do not collide.
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# Seen with jax 0.10.2: a pod resuming a checkpoint with programs that an earlier pod run left
# in the persistent compilation cache failed its first step in gloo's setup. Compile afresh.
if [[ -n ${JAX_COMPILATION_CACHE_DIR:-} ]]; then
  echo "[local_pod] not using JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR in a CPU pod." >&2
  unset JAX_COMPILATION_CACHE_DIR
fi

declare -A running=()  # pid -> process index
for ((i = 0; i < num_processes; i++)); do
  # The output filter runs beside the process, so $! is the python process itself: the one
  # to signal, and the one whose exit status counts.
  JAX_PLATFORMS=cpu \
    MAE_JAX_COORDINATOR="127.0.0.1:$port" \
    MAE_JAX_NUM_PROCESSES="$num_processes" \
    MAE_JAX_PROCESS_ID="$i" \
    MAE_JAX_NUM_CPU_DEVICES="$devices_per_process" \
    "$python" -u -m "$module" "$@" \
    > >(sed -u "s|^|[$i/$num_processes] |") 2>&1 &
  running[$!]=$i
  echo "[local_pod] process $i/$num_processes: pid $!" >&2
done

kill_all() {
  # SIGKILL: a JAX process takes SIGTERM as a preemption notice and keeps going.
  kill -KILL "${!running[@]}" 2>/dev/null || true
}
trap 'kill_all; exit 130' INT
trap 'echo "[local_pod] SIGTERM: passing it on to every process." >&2
      kill -TERM "${!running[@]}" 2>/dev/null || true' TERM

while ((${#running[@]} > 0)); do
  status=0
  # A trapped signal ends the wait early with no process finished: then wait again.
  wait -n -p finished "${!running[@]}" || status=$?
  if [[ -z ${finished:-} ]]; then
    continue
  fi
  index=${running[$finished]}
  unset "running[$finished]"
  if ((status != 0)); then
    echo "[local_pod] process $index/$num_processes (pid $finished) failed with exit status" \
      "$status; stopping the pod." >&2
    kill_all
    exit "$status"
  fi
done
echo "[local_pod] all $num_processes processes finished." >&2
