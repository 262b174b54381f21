#!/usr/bin/env bash
# Delete the TPU VM (or its queued resource). Data and runs in the bucket are kept.
#
#   PROJECT=my-project ./tpu_scripts/delete.sh
#   PROJECT=my-project QUEUED=1 QUIET=1 ./tpu_scripts/delete.sh
#
# Settings (environment variables; shared ones are documented in common.sh):
#   PROJECT, ZONE, TPU_NAME (see common.sh)
#   QUEUED              1: the TPU came from create.sh QUEUED=1; delete the queued
#                       resource and, with --force, its TPU VM                 default 0
#   QUEUED_RESOURCE_ID  id of the queued resource              default $TPU_NAME-qr
#   QUIET               1: do not ask for confirmation                         default 0
#   DRY_RUN             1: print the commands instead of running them        default 0
set -euo pipefail

: "${PROJECT:?set PROJECT to your GCP project id}"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED="${QUEUED:-0}"
QUEUED_RESOURCE_ID="${QUEUED_RESOURCE_ID:-${TPU_NAME}-qr}"
quiet=()
[[ "${QUIET:-0}" == 1 ]] && quiet=(--quiet)

if [[ "${QUEUED}" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE_ID}" \
    "--project=${PROJECT}" "--zone=${ZONE}" --force ${quiet[@]+"${quiet[@]}"}
else
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "--project=${PROJECT}" "--zone=${ZONE}" \
    ${quiet[@]+"${quiet[@]}"}
fi
log "workdirs, data and results in your bucket are kept; remove them with gcloud storage rm"
