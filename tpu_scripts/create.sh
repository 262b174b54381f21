#!/usr/bin/env bash
# Create the Cloud TPU VM (or a queued resource that becomes it) for lsemil.
#
#   PROJECT=my-project ./tpu_scripts/create.sh
#   PROJECT=my-project ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a SPOT=1 ./tpu_scripts/create.sh
#   PROJECT=my-project QUEUED=1 SPOT=1 ./tpu_scripts/create.sh
#   PROJECT=my-project PREFLIGHT=1 AOT_ARGS='--per-chip-batch 32' ./tpu_scripts/create.sh
#
# Settings (environment variables; shared ones are documented in common.sh):
#   PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE, RUNTIME_VERSION (see common.sh)
#   SPOT                1: Spot capacity (cheaper, can be preempted)           default 0
#   RESERVED            1: use the project's reserved capacity                 default 0
#   QUEUED              1: request through a queued resource, which waits for
#                       capacity instead of failing at once                    default 0
#   QUEUED_RESOURCE_ID  id of the queued resource              default $TPU_NAME-qr
#   VALID_UNTIL         queued only: give up after this long, e.g. 6h        default unset
#   CREATE_FLAGS        extra gcloud flags, split on spaces      default unset
#   PREFLIGHT           1: first compile CONFIG for ACCELERATOR_TYPE here with `lsemil aot`
#                       (needs lsemil with the tpu extra on this machine, no TPU; minutes)
#                       and stop before renting when it does not fit in HBM   default 0
#   AOT_TOPOLOGY        the preflight's --topology          default from ACCELERATOR_TYPE
#   AOT_ARGS            more `lsemil aot` flags, split on spaces, e.g. '--per-chip-batch 32'
#                       (default: the config's train.batch_size over the chips)
#   CONFIG, DTYPE       what the preflight compiles (see common.sh)
#   DRY_RUN             1: print the commands instead of running them        default 0
set -euo pipefail

: "${PROJECT:?set PROJECT to your GCP project id}"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SPOT="${SPOT:-0}"
RESERVED="${RESERVED:-0}"
QUEUED="${QUEUED:-0}"
QUEUED_RESOURCE_ID="${QUEUED_RESOURCE_ID:-${TPU_NAME}-qr}"
VALID_UNTIL="${VALID_UNTIL:-}"
read -r -a extra <<<"${CREATE_FLAGS:-}"

require_runtime_version
[[ "${SPOT}" == 1 && "${RESERVED}" == 1 ]] && die "SPOT=1 and RESERVED=1 exclude each other"
[[ -n "${VALID_UNTIL}" && "${QUEUED}" != 1 ]] && die "VALID_UNTIL needs QUEUED=1"

PREFLIGHT="${PREFLIGHT:-0}"
if [[ "${PREFLIGHT}" == 1 ]]; then
  topology="${AOT_TOPOLOGY:-$(aot_topology "${ACCELERATOR_TYPE}")}"
  [[ -n "${topology}" ]] \
    || die "PREFLIGHT=1: no lsemil aot topology known for ${ACCELERATOR_TYPE}; set AOT_TOPOLOGY (e.g. v5e:4x4)"
  read -r -a aot_args <<<"${AOT_ARGS:-}"
  log "preflight: compiling ${CONFIG} (${DTYPE}) for ${topology} here before renting"
  run lsemil aot --config "${CONFIG}" --dtype "${DTYPE}" --topology "${topology}" \
    ${aot_args[@]+"${aot_args[@]}"} \
    || die "preflight: ${CONFIG} (${DTYPE}) does not fit on ${ACCELERATOR_TYPE} (${topology}; see above): nothing was created"
fi

capacity=()
[[ "${SPOT}" == 1 ]] && capacity+=(--spot)
[[ "${RESERVED}" == 1 ]] && capacity+=(--reserved)

log "${ACCELERATOR_TYPE} '${TPU_NAME}' in ${ZONE}, runtime ${RUNTIME_VERSION}"
if [[ "${QUEUED}" == 1 ]]; then
  [[ -n "${VALID_UNTIL}" ]] && capacity+=("--valid-until-duration=${VALID_UNTIL}")
  run gcloud compute tpus queued-resources create "${QUEUED_RESOURCE_ID}" \
    "--node-id=${TPU_NAME}" "--project=${PROJECT}" "--zone=${ZONE}" \
    "--accelerator-type=${ACCELERATOR_TYPE}" "--runtime-version=${RUNTIME_VERSION}" \
    ${capacity[@]+"${capacity[@]}"} ${extra[@]+"${extra[@]}"}
  log "queued; wait for state ACTIVE before setup.sh:"
  log "  gcloud compute tpus queued-resources describe ${QUEUED_RESOURCE_ID} --project=${PROJECT} --zone=${ZONE}"
else
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" "--project=${PROJECT}" "--zone=${ZONE}" \
    "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${RUNTIME_VERSION}" \
    ${capacity[@]+"${capacity[@]}"} ${extra[@]+"${extra[@]}"}
fi
