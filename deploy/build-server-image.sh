#!/usr/bin/env bash
# Builds localhost/warmpod-server from this checkout without a registry: the warmpod wheel and
# its dependencies' wheels go to dist/, then `podman build` installs them offline.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist && mkdir dist
uv build --wheel --out-dir dist --quiet
uv export --frozen --no-default-groups --extra server --no-hashes --no-emit-project -o dist/requirements.txt --quiet
.venv/bin/python -m pip download --quiet --dest dist --only-binary=:all: \
    --python-version 3.13 --implementation cp --abi cp313 \
    --platform "manylinux_2_28_$(uname -m)" --platform "manylinux2014_$(uname -m)" \
    -r dist/requirements.txt pip
# The digest keys the layer cache to the wheels: unchanged wheels rebuild in seconds, changed ones
# never reuse a layer installed from older ones (see the Containerfile).
digest=$(cd dist && sha256sum -- *.whl | sha256sum | cut -d' ' -f1)
old=$(podman image inspect --format '{{.Id}}' localhost/warmpod-server 2>/dev/null || true)
podman build --network=none --build-arg "DIST_DIGEST=$digest" -t localhost/warmpod-server -f Containerfile .
# The image it replaced, unless another tag or a container still uses it (podman rmi refuses then).
new=$(podman image inspect --format '{{.Id}}' localhost/warmpod-server)
if [[ -n $old && $old != "$new" ]]; then
    podman rmi "$old" >/dev/null 2>&1 || true
fi
