# finetune-operator images: one Dockerfile, two targets.
#
#   operator  the kopf operator: API models + operator package, `pip install '.[operator]'`, no torch
#   trainer   the trainer: API models + trainer package, the `trainer` extra's dependencies, CUDA torch
#
# Build (BuildKit, the default builder since Docker 23, or `docker buildx build`; it builds only the
# stages the chosen target needs, so the operator build never touches the trainer stages):
#
#   docker build --target operator -t ghcr.io/finetune-operator/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/finetune-operator/trainer:0.1.0 .
#
# The Helm chart expects exactly these two images, tagged with the project version (0.1.0, the
# chart's appVersion):
#   ghcr.io/finetune-operator/operator:0.1.0
#   ghcr.io/finetune-operator/trainer:0.1.0
# Pass --build-arg VERSION=... --build-arg REVISION=$(git rev-parse HEAD) to fill the OCI labels.
#
# Built here without Docker or a registry (hack/images.sh, `make images`): buildah, with the
# bases and torch's source swapped through the build arguments below for a local Debian base made
# with debootstrap, Debian's python3.11, and PyPI's torch from a local wheelhouse (the script
# downloads it once and writes the index of it that TORCH_INDEX_URL names):
#
#   buildah bud --layers --target trainer \
#     --build-arg OPERATOR_BASE=localhost/finetune-base:bookworm \
#     --build-arg TRAINER_BASE=localhost/finetune-base:bookworm \
#     --build-arg TRAINER_PYTHON=python3.11 \
#     --build-arg TORCH_INDEX_URL=file:///mnt/simple \
#     -v ~/.cache/finetune-operator/wheels/torch-2.13.0-python3.11:/mnt:ro .
#
# Without arguments every default below is the production build.
#
# Base images are pinned to exact version tags. They are not pinned by digest here because no
# digest was checked against the registry when this file was written; resolve them with
# `docker buildx imagetools inspect <image:tag>` and append `@sha256:...` to the OPERATOR_BASE and
# TRAINER_BASE defaults.
#
# Runtime: both images run as UID/GID 65532 (a passwd entry exists, so getpass/getpwuid work) and
# expect a read-only root filesystem. Writable paths, to mount as emptyDir volumes:
#   operator  /tmp
#   trainer   /tmp, and /cache: Hugging Face downloads (HF_HOME=/cache/huggingface, sized for the
#             base model) plus Triton and TorchInductor kernel caches. HOME is /tmp.
# The trainer image needs an NVIDIA driver that supports CUDA 13.0 (R580 or newer) on the node.

# Base images (build arguments so that a build without a registry can substitute local ones; the
# defaults are the production images).
ARG OPERATOR_BASE=docker.io/library/python:3.12.12-slim-bookworm
ARG TRAINER_BASE=docker.io/nvidia/cuda:13.0.2-runtime-ubuntu24.04
# The trainer's interpreter, by its Debian/Ubuntu package name: python3.12 on Ubuntu 24.04 (a
# local build on Debian bookworm passes python3.11).
ARG TRAINER_PYTHON=python3.12

# ---------------------------------------------------------------------------------------------
# operator
# ---------------------------------------------------------------------------------------------
FROM ${OPERATOR_BASE} AS operator-builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first, from pyproject.toml alone: this layer is reused until pyproject.toml changes
# (README.md, which the package's metadata reads, comes with the code, so a docs edit keeps it).
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies'][sys.argv[1]]))" operator > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt

# Then the code the operator runs: the API models and the operator package (no trainer code).
COPY README.md ./
COPY api/ api/
COPY operator/ operator/
RUN pip install --no-cache-dir './[operator]' \
 && pip check

FROM ${OPERATOR_BASE} AS operator

RUN groupadd --system --gid 65532 finetune \
 && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin finetune

# The operator's memory allocator: jemalloc, preloaded, and Python's own allocations handed to it
# (PYTHONMALLOC=malloc, below). Python's allocator keeps each 1 MiB arena while one object in it
# lives, so a burst of jobs left its high-water mark behind; jemalloc returns it (README,
# "The operator benchmark"). Fixed path: the library's directory depends on the architecture.
# Not pinned, as for the trainer's interpreter: the security pocket serves only its newest build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/lib/*/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2 \
 && test -e /usr/local/lib/libjemalloc.so.2

COPY --from=operator-builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LD_PRELOAD=/usr/local/lib/libjemalloc.so.2 \
    PYTHONMALLOC=malloc

# Labels last: a new REVISION then rebuilds only this metadata, not the layers above.
ARG OPERATOR_BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/finetune-operator/finetune-operator
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kubernetes operator that runs quantized LoRA fine-tuning (FineTuneJob) on GPUs that can run the chosen scheme" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${OPERATOR_BASE}"

USER 65532:65532
ENTRYPOINT ["finetune-operator"]

# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------
# The CUDA runtime image matches the CUDA 13.0 build of torch installed below (torch's wheels
# carry their own CUDA libraries; the base image adds the driver-facing setup and the rest of
# the CUDA runtime). Ubuntu 24.04 provides Python 3.12; builder and final stage share the base
# and TRAINER_PYTHON, so the venv's interpreter path (/usr/bin/python3.12) exists in both.
# Triton builds a small launcher with the system C compiler the first time it runs a kernel, and
# the fp8, mxfp4 (transformers' Triton kernels) and nvfp4 (torchao) schemes run Triton kernels:
# the final stage therefore carries gcc and libc6-dev as runtime dependencies (as PyTorch's own
# CUDA images do). No other build tool reaches it.
# Three stages: trainer-deps (the interpreter, torch and the dependencies: ~6 GB that change only
# with pyproject.toml), trainer-builder (the project's own wheel, checked against those
# dependencies) and the final image, which copies the dependencies' venv unchanged and installs
# the wheel on top: a code or docs change rebuilds a layer of a few hundred kB, not the 6 GB venv.
FROM ${TRAINER_BASE} AS trainer-deps

ARG TRAINER_PYTHON
# The interpreter's packages are not pinned: the update pockets serve only the newest build of a
# package, so a pinned version would stop installing as soon as the next fix ships.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${TRAINER_PYTHON}" "${TRAINER_PYTHON}-venv" \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN "${TRAINER_PYTHON}" -m venv /opt/venv

# torch first and on its own: the largest layer, and it changes least. The CUDA wheel index;
# later installs are constrained to this exact version so nothing swaps it for another build.
# TORCH_INDEX_URL may name a local index (file://), as hack/images.sh does with its wheelhouse.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt

WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies'][sys.argv[1]]))" trainer > /tmp/requirements.txt \
 && pip install --no-cache-dir -c /opt/torch-constraint.txt -r /tmp/requirements.txt

FROM trainer-deps AS trainer-builder

# The code the trainer runs: the API models and the trainer package (no operator code), as one
# wheel; installed here once so that `pip check` sees it with every dependency of its extra.
COPY README.md ./
COPY api/ api/
COPY trainer/ trainer/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip install --no-cache-dir --no-deps /wheels/*.whl \
 && pip check

FROM ${TRAINER_BASE} AS trainer

ARG TRAINER_PYTHON

# The interpreter, CA certificates (for the Hugging Face Hub) and the C compiler Triton needs at
# run time (see above); see the builder stage for why the Ubuntu packages are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${TRAINER_PYTHON}" ca-certificates gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 finetune \
 && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin finetune \
 && install -d -o 65532 -g 65532 -m 0750 /cache

COPY --from=trainer-deps /opt/venv /opt/venv
COPY --from=trainer-builder /wheels /opt/wheels

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor

# The project's wheel, built and checked in trainer-builder, without touching the dependencies.
RUN pip install --no-cache-dir --no-deps --no-index /opt/wheels/*.whl \
 && rm -rf /opt/wheels

# Labels last: a new REVISION then rebuilds only this metadata, not the layers above.
ARG TRAINER_BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/finetune-operator/finetune-operator
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="Quantized LoRA fine-tuning worker for finetune-operator (CUDA 13.0, PyTorch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${TRAINER_BASE}"

USER 65532:65532
ENTRYPOINT ["finetune-trainer"]
