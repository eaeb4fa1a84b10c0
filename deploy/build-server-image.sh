#!/usr/bin/env bash
# Builds localhost/warmpod-server from this checkout without a registry: the warmpod wheel and
# its dependencies' wheels go to dist/, then `podman build` installs them offline.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist && mkdir dist
uv build --wheel --out-dir dist --quiet
uv export --frozen --no-dev --no-hashes --no-emit-project -o dist/requirements.txt --quiet
.venv/bin/python -m pip download --quiet --dest dist --only-binary=:all: \
    --python-version 3.13 --implementation cp --abi cp313 \
    --platform "manylinux_2_28_$(uname -m)" --platform "manylinux2014_$(uname -m)" \
    -r dist/requirements.txt pip
podman build --network=none -t localhost/warmpod-server -f Containerfile .
