#!/usr/bin/env bash
# Run `lsemil reproduce` (the paper's tables and figures) over the three r0 runs.
#
#   # train the three runs one after the other with one STAMP (each train.sh returns at
#   # once; start the next when the previous log says it finished):
#   export PROJECT=my-project BUCKET=my-bucket STAMP=exp1
#   CONFIG=configs/paper.py:r0=0 ./tpu_scripts/train.sh     # ... then r0=5, then r0=10
#   ./tpu_scripts/reproduce.sh
#
# By default the runs are the train.sh workdirs gs://$BUCKET/lsemil/paper-r0-<r0>-$STAMP
# for r0 in R0_VALUES; set RUNS to name other workdirs. Like train.sh, the command is the
# same on every worker (LSEMIL_MULTIHOST=1, since JAX on a multi-host slice needs every
# host), detached, with a log per worker; REPRODUCE_WORKER=0 runs it on worker 0 alone
# (single-host slices only).
#
# Settings (environment variables; shared ones are documented in common.sh):
#   PROJECT, BUCKET   (required) see common.sh
#   STAMP             (required unless RUNS is set) the STAMP given to train.sh
#   R0_VALUES         the r0 of the runs                               default "0 5 10"
#   PAPER_CONFIG      config file the runs were trained with   default configs/paper.py
#   RUNS              "r0=0:W0 r0=5:W5 r0=10:W10" (space-separated --run values)
#                                                   default from R0_VALUES and STAMP
#   DATA_DIR          the dataset on each worker's local disk (see train.sh)
#                                               default ~/lsemil-data/$DATASET_NAME
#   OUT               where the tables and figures go  default gs://$BUCKET/lsemil/reproduce-$STAMP
#   REPRODUCE_ARGS    more `lsemil reproduce` flags, a shell fragment       default unset
#   REPRODUCE_WORKER  all | 0                                             default all
#   DETACH            1: detach like train.sh; 0: stream the output here  default 1
#   ZONE, TPU_NAME, REMOTE_REPO, REMOTE_VENV, REMOTE_LOG_DIR   see common.sh
#   DRY_RUN           1: print the commands instead of running them      default 0
set -euo pipefail

: "${PROJECT:?set PROJECT to your GCP project id}"
: "${BUCKET:?set BUCKET to your GCS bucket (name or gs://name)}"
if [[ -z "${RUNS:-}" ]]; then
  : "${STAMP:?set STAMP to the STAMP of the train.sh runs (their workdirs end in -STAMP), or set RUNS}"
fi
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

R0_VALUES="${R0_VALUES:-0 5 10}"
PAPER_CONFIG="${PAPER_CONFIG:-configs/paper.py}"
OUT="${OUT:-$(bucket_url)/lsemil/reproduce-${STAMP}}"
REPRODUCE_ARGS="${REPRODUCE_ARGS:-}"
REPRODUCE_WORKER="${REPRODUCE_WORKER:-all}"
DETACH="${DETACH:-1}"
require_local_dir DATA_DIR

if [[ -z "${RUNS:-}" ]]; then
  RUNS=""
  for r0 in ${R0_VALUES}; do
    RUNS+="${RUNS:+ }r0=${r0}:$(bucket_url)/lsemil/$(run_name_from_config "${PAPER_CONFIG}:r0=${r0}")-${STAMP}"
  done
fi
read -r -a runs <<<"${RUNS}"
((${#runs[@]})) || die "RUNS is empty"

job="cd $(rquote "${REMOTE_REPO}") && . $(rquote "${REMOTE_VENV}")/bin/activate"
if [[ "${REPRODUCE_WORKER}" == all ]]; then
  job+=" && export LSEMIL_MULTIHOST=1"
fi
job+=" && lsemil reproduce"
for r in "${runs[@]}"; do
  job+=" --run $(quote "${r}")"
done
job+=" --data-dir $(rquote "${DATA_DIR}") --out $(rquote "${OUT}")"
job+="${REPRODUCE_ARGS:+ ${REPRODUCE_ARGS}}"

log "reproduce ${RUNS} -> ${OUT} on worker(s) ${REPRODUCE_WORKER} of ${TPU_NAME}"
if [[ "${DETACH}" == 1 ]]; then
  tpu_ssh "${REPRODUCE_WORKER}" "$(remote_detached "reproduce-${STAMP}" "${job}")"
else
  tpu_ssh "${REPRODUCE_WORKER}" "${job}"
fi
log "results: ${OUT}"
