#!/usr/bin/env bash
# Builds the server's image from the repository root (../Dockerfile) and pushes it to a registry.
#
#   DOCKER_IMAGE_NAME_WITH_TAG=registry.example.com/opt-jax:0.1 kubernetes/build_and_push.sh
#
# DOCKER_IMAGE_NAME_WITH_TAG  required: the image to build and push, registry/name:tag
# FROM_IMAGE_NAME             optional: the base image (the Dockerfile's default: an Ubuntu 24.04 CUDA image)
# BUILD_FROM                  pypi (default): PyTriton's pinned release from PyPI;
#                             dist: the PyTriton wheel in dist/ (exactly one dist/*.whl)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

fail() {
  echo "build_and_push.sh: $*" >&2
  exit 2
}

image=${DOCKER_IMAGE_NAME_WITH_TAG:-}
build_from=${BUILD_FROM:-pypi}
[ -n "$image" ] || fail "DOCKER_IMAGE_NAME_WITH_TAG is not set: name the image to build and push," \
  "e.g. registry.example.com/opt-jax:0.1"
case "$build_from" in
  pypi | dist) ;;
  *) fail "BUILD_FROM must be pypi or dist, got '$build_from'" ;;
esac
if [ "$build_from" = dist ]; then
  shopt -s nullglob
  wheels=("$root"/dist/*.whl)
  [ "${#wheels[@]}" = 1 ] || fail "BUILD_FROM=dist needs exactly one wheel in $root/dist/, found ${#wheels[@]}"
fi
command -v docker >/dev/null || fail "docker is not on PATH"

build_args=(--build-arg "BUILD_FROM=$build_from")
if [ -n "${FROM_IMAGE_NAME:-}" ]; then
  build_args+=(--build-arg "FROM_IMAGE_NAME=$FROM_IMAGE_NAME")
fi

# BuildKit builds only the Dockerfile's stage that BUILD_FROM picks; the legacy builder would build both and
# fail on a missing dist/.
set -x
DOCKER_BUILDKIT=1 docker build "${build_args[@]}" --tag "$image" "$root"
docker push "$image"
