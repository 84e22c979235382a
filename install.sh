#!/usr/bin/env bash
# Installs the OPT JAX server with pinned versions (constraints.txt).
#
#   ./install.sh              CPU JAX into ./.venv (created if missing)
#   ./install.sh --test       ... plus what the tests need (PyTorch CPU reference, pytest)
#   ./install.sh --cuda       CUDA 12 JAX instead of CPU JAX
#   ./install.sh --system     into the current interpreter instead of a venv (the Docker image)
#
# PYTHON picks the interpreter (default python3; Python >= 3.11), VENV the venv folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")"

cuda=0 test=0 system=0
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    --test) test=1 ;;
    --system) system=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: $("$python" --version 2>&1) is too old: jax 0.7.1 and flax 0.12.0 need Python >= 3.11" >&2
  exit 1
fi
if [ "$system" = 0 ]; then
  venv=${VENV:-.venv}
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  python="$venv/bin/python"
fi

requirements=(-r requirements.txt)
[ "$test" = 1 ] && requirements=(-r requirements-test.txt)
[ "$cuda" = 1 ] && requirements+=("jax[cuda12]")

"$python" -m pip install --quiet --upgrade pip
"$python" -m pip install --quiet -c constraints.txt "${requirements[@]}"
"$python" -m pip check
echo "installed into $("$python" -c 'import sys; print(sys.prefix)') ($("$python" -c 'import jax; print("jax", jax.__version__)'))"
