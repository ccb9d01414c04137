# syntax=docker/dockerfile:1
# TorchServe with the kit's model store. NOT BUILT in this repository's CI (no Docker daemon there): the
# manifests that use it are rendered and schema-validated, the image itself has not been built or run.
#
# Build from the repository root, after `make archive` (the .mar files) and `python -m serving.manifests`
# (the config, also mounted from a ConfigMap by deploy/k8s/base; the copy here lets the image run on its own):
#   docker build -f deploy/docker/torchserve.Dockerfile -t torchserve-kit/torchserve:0.12.0-torch2.14.1 .
# Versions pinned as in pyproject.toml (tests/test_deploy.py checks that they agree).
FROM python:3.11.7-slim-bookworm

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCHSERVE_VERSION=0.12.0
ARG MODEL_ARCHIVER_VERSION=0.12.0
# the handler's sessions for cards of format "onnx" (fashion_cnn.OnnxModel)
ARG ONNXRUNTIME_VERSION=1.31.1

# TorchServe's frontend is Java 17.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

# What the workers import: torch, TorchServe (ts), pyyaml (ts/utils/util.py imports it, pip does not pull it),
# captum (TorchServe's vision handlers), numpy and pillow (handlers/image_decoding.py).
RUN pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        "torchserve==${TORCHSERVE_VERSION}" "torch-model-archiver==${MODEL_ARCHIVER_VERSION}" \
        "pyyaml>=6.0" "captum>=0.7" "numpy>=1.26" "pillow>=10.0" "onnxruntime==${ONNXRUNTIME_VERSION}"

# A fixed non-root user; the manifests run it as 10001 with a read-only root file system.
RUN groupadd --gid 10001 model-server \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/model-server model-server
WORKDIR /home/model-server
# serving.manifests renders model_store=/home/model-server/model-store and allowed_urls for exactly that path.
COPY --chown=10001:10001 model_store/*.mar /home/model-server/model-store/
COPY --chown=10001:10001 deploy/k8s/base/generated/config.properties /home/model-server/config/config.properties
USER 10001:10001
EXPOSE 8080 8081 8082 7070
ENV TEMP=/tmp TMPDIR=/tmp LOG_LOCATION=/home/model-server/logs METRICS_LOCATION=/home/model-server/logs \
    OMP_NUM_THREADS=1
CMD ["torchserve", "--start", "--foreground", "--ts-config", "/home/model-server/config/config.properties"]
