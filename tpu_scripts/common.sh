# shellcheck shell=bash disable=SC2034  # its settings are read by the scripts sourcing it
# Shared settings and helpers for the lsemil Cloud TPU scripts. Sourced, never run.
#
# Every setting is an environment variable. Those with a safe default get one here; those
# without one (PROJECT, BUCKET, DATA_SRC) are checked by the script that needs them with
# `: "${VAR:?...}"`, which fails before any command is printed or run, DRY_RUN=1 included.
#
#   PROJECT           GCP project id                                      (required)
#   ZONE              TPU zone                       default us-central2-b (where v4 lives)
#   TPU_NAME          name of the TPU VM                                   default lsemil-tpu
#   ACCELERATOR_TYPE  slice type: v4-8, v4-32, v5litepod-16, v5p-8, v6e-8 default v4-8
#   RUNTIME_VERSION   TPU software version; default follows the generation of
#                     ACCELERATOR_TYPE: v4 -> tpu-ubuntu2204-base, v5e (v5litepod) ->
#                     v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e
#   BUCKET            GCS bucket (name or gs://name) for workdirs, results and the staged
#                     copy of the data (required by stage_data.sh to a bucket, train.sh and
#                     reproduce.sh)
#   CONFIG            config for `lsemil train`          default configs/paper.py:r0=5
#   DTYPE             compute dtype of `lsemil train` (--config.model.dtype; params and
#                     Adam moments stay float32): bfloat16, the MXU's input type, or
#                     float32 (configs/paper.py's, which a run started before this setting
#                     used: resume such a run with DTYPE=float32)     default bfloat16
#   AOT_TOPOLOGY      `lsemil aot --topology` of the preflight       default from
#                     ACCELERATOR_TYPE (v5litepod-16 -> v5e:4x4, v4-32 -> v4:2x2x4, ...)
#   STAMP             suffix shared by the runs of one experiment  default: now, %Y%m%d-%H%M
#   RUN_NAME          run name, derived from CONFIG     default e.g. paper-r0-5
#   WORKDIR           workdir of the run      default gs://$BUCKET/lsemil/$RUN_NAME-$STAMP
#   DATASET_NAME      name of the prepared dataset              default nih-512
#   DATA_DIR          --data-dir on the workers: a folder on each worker's local disk (lsemil
#                     reads data from local disk only; workdirs and outputs may be on gs://),
#                     put there by stage_data.sh STAGE_TO=workers; a leading ~/ is expanded
#                     by each worker's shell              default ~/lsemil-data/$DATASET_NAME
#   REMOTE_REPO       where the code lives on each worker        default ~/lsemil
#   REMOTE_VENV       the virtualenv on each worker              default ~/lsemil-venv
#   REMOTE_LOG_DIR    per-worker log folder                      default ~/lsemil-logs
#   DRY_RUN           1: print every command (shell-quoted, prefixed "+ ") instead of
#                     running it; 0 or unset: run them                       default 0

# The scripts live in <repo>/tpu_scripts; the repository root is one level up.
TPU_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${TPU_SCRIPTS_DIR}/.." && pwd)"

die() {
  echo "error: $*" >&2
  exit 1
}

log() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "[lsemil-tpu dry run] $*" >&2
  else
    echo "[lsemil-tpu] $*" >&2
  fi
}

case "${DRY_RUN:-0}" in
  0 | 1) ;;
  *) die "DRY_RUN must be 0 or 1, got '${DRY_RUN}'" ;;
esac
DRY_RUN="${DRY_RUN:-0}"

# Quote one word for a POSIX shell: bare when it is made of safe characters, otherwise in
# single quotes. The output parses back to the same word under bash and Python's shlex.
quote() {
  local s="$1"
  if [[ -n "${s}" && "${s}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "${s}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Like quote, but keeps a leading "~/" unquoted so that the remote shell expands it to the
# worker's home directory.
# shellcheck disable=SC2088  # the tilde is meant literally, for the remote shell
rquote() {
  local s="$1"
  if [[ "${s}" == "~/"* ]]; then
    printf '~/%s' "$(quote "${s#\~/}")"
  else
    quote "${s}"
  fi
}

# Quote every argument and join them with spaces.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "${word}")"
  done
  printf '%s' "${out}"
}

# Run a command, or with DRY_RUN=1 print it as one shell-quoted line prefixed "+ ".
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

# Runtime (software) version for an accelerator type; empty for an unknown generation.
default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "" ;;
  esac
}

# The `lsemil aot --topology` name of an accelerator type: v5litepod-16 -> v5e:4x4,
# v6e-8 -> v6e:2x4, v4-32 -> v4:2x2x4, v5p-8 -> v5p:2x2x1 (v4 and v5p types count
# TensorCores, two per chip); empty for a type not listed here (set AOT_TOPOLOGY).
aot_topology() {
  local gen="${1%-*}" n="${1##*-}" chips
  [[ "${n}" =~ ^[0-9]+$ ]] || return 0
  case "${gen}" in
    v5litepod | v5e) gen=v5e chips="${n}" ;;
    v6e) chips="${n}" ;;
    v4 | v5p) chips=$((n / 2)) ;;
    *) return 0 ;;
  esac
  if [[ "${gen}" == v4 || "${gen}" == v5p ]]; then
    case "${chips}" in
      4) echo "${gen}:2x2x1" ;; 8) echo "${gen}:2x2x2" ;; 16) echo "${gen}:2x2x4" ;;
      32) echo "${gen}:2x4x4" ;; 64) echo "${gen}:4x4x4" ;; 128) echo "${gen}:4x4x8" ;;
      *) ;;
    esac
  else
    case "${chips}" in
      1) echo "${gen}:1x1" ;; 4) echo "${gen}:2x2" ;; 8) echo "${gen}:2x4" ;;
      16) echo "${gen}:4x4" ;; 32) echo "${gen}:4x8" ;; 64) echo "${gen}:8x8" ;;
      128) echo "${gen}:8x16" ;; 256) echo "${gen}:16x16" ;;
      *) ;;
    esac
  fi
}

# Replace every character but [A-Za-z0-9_.-] with "-": a name safe in paths and commands.
safe_name() {
  printf '%s' "${1//[^A-Za-z0-9_.-]/-}"
}

# "configs/paper.py:r0=5" -> "paper-r0-5": a name fit for paths and logs.
run_name_from_config() {
  local cfg="$1" base arg
  base="$(basename "${cfg%%:*}" .py)"
  arg=""
  [[ "${cfg}" == *:* ]] && arg="${cfg#*:}"
  safe_name "${base}${arg:+-${arg}}"
}

ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-lsemil-tpu}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "${ACCELERATOR_TYPE}")}"
CONFIG="${CONFIG:-configs/paper.py:r0=5}"
DTYPE="${DTYPE:-bfloat16}"
case "${DTYPE}" in
  bfloat16 | float32) ;;
  *) die "DTYPE must be bfloat16 or float32, got '${DTYPE}'" ;;
esac
# Computed once here, on this machine, so every worker gets the very same workdir.
STAMP="${STAMP:-$(date +%Y%m%d-%H%M)}"
RUN_NAME="${RUN_NAME:-$(run_name_from_config "${CONFIG}")}"
DATASET_NAME="${DATASET_NAME:-nih-512}"
DATA_DIR="${DATA_DIR:-~/lsemil-data/${DATASET_NAME}}"
REMOTE_REPO="${REMOTE_REPO:-~/lsemil}"
REMOTE_VENV="${REMOTE_VENV:-~/lsemil-venv}"
REMOTE_LOG_DIR="${REMOTE_LOG_DIR:-~/lsemil-logs}"

# Call after `: "${BUCKET:?...}"`: the bucket URL without a trailing slash.
bucket_url() {
  local b="${BUCKET#gs://}"
  printf 'gs://%s' "${b%/}"
}

# require_local_dir VAR: die unless the folder in VAR is a local path (not gs://, s3://,
# any scheme://): lsemil reads its data from each worker's local disk.
require_local_dir() {
  local value="${!1}"
  if [[ "${value}" =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]; then
    die "$1=${value} is remote, but lsemil reads data from local disk only; copy it to every" \
      "worker with STAGE_TO=workers DATA_SRC=${value} ./tpu_scripts/stage_data.sh and set" \
      "$1 to the worker folder (default ~/lsemil-data/\$DATASET_NAME)"
  fi
}

require_runtime_version() {
  [[ -n "${RUNTIME_VERSION}" ]] \
    || die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=${ACCELERATOR_TYPE}; set RUNTIME_VERSION"
}

# tpu_ssh WORKER COMMAND: run COMMAND (one string, parsed by the remote login shell) on
# WORKER ("all" or an index) of the TPU VM.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "--project=${PROJECT}" "--zone=${ZONE}" \
    "--worker=$1" --command "$2"
}

# remote_detached NAME JOB: a remote command line that starts JOB (a shell command string)
# in a session of its own (setsid), immune to hangups (nohup), with stdin from /dev/null and
# all output appended to REMOTE_LOG_DIR/NAME.log on each worker, so that it survives the end
# of the ssh session. Only the launched command is backgrounded, so ssh returns at once.
remote_detached() {
  local name job="$2" dir logf
  name="$(safe_name "$1")"
  dir="$(rquote "${REMOTE_LOG_DIR}")"
  logf="$(rquote "${REMOTE_LOG_DIR}/${name}.log")"
  # $(hostname) is for the remote shell to expand.
  # shellcheck disable=SC2016
  printf 'mkdir -p %s && { setsid nohup bash -c %s >> %s 2>&1 < /dev/null & } && echo "started %s on $(hostname), log: %s"' \
    "${dir}" "$(quote "${job}")" "${logf}" "${name}" "${logf}"
}
