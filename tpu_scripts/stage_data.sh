#!/usr/bin/env bash
# Copy a prepared dataset (the output of `lsemil prepare`) where the TPU workers read it.
# lsemil reads data from local disk only (workdirs and outputs may be on gs://), so the
# dataset goes to the bucket once, then from there onto the local disk of every worker:
#
#   # once, on any machine with the NIH images:
#   lsemil prepare --nih-dir /data/nih --out /data/nih-512 --format png --size 512
#   # to the bucket (default): gs://my-bucket/lsemil/data/nih-512
#   BUCKET=my-bucket DATA_SRC=/data/nih-512 ./tpu_scripts/stage_data.sh
#   # then onto every worker's disk, ~/lsemil-data/nih-512, train.sh's default DATA_DIR
#   # (again after every create.sh: a new TPU VM has empty disks):
#   PROJECT=my-project STAGE_TO=workers DATA_SRC=gs://my-bucket/lsemil/data/nih-512 \
#     ./tpu_scripts/stage_data.sh
#
# STAGE_TO=bucket runs `gcloud storage rsync --recursive` from DATA_SRC (a local folder) to
# gs://$BUCKET/lsemil/data/$DATASET_NAME. STAGE_TO=workers puts a copy on the local disk of
# every worker: from a gs:// DATA_SRC each worker pulls it with `gcloud storage rsync`
# (fast, in parallel); from a local DATA_SRC it is pushed with `tpu-vm scp --recurse
# --worker=all` (slow for the full dataset, fine for samples).
#
# Settings (environment variables; shared ones are documented in common.sh):
#   DATA_SRC         the prepared dataset: a local folder or a gs:// URL      (required)
#   STAGE_TO         bucket | workers                                     default bucket
#   BUCKET           (required for STAGE_TO=bucket) see common.sh
#   PROJECT          (required for STAGE_TO=workers) see common.sh
#   DATASET_NAME     name of the staged copy                              default nih-512
#   WORKER_DATA_DIR  STAGE_TO=workers: where on each worker (a local path)
#                    default DATA_DIR, i.e. ~/lsemil-data/$DATASET_NAME
#   ZONE, TPU_NAME   see common.sh
#   DRY_RUN          1: print the commands instead of running them        default 0
set -euo pipefail

: "${DATA_SRC:?set DATA_SRC to the folder written by lsemil prepare (local path or gs:// URL)}"
STAGE_TO="${STAGE_TO:-bucket}"
case "${STAGE_TO}" in
  bucket) : "${BUCKET:?set BUCKET to your GCS bucket (name or gs://name)}" ;;
  workers) : "${PROJECT:?set PROJECT to your GCP project id}" ;;
  *)
    echo "error: STAGE_TO must be bucket or workers, got '${STAGE_TO}'" >&2
    exit 1
    ;;
esac
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

src="${DATA_SRC%/}"
if [[ "${src}" != gs://* ]]; then
  [[ -d "${src}" ]] || die "DATA_SRC=${DATA_SRC} is not a folder (run lsemil prepare first)"
fi

if [[ "${STAGE_TO}" == bucket ]]; then
  [[ "${src}" == gs://* ]] \
    && die "DATA_SRC=${DATA_SRC} is already in GCS; copy it to the workers with STAGE_TO=workers"
  dest="$(bucket_url)/lsemil/data/${DATASET_NAME}"
  run gcloud storage rsync --recursive "${src}" "${dest}"
  log "staged to ${dest}; now copy it to every worker (lsemil reads local disk):" \
    "PROJECT=${PROJECT:-my-project} STAGE_TO=workers DATA_SRC=${dest} ./tpu_scripts/stage_data.sh"
else
  WORKER_DATA_DIR="${WORKER_DATA_DIR:-${DATA_DIR}}"
  require_local_dir WORKER_DATA_DIR
  wdir="$(rquote "${WORKER_DATA_DIR}")"
  if [[ "${src}" == gs://* ]]; then
    tpu_ssh all "mkdir -p ${wdir} && gcloud storage rsync --recursive $(quote "${src}") ${wdir}"
  else
    # scp copies a folder *into* an existing destination, so the destination must not exist.
    parent="$(rquote "$(dirname "${WORKER_DATA_DIR}")")"
    exists="echo \"${WORKER_DATA_DIR} exists on \$(hostname); remove it or set DATASET_NAME\" >&2"
    tpu_ssh all "mkdir -p ${parent} && if [ -e ${wdir} ]; then ${exists}; exit 1; fi"
    dest="${WORKER_DATA_DIR#\~/}"
    run gcloud compute tpus tpu-vm scp --recurse "${src}" "${TPU_NAME}:${dest}" \
      "--project=${PROJECT}" "--zone=${ZONE}" --worker=all
  fi
  log "staged on every worker; train with DATA_DIR=${WORKER_DATA_DIR}"
fi
