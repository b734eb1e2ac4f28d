#!/usr/bin/env bash
# mae_jax on a Cloud TPU VM slice: create the slice (directly, or as a queued resource), install
# mae_jax on every worker, and run the same `python -m mae_jax.main` (the worker's
# ~/mae_jax_venv) on all of them at once.
# Every worker is one JAX process; mae_jax.distributed finds the others by itself.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator_type=v4-32 --repo=GIT_URL \
#     --config=configs/vit_l.py --workdir=gs://BUCKET/vit_l [options] [-- --config.FIELD=V ...]
#
# Options:
#   --name=NAME               TPU VM (and queued resource) name                       [required]
#   --zone=ZONE               e.g. us-central2-b (v4), us-west4-a (v5e)               [required]
#   --accelerator_type=TYPE   v4-32, v5p-128, v5litepod-256 (v5e-256 works too), v6e-64, ...
#                                                                                     [required]
#   --runtime_version=V       TPU software version; default from the TPU generation:
#                             tpu-ubuntu2204-base (v2-v4), v2-alpha-tpuv5-lite (v5e),
#                             v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
#   --project=PROJECT         default: gcloud's configured project
#   --queued                  request the slice as a queued resource and wait until ACTIVE
#   --spot                    Spot capacity (cheaper; preemptible: run the same command again
#                             and the preempted slice is deleted, created anew, and training
#                             resumes from its workdir)
#   --plan                    before create, compile the run's train step for this slice here
#                             ($PYTHON -m mae_jax.plan, PYTHON default python3; needs '.[tpu]')
#                             and create nothing if it does not fit in the chips' memory
#   --create_even_if_it_does_not_fit   with --plan: create the slice all the same
#   --repo=GIT_URL            mae_jax repository every worker clones        [required: install]
#   --branch=BRANCH           default: main
#   --config=FILE             config file, relative to the repository          [required: run]
#   --workdir=gs://...        checkpoints and logs; every worker must reach it [required: run]
#   --steps=LIST              comma-separated subset of create,install,run (default: all three)
#   --detach                  start training in the background on every worker (output in
#                             ~/mae_jax.log there) and return, instead of streaming it here
#   --dry_run                 print every command instead of running it
# Arguments after `--` go to mae_jax.main unchanged (and to the plan).
#
# Every worker gets its own virtual environment (~/mae_jax_venv) of a Python that jax supports
# (3.11 or newer: the TPU images ship 3.10, so python3.11 comes from Ubuntu's packages when no
# newer one is there), with mae_jax[tpu]: the jax version the tests ran with and its libtpu.
set -euo pipefail

usage() {
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

name="" zone="" accelerator_type="" runtime_version="" project=""
repo="" branch=main config="" workdir="" steps=create,install,run
queued=false spot=false detach=false dry_run=false plan=false force_create=false
python=${PYTHON:-python3}  # runs the plan here
poll_s=${TPU_POD_POLL_S:-60}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --runtime_version=*) runtime_version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --branch=*) branch=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --steps=*) steps=${1#*=} ;;
    --queued) queued=true ;;
    --spot) spot=true ;;
    --detach) detach=true ;;
    --dry_run) dry_run=true ;;
    --plan) plan=true ;;
    --create_even_if_it_does_not_fit) force_create=true ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage; die "unknown argument '$1' (options take the form --flag=value)." ;;
  esac
  shift
done
extra_args=("$@")

[[ -n $name ]] || die "--name is required (the TPU VM to create or use)."
[[ -n $zone ]] || die "--zone is required, e.g. --zone=us-central2-b."
for step in ${steps//,/ }; do
  [[ $step =~ ^(create|install|run)$ ]] ||
    die "--steps=$steps: '$step' is not one of create, install, run."
done
has_step() { [[ ,$steps, == *,$1,* ]]; }

# gcloud calls the v5e "v5litepod".
accelerator_type=${accelerator_type/#v5e-/v5litepod-}
if has_step create; then
  [[ $accelerator_type =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]] ||
    die "--accelerator_type='$accelerator_type' is not a TPU type such as v4-32 or v5litepod-256."
  if [[ -z $runtime_version ]]; then
    case "${accelerator_type%-*}" in
      v2 | v3 | v4) runtime_version=tpu-ubuntu2204-base ;;
      v5litepod) runtime_version=v2-alpha-tpuv5-lite ;;
      v5p) runtime_version=v2-alpha-tpuv5 ;;
      v6e) runtime_version=v2-alpha-tpuv6e ;;
    esac
  fi
  # v2-v4 and v5p types count TensorCores (2 a chip), v5e and v6e count chips (the same table
  # as mae_jax/plan.py). v2-v5p hosts hold 4 chips, one TPU VM each. v5e and v6e hosts hold 8
  # chips (the documentation's tables: v5e 4x4 = 2 hosts); a slice of up to 8 chips is one TPU
  # VM, a larger one runs as 4-chip TPU VMs, two a host.
  size=${accelerator_type##*-}
  case "${accelerator_type%-*}" in
    v5litepod | v6e)
      chips=$size host_chips=8 single_vm=8
      [[ " 1 4 8 16 32 64 128 256 " == *" $size "* ]] ||
        die "--accelerator_type=$accelerator_type: ${accelerator_type%-*} sizes count chips:" \
          "1, 4, 8, 16, 32, 64, 128 or 256."
      ;;
    *)
      chips=$((size / 2)) host_chips=4 single_vm=4
      ((size >= 8 && (size & (size - 1)) == 0)) ||
        die "--accelerator_type=$accelerator_type: ${accelerator_type%-*} sizes count" \
          "TensorCores (2 a chip): 8, 16, 32, 64, ..."
      ;;
  esac
  if ((chips > host_chips)); then hosts="$((chips / host_chips)) hosts"
  elif ((chips == host_chips)); then hosts="1 host"
  else hosts="1/$((host_chips / chips)) of a host"; fi
  workers=$((chips <= single_vm ? 1 : chips / 4))
  if ((workers > 1)); then processes="$workers TPU VM workers, one JAX process each"
  else processes="1 TPU VM worker, one JAX process"; fi
  echo "# $accelerator_type: $chips chips on $hosts ($processes)."
fi
if $plan; then
  has_step create || die "--plan checks a slice before creating it; add create to --steps."
  [[ $accelerator_type =~ ^(v2|v3)- ]] &&
    die "--plan compiles for v4, v5p, v5e (v5litepod) and v6e slices, not ${accelerator_type%-*}."
  [[ -n $config ]] || die "--plan needs --config, e.g. --config=configs/vit_l.py."
fi
if has_step install; then
  [[ -n $repo ]] || die "--repo is required to install mae_jax (a git URL every worker can clone)."
fi
if has_step run; then
  [[ -n $config ]] || die "--config is required to run, e.g. --config=configs/vit_l.py."
  [[ -n $workdir ]] || die "--workdir is required to run, e.g. --workdir=gs://BUCKET/vit_l."
  [[ $workdir == gs://* ]] ||
    echo "tpu_pod.sh: warning: --workdir=$workdir is not on GCS; every worker must see the same" \
      "directory, so use gs://BUCKET/... unless it is a shared file system." >&2
fi

gcloud_flags=(--zone="$zone")
[[ -z $project ]] || gcloud_flags+=(--project="$project")

# One word as a shell reads it back: bare when safe, else single-quoted; for --flag=value only
# the value is quoted, so that a printed command reads like a typed one.
quote() {
  local prefix="" word=$1 q="'"
  if [[ $word =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    word=${BASH_REMATCH[2]}
  fi
  if [[ ! $word =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then
    word="$q${word//$q/$q\\$q$q}$q"
  fi
  printf '%s%s' "$prefix" "$word"
}

# Runs a command, or in a dry run prints it as a line a shell would run unchanged.
run() {
  if $dry_run; then
    local line=() word
    for word in "$@"; do
      line+=("$(quote "$word")")
    done
    echo "${line[*]}"
  else
    "$@"
  fi
}

# Runs a shell command line on every worker of the slice at once.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$1"
}

# The plan: the run's own train step compiled here for this slice; no slice when it does not fit.
if $plan; then
  plan_cmd=("$python" -m mae_jax.plan --config="$config" --topology="$accelerator_type"
            "${extra_args[@]}")
  if $dry_run; then
    echo "# compiled here first; create only if it fits:"
    run "${plan_cmd[@]}"
  else
    status=0
    "${plan_cmd[@]}" || status=$?
    if ((status == 1)) && ! $force_create; then
      die "the config does not fit on $accelerator_type (see the plan above, and its suggested overrides); nothing was created. Pass --create_even_if_it_does_not_fit to create it anyway."
    elif ((status == 1)); then
      echo "tpu_pod.sh: the config does not fit on $accelerator_type; creating it anyway (--create_even_if_it_does_not_fit)." >&2
    elif ((status != 0)); then
      die "the plan failed (exit status $status); nothing was created."
    fi
  fi
fi

# The state of an existing resource: its state, "" when there is none; any other error stops.
existing_state() {
  local out status=0
  out=$("$@" 2>&1) || status=$?
  if ((status == 0)); then
    echo "$out"
  elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then
    echo ""
  else
    echo "tpu_pod.sh: '$*' failed (exit status $status): $out" >&2
    return 1
  fi
}

if has_step create; then
  spot_flag=()
  ! $spot || spot_flag=(--spot)
  if $queued; then
    kind=(gcloud compute tpus queued-resources)
    describe=("${kind[@]}" describe "$name" "${gcloud_flags[@]}" --format='value(state.state)')
    delete=("${kind[@]}" delete "$name" "${gcloud_flags[@]}" --force --quiet)
    gone_states="FAILED SUSPENDED"  # a preempted Spot slice leaves its queued resource SUSPENDED
  else
    kind=(gcloud compute tpus tpu-vm)
    describe=("${kind[@]}" describe "$name" "${gcloud_flags[@]}" --format='value(state)')
    delete=("${kind[@]}" delete "$name" "${gcloud_flags[@]}" --quiet)
    gone_states="PREEMPTED TERMINATED"  # Spot TPUs cannot be restarted, only deleted
  fi
  create_it=true
  if $dry_run; then
    echo "# if $name exists: reused when it is up; deleted first when it is one of: $gone_states"
    run "${describe[@]}"
  else
    state=$(existing_state "${describe[@]}") || exit 1
    if [[ -n $state && " $gone_states " == *" $state "* ]]; then
      echo "tpu_pod.sh: $name is $state (Spot capacity taken back); deleting it to create it again." >&2
      "${delete[@]}"
    elif [[ -n $state ]]; then
      echo "tpu_pod.sh: $name exists ($state); using it." >&2
      create_it=false
    fi
  fi
  if $create_it && $queued; then
    run "${kind[@]}" create "$name" --node-id="$name" \
      "${gcloud_flags[@]}" --accelerator-type="$accelerator_type" \
      --runtime-version="$runtime_version" "${spot_flag[@]}"
  elif $create_it; then
    run "${kind[@]}" create "$name" "${gcloud_flags[@]}" \
      --accelerator-type="$accelerator_type" --version="$runtime_version" "${spot_flag[@]}"
  fi
  if $queued && $dry_run; then
    echo "# repeated every $poll_s s until it prints ACTIVE:"
    run "${describe[@]}"
  elif $queued; then
    while true; do
      state=$(existing_state "${describe[@]}") || exit 1
      [[ $state != ACTIVE ]] || break
      [[ -n $state ]] || die "queued resource $name is gone; inspect it with: ${describe[*]}"
      [[ " $gone_states " != *" $state "* ]] ||
        die "queued resource $name is $state; inspect it with: ${describe[*]}"
      echo "tpu_pod.sh: queued resource $name is $state; waiting." >&2
      sleep "$poll_s"
    done
  fi
fi

if has_step install; then
  # A fresh clone, or the branch's newest commit in an existing one; then a virtual environment
  # of a Python that jax supports and mae_jax[tpu] in it (the pinned jax and its libtpu),
  # editable so that configs/ stays next to the code.
  on_all_workers "set -e; if [ -d ~/mae_jax/.git ]; then \
git -C ~/mae_jax fetch --depth=1 origin $(quote "$branch") \
&& git -C ~/mae_jax checkout --force -B $(quote "$branch") FETCH_HEAD; \
else git clone --depth=1 --branch=$(quote "$branch") $(quote "$repo") ~/mae_jax; fi; \
py=; for v in python3.13 python3.12 python3.11; do if command -v \$v >/dev/null; then py=\$v; break; fi; done; \
if [ -z \"\$py\" ]; then sudo apt-get update -qq \
&& sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; py=python3.11; fi; \
[ -x ~/mae_jax_venv/bin/python ] || \$py -m venv ~/mae_jax_venv; \
~/mae_jax_venv/bin/python -m pip install --upgrade pip; \
~/mae_jax_venv/bin/python -m pip install -e \"\$HOME/mae_jax[tpu]\""
fi

if has_step run; then
  # shellcheck disable=SC2088  # the tilde expands on the workers
  main="~/mae_jax_venv/bin/python -m mae_jax.main"
  for word in --config="$config" --workdir="$workdir" "${extra_args[@]}"; do
    main+=" $(quote "$word")"
  done
  if $detach; then
    on_all_workers "cd ~/mae_jax && nohup $main > ~/mae_jax.log 2>&1 < /dev/null &"
  else
    on_all_workers "cd ~/mae_jax && $main"
  fi
fi

if $dry_run || has_step create; then
  echo "# When done, delete the slice (billing continues until then):"
  if $queued; then
    echo "#   gcloud compute tpus queued-resources delete $name ${gcloud_flags[*]} --force --quiet"
  else
    echo "#   gcloud compute tpus tpu-vm delete $name ${gcloud_flags[*]} --quiet"
  fi
fi
