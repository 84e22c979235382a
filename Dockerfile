# The OPT JAX server behind Triton, one image for every node:
#
#   docker build -t opt-jax .                                  (or kubernetes/build_and_push.sh)
#   docker run --gpus all --shm-size 8g -p 8000-8002:8000-8002 opt-jax python server.py --model-name facebook/opt-1.3b
#
# FROM_IMAGE_NAME: any Ubuntu 24.04 image works. The default is NVIDIA's CUDA "base" image, built FROM ubuntu:24.04
# (glibc 2.39; PyTriton's wheels need glibc >= 2.35), whose apt python3 is 3.12.3 (jax 0.7.1 and flax 0.12.0 need
# Python >= 3.11; the example's nvcr.io/nvidia/tensorflow:24.10-tf2-py3 has Ubuntu 22.04 and Python 3.10, too old).
# "base" rather than "runtime" or "cudnn-runtime" because jax[cuda12] brings CUDA, cuDNN, NCCL and ptxas as pip
# wheels and loads those first, and PyTriton bundles its own libcudart: a cuDNN in the image would be a second,
# unused copy of about 1 GB. What the image adds is the driver hook-up (NVIDIA_VISIBLE_DEVICES and
# NVIDIA_DRIVER_CAPABILITIES for the NVIDIA container runtime) and cuda-compat for older datacenter drivers.
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/cuda:12.8.1-base-ubuntu24.04
# BUILD_FROM=pypi installs PyTriton's pinned release; BUILD_FROM=dist the wheel in dist/ (a PyTriton build of your own).
ARG BUILD_FROM=pypi

FROM ${FROM_IMAGE_NAME} AS base

# XLA takes GPU memory as it needs it instead of 75 % up front; NCCL launches collectives of all local devices in
# parallel, as the example sets it for one process driving several GPUs.
ENV XLA_PYTHON_CLIENT_PREALLOCATE=false \
    NCCL_LAUNCH_MODE=PARALLEL

# python3-venv: Ubuntu's python3 is "externally managed" (PEP 668), so pip refuses to install into it; the packages
# go into a venv at /opt/venv, first on PATH, which install.sh --system then takes as the current interpreter.
# libpython3.12t64: Triton's Python backend stub for Python 3.12 links libpython3.12.so.1.0, which python3 alone
# does not install. Versions are not pinned (hadolint DL3008): Ubuntu drops a package's previous version from the
# archive at each security update, so a pinned version stops building; the Python packages are what we pin.
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libpython3.12t64 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# pip keeps no cache of the wheels it installs (a few GB of CUDA libraries otherwise left in the image).
ENV PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/app
COPY install.sh requirements.txt requirements-test.txt constraints.txt ./

FROM base AS pytriton-from-pypi
RUN ./install.sh --cuda --system

FROM base AS pytriton-from-dist
COPY dist/ dist/
RUN PYTRITON_WHEEL="$(find dist -name '*.whl')" ./install.sh --cuda --system

# BuildKit builds only the stage named here, so a pypi build needs no dist/ folder. (DL3006 asks for an image tag:
# this is a stage of this file, not an image.)
# hadolint ignore=DL3006
FROM pytriton-from-${BUILD_FROM}

# The server runs as opt, uid and gid 1000, not as root. Ubuntu 24.04 images come with a user `ubuntu` of uid 1000,
# removed first. What the server writes by default lies in opt's home: --cache-dir ~/.cache/opt-jax (hub downloads,
# compiled programs) and PyTriton's workspaces in ~/.cache/pytriton; both folders exist in the image, owned by opt, so a
# new Docker volume mounted on one of them starts out owned by opt too. The application stays root's, read-only to the
# server. HOME is set here rather than left to the runtime, which finds it in /etc/passwd only for a uid listed there.
RUN if user="$(getent passwd 1000)"; then userdel --remove "${user%%:*}"; fi \
    && if group="$(getent group 1000)"; then groupdel "${group%%:*}"; fi \
    && groupadd --gid 1000 opt \
    && useradd --uid 1000 --gid 1000 --no-log-init --create-home --home-dir /home/opt --shell /bin/bash opt \
    && install -d -o 1000 -g 1000 -m 0755 /home/opt/.cache /home/opt/.cache/opt-jax /home/opt/.cache/pytriton
ENV HOME=/home/opt

COPY server.py client.py opt_utils.py modeling_flax_opt.py protocol.py plan.py engine.py channel.py group.py \
     triton_models.py metrics.py reaper.py sharding.py weights.py slots.py runner.py program_cache.py \
     cancellation.py stub_model.py openai_api.py /opt/app/
COPY benchmarks/ /opt/app/benchmarks/
COPY kubernetes/ /opt/app/kubernetes/
# Triton's HTTP, gRPC and metrics ports, the generation metrics and the OpenAI-compatible API; rank 0 also
# serves the JAX coordinator at the port of --head-url.
EXPOSE 8000 8001 8002 8003 9000
# Numeric, so that Kubernetes' runAsNonRoot can tell that it is not root without reading the image's /etc/passwd.
USER 1000:1000
CMD ["python", "server.py", "--help"]
