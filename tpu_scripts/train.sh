#!/usr/bin/env bash
# Launch `lsemil train` on every worker of the TPU VM, detached from the ssh session.
#
#   PROJECT=my-project BUCKET=my-bucket ./tpu_scripts/train.sh
#   PROJECT=my-project BUCKET=my-bucket STAMP=exp1 CONFIG=configs/paper.py:r0=10 \
#     TRAIN_ARGS='--config.train.batch_size=64' ./tpu_scripts/train.sh
#
# One `tpu-vm ssh --worker=all` carries one command line, so every host runs the same
# config with the same workdir; the workdir (its date stamp included) is resolved here,
# not on the workers. The data is read from each worker's local disk (DATA_DIR, default
# ~/lsemil-data/$DATASET_NAME): stage it there first with stage_data.sh STAGE_TO=workers. LSEMIL_MULTIHOST=1 makes lsemil call jax.distributed.initialize(),
# which on Cloud TPU finds the coordinator and the process ids by itself. Each worker
# writes its log to REMOTE_LOG_DIR/<run>.log on its own disk and, when the run ends,
# copies it to $WORKDIR/logs/<hostname>.log. Relaunching with the same WORKDIR resumes.
#
# Settings (environment variables; shared ones are documented in common.sh):
#   PROJECT, BUCKET           (required) see common.sh
#   CONFIG                    default configs/paper.py:r0=5
#   STAMP, RUN_NAME, WORKDIR  default WORKDIR gs://$BUCKET/lsemil/$RUN_NAME-$STAMP
#                             (must be on gs://: all hosts write one run)
#   DATA_DIR                  the dataset on each worker's local disk (stage_data.sh
#                             STAGE_TO=workers puts it there)  default ~/lsemil-data/$DATASET_NAME
#   DTYPE                     compute dtype (--config.model.dtype)     default bfloat16
#   TRAIN_ARGS                more `lsemil train` flags, a shell fragment appended as is,
#                             e.g. '--config.train.batch_size=64'           default unset
#   ZONE, TPU_NAME, REMOTE_REPO, REMOTE_VENV, REMOTE_LOG_DIR   see common.sh
#   DRY_RUN                   1: print the commands instead of running them default 0
set -euo pipefail

: "${PROJECT:?set PROJECT to your GCP project id}"
: "${BUCKET:?set BUCKET to your GCS bucket (name or gs://name) for the workdir}"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKDIR="${WORKDIR:-$(bucket_url)/lsemil/${RUN_NAME}-${STAMP}}"
WORKDIR="${WORKDIR%/}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
[[ "${WORKDIR}" == gs://* ]] \
  || die "WORKDIR=${WORKDIR} must be a gs:// URL: every host writes to the same run"
require_local_dir DATA_DIR
name="$(safe_name "train-$(basename "${WORKDIR}")")"

job="cd $(rquote "${REMOTE_REPO}") && . $(rquote "${REMOTE_VENV}")/bin/activate"
job+=" && export LSEMIL_MULTIHOST=1"
job+=" && lsemil train --config $(quote "${CONFIG}") --workdir $(quote "${WORKDIR}")"
job+=" --data-dir $(rquote "${DATA_DIR}") --config.model.dtype=$(quote "${DTYPE}")"
job+="${TRAIN_ARGS:+ ${TRAIN_ARGS}}"
# Keep the exit status of the run, then copy this worker's log next to the checkpoints.
log_file="$(rquote "${REMOTE_LOG_DIR}/${name}.log")"
logs_url="$(quote "${WORKDIR}/logs/")"
# shellcheck disable=SC2016  # $?, $rc and $(hostname) are for the worker's shell
job+='; rc=$?; gcloud storage cp '"${log_file} ${logs_url}"'"$(hostname).log" || true; exit $rc'

log "run ${WORKDIR} (config ${CONFIG}, data ${DATA_DIR}) on every worker of ${TPU_NAME}"
tpu_ssh all "$(remote_detached "${name}" "${job}")"
log "follow worker 0: gcloud compute tpus tpu-vm ssh ${TPU_NAME} --project=${PROJECT}" \
  "--zone=${ZONE} --worker=0 --command 'tail -f ${REMOTE_LOG_DIR}/${name}.log'"
log "TensorBoard: tensorboard --logdir ${WORKDIR}"
