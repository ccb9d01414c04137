#!/usr/bin/env bash
# What `make install` needs outside Python: Java 17 (TorchServe's frontend), Fashion-MNIST, wrk (the load
# generator `make bench` and the router benchmark use for REST), and PostgreSQL's server binaries (the store
# several router replicas share: `make cluster` and the tests start a server of their own with them; any major
# version's /usr/lib/postgresql/*/bin/initdb, or an initdb on the PATH, will do), kubectl (its kustomize
# renders the Kubernetes manifests, offline), and Chromium at /usr/bin/chromium (the suite drives it headless
# through the router's dashboard with Playwright: tests/test_dashboard.py).
# As root it installs what is missing with apt; otherwise it stops and names the exact command to run.
set -euo pipefail

DATA_DIR=/usr/share/datasets/fashion-mnist
missing=()

java_major() {
    command -v java >/dev/null 2>&1 || { echo 0; return; }
    java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -n1
}

if [[ "$(java_major)" -lt 17 ]]; then
    missing+=(openjdk-17-jre-headless)
fi
if [[ ! -f "$DATA_DIR/train-images-idx3-ubyte.gz" ]]; then
    missing+=(dataset-fashion-mnist)
fi

if ! command -v wrk >/dev/null 2>&1; then
    missing+=(wrk)
fi

postgres_initdb() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1
}
if ! command -v kubectl >/dev/null 2>&1; then
    missing+=(kubectl)  # its built-in kustomize renders deploy/k8s/ offline (tests/test_deploy.py, make manifests)
fi
if ! postgres_initdb; then
    missing+=(postgresql)
fi
if [[ ! -x /usr/bin/chromium ]]; then
    missing+=(chromium)
fi

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "system: Java $(java_major), Fashion-MNIST ($DATA_DIR), wrk, kubectl, PostgreSQL and Chromium present"
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "system: installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
    exit 0
fi

echo "system: missing ${missing[*]}. Run:" >&2
echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
echo "(without apt: install a Java 17 runtime, wrk, kubectl, a PostgreSQL server and Chromium at /usr/bin/chromium, and" \
     "pass --data-dir DIR with the Fashion-MNIST IDX files)" >&2
exit 1
