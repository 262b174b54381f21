#!/usr/bin/env bash
# Install lsemil and jax[tpu] on every worker of the TPU VM.
#
#   PROJECT=my-project ./tpu_scripts/setup.sh                    # ship this checkout
#   PROJECT=my-project REPO_URL=https://github.com/you/lsemil.git ./tpu_scripts/setup.sh
#
# The code reaches every worker either by `tpu-vm scp --recurse --worker=all` of SHIP_PATHS
# from this checkout (default; uncommitted edits included) or, with REPO_URL set, by a
# shallow `git clone` of REPO_REF on each worker. Then, on every worker: a virtualenv is
# created once (uv fetches Python PYTHON_VERSION, since the TPU images ship Python 3.10 and
# lsemil needs >= 3.11), and `pip install -U "jax[tpu]"` and `pip install -e` the code run
# in it; the latter brings gcsfs, which gs:// workdirs need, and google-cloud-storage (the
# workdir lock). Run it again after changing the code: it re-ships and reinstalls.
#
# Settings (environment variables; shared ones are documented in common.sh):
#   PROJECT, ZONE, TPU_NAME, REMOTE_REPO, REMOTE_VENV (see common.sh)
#   REPO_URL        git URL to clone on the workers instead of shipping this checkout
#                   (a public URL, or one the workers can reach; no tokens in it) default unset
#   REPO_REF        branch or tag to clone                                 default main
#   SHIP_PATHS      what to scp, relative to the repository root
#                                        default "pyproject.toml README.md lsemil configs"
#   PYTHON_VERSION  Python of the virtualenv, or "system" for the image's python3
#                                                                          default 3.12
#   PIP_EXTRA       more pip requirements, split on spaces               default unset
#   DRY_RUN         1: print the commands instead of running them        default 0
set -euo pipefail

: "${PROJECT:?set PROJECT to your GCP project id}"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
SHIP_PATHS="${SHIP_PATHS:-pyproject.toml README.md lsemil configs}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
read -r -a pip_extra <<<"${PIP_EXTRA:-}"

repo="$(rquote "${REMOTE_REPO}")"
venv="$(rquote "${REMOTE_VENV}")"

# 1. The code.
if [[ -n "${REPO_URL}" ]]; then
  [[ "${REPO_URL}" =~ ://[^/]*@ ]] && die "REPO_URL must not carry credentials (user:token@)"
  url="$(quote "${REPO_URL}")"
  ref="$(quote "${REPO_REF}")"
  fetch="git -C ${repo} fetch --depth=1 origin ${ref} && git -C ${repo} checkout --force FETCH_HEAD"
  clone="git clone --depth=1 --branch=${ref} ${url} ${repo}"
  tpu_ssh all "if [ -d ${repo}/.git ]; then ${fetch}; else ${clone}; fi"
else
  read -r -a ship <<<"${SHIP_PATHS}"
  sources=()
  for path in "${ship[@]}"; do
    if [[ -e "${REPO_ROOT}/${path}" ]]; then
      sources+=("${REPO_ROOT}/${path}")
    else
      log "warning: SHIP_PATHS: ${REPO_ROOT}/${path} does not exist, not shipped"
    fi
  done
  ((${#sources[@]})) || die "SHIP_PATHS: none of '${SHIP_PATHS}' exists under ${REPO_ROOT}"
  # scp resolves a relative remote path against the home directory.
  dest="${REMOTE_REPO#\~/}"
  tpu_ssh all "mkdir -p ${repo}"
  run gcloud compute tpus tpu-vm scp --recurse "${sources[@]}" "${TPU_NAME}:${dest}/" \
    "--project=${PROJECT}" "--zone=${ZONE}" --worker=all
fi

# 2. The virtualenv (created once) and the packages.
if [[ "${PYTHON_VERSION}" == system ]]; then
  make_venv="python3 -m venv ${venv}"
else
  make_venv="python3 -m pip install --user --upgrade uv"
  make_venv+=" && ~/.local/bin/uv venv --seed --python $(quote "${PYTHON_VERSION}") ${venv}"
fi
install="[ -x ${venv}/bin/python ] || { ${make_venv}; }"
install+=" && ${venv}/bin/pip install --upgrade pip"
install+=" && ${venv}/bin/pip install -U $(quote 'jax[tpu]')"
install+=" && ${venv}/bin/pip install -e ${repo}"
if ((${#pip_extra[@]})); then
  install+=" && ${venv}/bin/pip install $(quote_all "${pip_extra[@]}")"
fi
# gcsfs comes with lsemil (pyproject): every gs:// path needs it on a VM without TensorFlow.
install+=" && ${venv}/bin/lsemil --version && ${venv}/bin/python -c $(quote 'import jax, gcsfs; print("jax", jax.__version__, "gcsfs", gcsfs.__version__)')"
tpu_ssh all "${install}"
log "installed on every worker of ${TPU_NAME}; next: stage_data.sh, then train.sh"
