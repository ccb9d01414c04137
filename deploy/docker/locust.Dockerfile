# syntax=docker/dockerfile:1
# Locust with the kit's load tests (loadtest/locustfile.py). NOT BUILT in this repository's CI (no Docker
# daemon there): the manifests that use it are rendered and schema-validated, the image itself has not been
# built or run.
#
# Build from the repository root:
#   docker build -f deploy/docker/locust.Dockerfile -t torchserve-kit/locust:0.1.0-torch2.14.1 .
# The kit installed with its pinned dependencies (pyproject.toml): the load test decodes Fashion-MNIST's test
# images with torch (training/data.py), checks answers against their labels, and reads the router's file with
# router.config; TorchServe's wheel gives the gRPC protos for GrpcUser.
FROM python:3.11.7-slim-bookworm

# Fashion-MNIST's IDX files, where training/data.py looks first (/usr/share/datasets/fashion-mnist).
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md fashion_cnn.py /src/
COPY training/ /src/training/
COPY serving/ /src/serving/
COPY router/ /src/router/
COPY loadtest/ /src/loadtest/
# pyproject.toml pins torch==2.14.1, torchvision==0.29.1, torchserve==0.12.0, torch-model-archiver==0.12.0.
RUN pip install --no-cache-dir /src \
    && python -m serving.protos

RUN groupadd --gid 10001 locust && useradd --uid 10001 --gid 10001 --create-home locust
# The locustfile runs from /app; the packages it imports are installed. No pyproject.toml here: its
# [tool.locust] says headless, and the master serves the web UI unless a run passes --headless.
WORKDIR /app
COPY loadtest/ /app/loadtest/
RUN rm -rf /src && chown -R 10001:10001 /app
USER 10001:10001
EXPOSE 5557 8089
ENV PYTHONDONTWRITEBYTECODE=1
CMD ["locust", "-f", "loadtest/locustfile.py", "--help"]
