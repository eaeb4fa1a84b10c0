#!/usr/bin/env bash
# deploy/setup.sh [--test]
# Prepares a fresh Debian/Ubuntu machine for warmpod: Podman and the tools that build the runner
# image without a registry, uv, and the project's virtual environment at .venv/. With --test, also
# what the test suites need beyond that: Chromium and its chromedriver (the playground's tests).
# Idempotent: it installs only what is missing. Run as root, or as a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(podman crun runc conmon uidmap slirp4netns fuse-overlayfs catatonit debootstrap mmdebstrap)
case "${1:-}" in
    --test) packages+=(chromium chromium-driver make podman-compose postgresql) ;;
    "") ;;
    *) echo "usage: deploy/setup.sh [--test]" >&2; exit 2 ;;
esac
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "setup: installing ${missing[*]}" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rootful Podman gives each pool container a uid range of its own (WARMPOD_ENGINE__USERNS=auto)
# from the `containers` entries; the usual 2^31 ids above every user range leave room for 32768 sandboxes.
for file in /etc/subuid /etc/subgid; do
    if ! grep -q '^containers:' "$file" 2>/dev/null; then
        sudo=""
        [[ $(id -u) -eq 0 ]] || sudo="sudo"
        echo "setup: adding a containers range to $file" >&2
        echo "containers:2147483647:2147483648" | $sudo tee -a "$file" >/dev/null
    fi
done

# crun costs a container far less CPU than runc, but refuses a cgroup v1 hybrid host whose v2
# hierarchy still holds a controller (hugetlb, typically): bind each such controller to a v1
# hierarchy of its own, as the others are. Until the next boot; warmpod uses runc where it is not.
unified=/sys/fs/cgroup/unified
if [[ -f $unified/cgroup.controllers && ! -f /sys/fs/cgroup/cgroup.controllers && $(id -u) -eq 0 ]]; then
    for controller in $(cat "$unified/cgroup.controllers"); do
        echo "setup: binding the cgroup controller $controller to a v1 hierarchy (for crun)" >&2
        mkdir -p "/sys/fs/cgroup/$controller" 2>/dev/null \
            && mount -t cgroup -o "$controller" cgroup "/sys/fs/cgroup/$controller" \
            || echo "setup: could not; warmpod will use runc" >&2
    done
fi

if command -v uv >/dev/null 2>&1; then
    uv=(uv)
else
    python3 -m uv --version >/dev/null 2>&1 || {
        echo "setup: installing uv" >&2
        python3 -m pip install -q uv || python3 -m pip install -q --user uv
    }
    uv=(python3 -m uv)
fi
# The server extra: `warmpod serve` and its commands (the client alone needs none of it).
"${uv[@]}" sync --frozen --extra server --quiet
echo "setup: ready (.venv/bin/warmpod)" >&2
