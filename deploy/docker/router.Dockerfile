# syntax=docker/dockerfile:1
# The A/B router. NOT BUILT in this repository's CI (no Docker daemon there): the manifests that use it are
# rendered and schema-validated, the image itself has not been built or run.
#
# Build from the repository root:
#   docker build -f deploy/docker/router.Dockerfile -t torchserve-kit/router:0.1.0 .
# No torch and no Java: the router needs the kit's router and serving packages, their dependencies (pinned
# as in pyproject.toml), and TorchServe's wheel only for the gRPC protos inside its jar (serving/protos.py
# generates the stubs from them, here at build time, so the running container writes nothing there).
FROM python:3.11.7-slim-bookworm

ARG TORCHSERVE_VERSION=0.12.0

RUN pip install --no-cache-dir \
        "torchserve==${TORCHSERVE_VERSION}" \
        "pyyaml>=6.0" "requests>=2.31" "grpcio>=1.60" "grpcio-tools>=1.60,<1.81" \
        "grpcio-health-checking>=1.60,<1.81" "numpy>=1.26" "aiohttp>=3.9" \
        "prometheus-client>=0.20" "uvloop>=0.19" "psutil>=6.0" "psycopg[binary]>=3.2"

RUN groupadd --gid 10001 router && useradd --uid 10001 --gid 10001 --create-home router
WORKDIR /app
# router imports serving (the TorchServe client, the project's names); serving/__init__.py is empty.
COPY router/ /app/router/
COPY serving/ /app/serving/
# the model's signature in Open Inference Protocol terms (router.open_inference), the file every .mar carries
COPY handlers/signature.json /app/handlers/signature.json
RUN rm -rf /app/serving/_grpc && python -m serving.protos && chown -R 10001:10001 /app
USER 10001:10001
EXPOSE 8090 7090
ENV PYTHONDONTWRITEBYTECODE=1
CMD ["python", "-m", "router", "--config", "/etc/router/experiments.yaml", "serve"]
