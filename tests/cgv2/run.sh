#!/usr/bin/env bash
# tests/cgv2/run.sh [--build-only] [--timeout SECONDS] [--mem SIZE] [--no-bench] [--deselect NODEID]... [--keep] [-- PYTEST_ARGS...]
#
# --build-only builds the guests this host needs (cgv2vm's build.sh, idempotent) and stops.
# Runs what needs rootless Podman on pure cgroup v2 inside the cgv2vm guest (/work/shared/cgv2vm:
# User-Mode Linux, systemd, rootless Podman 5.4 as user `runner`, no network): the integration and
# security suites, `warmpod doctor`, the pause check and bench/latency.py. The unit and API suites
# need no Podman: they run on the host under the runner image's Python 3.13 (the guest's), in a
# container, in seconds. Prints every suite's summary, the guest's kernel and the time of each
# part; exits non-zero when a test or a check failed. Run as root on the host.
#
# The security suites (fork bomb and busy loops included) run on a kernel that survives them: in
# the main boots on UML 7.x (what build.sh picks on CPUs with AMX), else in a boot of their own on
# forky's 7.2 (WARMPOD_CGV2_72_DIR, default /var/tmp/cgv2vm-72), because 6.x panics when a fork
# fails at the pids limit or a process is killed mid-fork; the 6.x boot runs the integration suite.
# --deselect replaces that choice (`--deselect ''` deselects nothing); `-- ARGS` runs one pytest
# with ARGS in the main boot instead of the suites, and no second boot.
#
# The wall-time bounds on prompt answers scale with the guest's measured speed: run.sh times a
# preloading `podman run --rm` of the runner image on the host, job.sh the same in the guest, and
# their ratio (rounded up) is WARMPOD_TEST_SLOWNESS there, unless it is set. The limits never scale.
#
# What it prepares under /var/tmp/warmpod-cgv2 (WARMPOD_CGV2_DIR), all readable by uid 1000:
#   cache/wheels-<hash>/  wheels of every locked runtime and dev dependency for CPython 3.13,
#                         x86_64 manylinux (the guest's Python), keyed by the lock and the tags
#   cache/runner-<tag>.tar  the runner image, `podman save`d (docker-archive) from the host's
#                         rootful storage after `warmpod image build`
#   share/                the guest's /mnt/host: repo/ (a snapshot of the working tree: src, pool,
#                         tests, bench, deploy, pyproject.toml, uv.lock), wheels/ (the dependencies
#                         plus the warmpod wheel built from the snapshot), runner.tar, image.ref,
#                         host-speed.json, and out/ (results: job.log, junit-*.xml, doctor.txt,
#                         latency.json, speed.json, kernel.txt, ...)
#   py313/                the host's unit and API junit files
# One snapshot feeds everything: the host builds the image from the snapshot's pool/ and the wheel
# from the snapshot's sources, so the image tag the guest computes is the one that was loaded even
# while the working tree keeps changing.
#
# Env: WARMPOD_CGV2_DIR; WARMPOD_CGV2_CACHE (default $WARMPOD_CGV2_DIR/cache: two runs may share it);
# CGV2VM (the cgv2vm checkout; default ../shared/cgv2vm beside the checkout, else
# /work/shared/cgv2vm); WARMPOD_TEST_CPU_TIME, WARMPOD_TEST_REFILL_WAIT and WARMPOD_TEST_SLOWNESS
# (the security suite's host-speed-dependent figures, tests/support/hostile.py; by default job.sh
# sets the CPU time and measures the slowness). CGV2VM_DIR and CGV2VM_UML_SUITE pass through to
# cgv2vm for the main boot, e.g. CGV2VM_DIR=/var/tmp/cgv2vm-72 CGV2VM_UML_SUITE=forky runs it on 7.2.
set -euo pipefail
umask 022
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
W=${WARMPOD_CGV2_DIR:-/var/tmp/warmpod-cgv2}
C=${WARMPOD_CGV2_CACHE:-$W/cache}
CGV2VM_72_DIR=${WARMPOD_CGV2_72_DIR:-/var/tmp/cgv2vm-72}
MAIN_DIR=${CGV2VM_DIR:-/var/tmp/cgv2vm}
TIMEOUT=3600 MEM=4G BENCH=1 KEEP=() DESELECT=() DESELECT_SET=0 BUILD_ONLY=0
PYTEST_ARGS=()
usage() { sed -n '2,2p' "$0" | sed 's/^# //' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) TIMEOUT=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --no-bench) BENCH=0; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --keep) KEEP=(--keep); shift ;;
        --deselect) DESELECT_SET=1; [ -n "$2" ] && DESELECT+=("$2"); shift 2 ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        -h|--help) usage ;;
        *) echo "run.sh: unknown argument $1" >&2; usage ;;
    esac
done
log() { printf '[warmpod-cgv2 %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 125; }
now() { date +%s%3N; }
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }
[ "$(id -u)" = 0 ] || die "run as root (cgv2vm's build.sh and the host's rootful Podman need it)"
# cgv2vm beside the checkout (../shared/cgv2vm), else where these machines keep it: a CI clone
# may be anywhere.
if [ -z "${CGV2VM:-}" ]; then
    for candidate in "$ROOT/../shared/cgv2vm" /work/shared/cgv2vm; do
        if [ -x "$candidate/run.sh" ] && [ -x "$candidate/build.sh" ]; then CGV2VM=$(cd "$candidate" && pwd); break; fi
    done
fi
[ -n "${CGV2VM:-}" ] && [ -x "$CGV2VM/run.sh" ] && [ -x "$CGV2VM/build.sh" ] ||
    die "cgv2vm not found (looked in ${CGV2VM:-$ROOT/../shared/cgv2vm and /work/shared/cgv2vm}): set CGV2VM to its checkout"
case "$W" in *[,[:space:]]*) die "$W must not contain commas or white space (hostfs)" ;; esac
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || die "no $PY: run deploy/setup.sh first"
# As deploy/setup.sh finds it: on PATH, else the module it may have pip-installed.
if command -v uv >/dev/null; then UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then UV=(python3 -m uv)
else die "uv not found: run deploy/setup.sh first"; fi
for arg in "${PYTEST_ARGS[@]}" "${DESELECT[@]}"; do [[ "$arg" != *$'\n'* && "$arg" != *$'\x1f'* ]] || die "bad pytest argument"; done

T0=$(now)
declare -A TIMES
mark() { TIMES[$1]=$(secs $(( $(now) - $2 ))); }

# --- 1. the guest -------------------------------------------------------------------------------
t=$(now)
log "cgv2vm build.sh (idempotent)"
"$CGV2VM/build.sh"
KERNEL=$(ls "$MAIN_DIR/uml/usr/lib/uml/modules")
# A fork that fails after copying its memory map panics 6.x (see job.sh): at the pids limit (the
# fork bomb), and when a forking process is killed. On 6.12 the security suites' guest panicked
# so in most boots (both of one CI run, the first of the next), at the end of the security suite
# (its server stopping 16 containers) as well as in the busy loops; 7.2 survives both. So on a
# 6.x host the security suites, fork bomb included, run in a boot of their own on forky's 7.2,
# and the 6.x boot runs the integration suite.
BOOT72=0
MAIN_SUITES="integration security security-time"  # split between the two boots below when there are two cores
SUITES_72="security security-time"
if [ "${KERNEL%%.*}" -lt 7 ] && [ ${#PYTEST_ARGS[@]} = 0 ] && [ "$DESELECT_SET" = 0 ]; then
    BOOT72=1
    MAIN_SUITES="integration"
    log "UML $KERNEL panics at a failed fork: the security suites get a boot on forky's 7.2 in $CGV2VM_72_DIR"
    (export CGV2VM_DIR=$CGV2VM_72_DIR CGV2VM_UML_SUITE=forky; "$CGV2VM/build.sh")
fi
mark guest_build "$t"
if [ "$BUILD_ONLY" = 1 ]; then log "guests built in ${TIMES[guest_build]}s (UML $KERNEL)"; exit 0; fi

# --- 2. a snapshot of the working tree ----------------------------------------------------------
t=$(now)
S=$W/share
mkdir -p "$W" "$C"
chmod 755 "$W" "$C"
rm -rf "$S.new"
mkdir -p "$S.new/repo"
# tar of the listed paths: what is tracked or not, as it is on disk now (git ignores are honoured
# for caches only).
(cd "$ROOT" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude=.pytest_cache \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=bench/results \
    src pool tests bench deploy docs pyproject.toml uv.lock README.md CONTRIBUTING.md Containerfile $(ls SECURITY.md LICENSE* 2>/dev/null)) |
    tar -xf - -C "$S.new/repo"
{
    echo "commit $(git -C "$ROOT" rev-parse HEAD)"
    git -C "$ROOT" status --short
} > "$S.new/repo-state.txt"
git -C "$ROOT" diff HEAD > "$S.new/repo-diff.patch" || true
REPO=$S.new/repo
mark snapshot "$t"
log "snapshot of $ROOT ($(head -1 "$S.new/repo-state.txt"), $(($(wc -l < "$S.new/repo-state.txt") - 1)) paths changed or untracked)"

# --- 3. wheels for the guest's CPython 3.13 -----------------------------------------------------
t=$(now)
PLATFORMS=()
for minor in $(seq 39 -1 5); do                 # as warmpod.image._platform_tags: pip matches tags literally
    PLATFORMS+=("--platform=manylinux_2_${minor}_x86_64")
    case $minor in 17) PLATFORMS+=(--platform=manylinux2014_x86_64) ;;
                   12) PLATFORMS+=(--platform=manylinux2010_x86_64) ;;
                   5) PLATFORMS+=(--platform=manylinux1_x86_64) ;; esac
done
PLATFORMS+=(--platform=any)
# Not the blocking group: its forbiddenfruit has no wheel; the unit and API suites run unguarded here.
(cd "$REPO" && "${UV[@]}" export --quiet --frozen --all-groups --no-group blocking --all-extras --no-hashes --no-emit-project \
    --output-file "$S.new/requirements.txt")
key=$( { grep -v '^#' "$S.new/requirements.txt"; printf '%s\n' "${PLATFORMS[@]}"; } | sha256sum | cut -c1-12)
DEPS=$C/wheels-$key
if [ ! -d "$DEPS" ]; then
    log "downloading dependency wheels for CPython 3.13 x86_64 into $DEPS"
    rm -rf "$DEPS.tmp"
    # pip.conf's file:// extra indexes make pip warn once per package: not worth showing
    "$PY" -m pip download --quiet --disable-pip-version-check --no-input --progress-bar=off \
        --only-binary=:all: --no-deps --python-version 3.13 --implementation cp --abi cp313 \
        "${PLATFORMS[@]}" --requirement "$S.new/requirements.txt" --dest "$DEPS.tmp" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    mv "$DEPS.tmp" "$DEPS"
else
    log "dependency wheels cached in $DEPS"
fi
mkdir -p "$S.new/wheels"
ln "$DEPS"/*.whl "$S.new/wheels/"
(cd "$REPO" && "${UV[@]}" build --quiet --wheel --out-dir "$S.new/wheels" 2>&1 | grep -v '^Building\|^Successfully' >&2 || true)
ls "$S.new"/wheels/warmpod-*.whl >/dev/null 2>&1 || die "uv build --wheel made no warmpod wheel"
rm -f "$S.new/wheels/.gitignore"
mark wheels "$t"

# --- 4. the runner image, from the snapshot's pool/ ---------------------------------------------
t=$(now)
# The snapshot's own code and pool/ (PYTHONPATH wins over the editable install of the checkout).
warmpod() { PYTHONPATH="$REPO/src" "$ROOT/.venv/bin/warmpod" "$@"; }
warmpod image build
REF=$(warmpod image ref)
echo "$REF" > "$S.new/image.ref"
ID=$(podman image inspect --format '{{.Id}}' "$REF")
TAR=$C/runner-${REF##*:}-${ID:0:12}.tar
if [ ! -f "$TAR" ]; then
    log "podman save $REF -> $TAR"
    rm -f "$C"/runner-*.tar "$TAR.tmp"                   # one image at a time: they are 200 MB each
    podman save --quiet --format docker-archive --output "$TAR.tmp" "$REF"
    mv "$TAR.tmp" "$TAR"
else
    log "runner image $REF already saved in $TAR"
fi
ln "$TAR" "$S.new/runner.tar"
mark image "$t"

# --- 4a. the server image, from the snapshot, for the guest's Quadlet check ----------------------
# The top-level Containerfile over the wheels above (the guest's own set, which holds warmpod's
# runtime dependencies and pip): what deploy/build-server-image.sh makes, without a second download.
t=$(now)
CTX=$W/server-context
rm -rf "$CTX"
mkdir -p "$CTX/dist"
cp "$REPO/Containerfile" "$CTX/"
ln "$S.new"/wheels/*.whl "$CTX/dist/"
# DIST_DIGEST keys Buildah's layer cache to the wheels, as in deploy/build-server-image.sh.
digest=$(cd "$CTX/dist" && sha256sum -- *.whl | sha256sum | cut -d' ' -f1)
podman build --quiet --network=none --build-arg "DIST_DIGEST=$digest" -t localhost/warmpod-server:cgv2 \
    -f "$CTX/Containerfile" "$CTX" >/dev/null
podman save --quiet --format docker-archive --output "$S.new/server.tar" localhost/warmpod-server:cgv2
rm -rf "$CTX"
mark server_image "$t"

# --- 4b. the reference for the guest's speed ----------------------------------------------------
t=$(now)
PYTHONPATH="$REPO/src" "$PY" "$HERE/guest_checks.py" speed "$S.new/host-speed.json"
mark speed "$t"

# --- 5. the share, swapped in whole -------------------------------------------------------------
rm -rf "$S"
mv "$S.new" "$S"
chmod -R a+rX "$S"
ENVS_TEST=()
for name in WARMPOD_TEST_CPU_TIME WARMPOD_TEST_REFILL_WAIT WARMPOD_TEST_SLOWNESS; do
    if [ -n "${!name:-}" ]; then ENVS_TEST+=(--env "$name=${!name}"); fi
done
ENVS=(--env "WARMPOD_CGV2_BENCH=$BENCH" --env "WARMPOD_CGV2_DEPLOY_CHECKS=${WARMPOD_CGV2_DEPLOY_CHECKS:-0}" "${ENVS_TEST[@]}")
if [ ${#PYTEST_ARGS[@]} -gt 0 ]; then
    ENVS+=(--env "WARMPOD_CGV2_PYTEST_ARGS=$(IFS=$'\x1f'; echo "${PYTEST_ARGS[*]}")")
fi
if [ "$DESELECT_SET" = 1 ]; then
    ENVS+=(--env "WARMPOD_CGV2_DESELECT=$(IFS=$'\x1f'; echo "${DESELECT[*]}")")
fi
PREP=$(secs $(( $(now) - T0 )))
log "prepared in ${PREP}s (guest build ${TIMES[guest_build]}s, snapshot ${TIMES[snapshot]}s, wheels ${TIMES[wheels]}s, image ${TIMES[image]}s, server image ${TIMES[server_image]}s, speed ${TIMES[speed]}s)"

# --- 5b. unit and API suites on Python 3.13, on the host ----------------------------------------
HOST_RC=0
if [ ${#PYTEST_ARGS[@]} = 0 ]; then
    t=$(now)
    log "unit and API suites under the runner image's Python, in a container on the host"
    rm -rf "$W/py313"
    set +e
    PYTHONPATH="$REPO/src" "$PY" "$HERE/guest_checks.py" host-suites "$S" "$W/py313"
    HOST_RC=$?
    set -e
    mark py313 "$t"
fi
log "booting the guest (UML $KERNEL)"

# --- 6. the guests -------------------------------------------------------------------------------
# boot72 SHARE: the 7.2 boot (the security suites) in SHARE, alone or after the 6.x boot that
# used it; its out/ is kept as out.72 and its junit files join SHARE/out and so the summary.
boot72() {
    local share=$1 rc=0
    if [ -d "$share/out" ]; then mv "$share/out" "$share/out.main"; fi
    CGV2VM_DIR=$CGV2VM_72_DIR CGV2VM_UML_SUITE=forky \
        "$CGV2VM/run.sh" "$share" "$HERE/job.sh" --mem "$MEM" --timeout 2700 -q \
        --env WARMPOD_CGV2_BENCH=0 --env WARMPOD_CGV2_CHECKS=0 --env "WARMPOD_CGV2_SUITES=$SUITES_72" \
        "${ENVS_TEST[@]}" "${KEEP[@]}" || rc=$?
    rm -rf "$share/out.72"
    mv "$share/out" "$share/out.72"
    if [ -d "$share/out.main" ]; then mv "$share/out.main" "$share/out"; else mkdir "$share/out"; fi
    cp "$share/out.72"/junit-*.xml "$share/out/" 2>/dev/null || true
    return "$rc"
}
# A kernel panic is UML's bug, not a test's verdict (see job.sh: a fork that fails after copying
# its memory map, e.g. one killed mid-fork, can panic 6.12): a 6.x guest boots again, up to
# WARMPOD_CGV2_BOOTS times, each time with a fresh out/ (the panicked one is kept as out.panic-N).
BOOTS=${WARMPOD_CGV2_BOOTS:-2}
# A UML guest is one process on one CPU: on two cores the security suites run in a second guest
# booted beside the main one (its own copy of the share, hard links; its out/ joins the summary):
# the 7.2 boot on a 6.x host, else one on the main kernel.
SPLIT=0
if [ ${#PYTEST_ARGS[@]} = 0 ] && [ "$(nproc)" -ge 2 ] && [ "${WARMPOD_CGV2_SPLIT:-1}" = 1 ]; then
    SPLIT=1
    SB=$W/share-security
    rm -rf "$SB"
    cp -al "$S" "$SB"
    rm -rf "$SB/out" "$W/security-boot.rc" "$W/boot72.rc"
    (
        set +e
        t_sec=$(now) rc=0
        if [ "$BOOT72" = 1 ]; then
            boot72 "$SB" || rc=$?
            echo "$rc" > "$W/boot72.rc"
            echo $(( $(now) - t_sec )) > "$W/boot72.ms"
            exit 0
        fi
        for boot in $(seq "$BOOTS"); do
            "$CGV2VM/run.sh" "$SB" "$HERE/job.sh" --mem "$MEM" --timeout "$TIMEOUT" "${ENVS[@]}" "${KEEP[@]}" -q \
                --env "WARMPOD_CGV2_SUITES=${MAIN_SUITES#integration }" --env WARMPOD_CGV2_CHECKS=0 \
                --env WARMPOD_CGV2_BENCH=0
            rc=$?
            if [ "$rc" = 0 ] || ! grep -q 'Kernel panic' "$SB/out/console.log" 2>/dev/null; then break; fi
            log "the security guest's kernel panicked (boot $boot; a UML bug, not warmpod): booting it again"
            rm -rf "$SB/out.panic-$boot"
            mv "$SB/out" "$SB/out.panic-$boot"
        done
        echo "$rc" > "$W/security-boot.rc"
        echo $(( $(now) - t_sec )) > "$W/security-boot.ms"
    ) &
    SEC_PID=$!
    ENVS+=(--env "WARMPOD_CGV2_SUITES=integration")
else
    ENVS+=(--env "WARMPOD_CGV2_SUITES=$MAIN_SUITES")
fi
t=$(now)
for boot in $(seq "$BOOTS"); do
    set +e
    "$CGV2VM/run.sh" "$S" "$HERE/job.sh" --mem "$MEM" --timeout "$TIMEOUT" "${ENVS[@]}" "${KEEP[@]}" -q
    RC=$?
    set -e
    if [ "$RC" = 0 ] || [ "$boot" = "$BOOTS" ] || ! grep -q 'Kernel panic' "$S/out/console.log" 2>/dev/null; then
        break
    fi
    log "the guest kernel panicked (boot $boot of $BOOTS; a UML bug, not warmpod): booting it again"
    rm -rf "$S/out.panic-$boot"
    mv "$S/out" "$S/out.panic-$boot"
done
mark guest "$t"
RCSEC=0
RC72=0
SB72=$S
if [ "$SPLIT" = 1 ]; then
    wait "$SEC_PID" || true
    if [ "$BOOT72" = 1 ]; then
        SB72=$SB
        RC72=$(cat "$W/boot72.rc" 2>/dev/null || echo 125)
        TIMES[guest72]=$(secs "$(cat "$W/boot72.ms" 2>/dev/null || echo 0)")
    else
        RCSEC=$(cat "$W/security-boot.rc" 2>/dev/null || echo 125)
        TIMES[guest_security]=$(secs "$(cat "$W/security-boot.ms" 2>/dev/null || echo 0)")
    fi
elif [ "$BOOT72" = 1 ]; then
    t=$(now)
    boot72 "$S" || RC72=$?
    mark guest72 "$t"
fi

# --- 7. what came back --------------------------------------------------------------------------
OUT=$S/out
echo
echo "==== the guest ===="
echo "main boot: UML $(cat "$OUT/kernel.txt" 2>/dev/null || echo "$KERNEL (no kernel.txt)"), exit $RC"
# A job that exits non-zero though each of its steps passed (seen once: exit 1, every step 0) was
# ended by systemd or the guest, not by job.sh: the guest journal's last word on it says which.
if [ "$RC" != 0 ] && [ -f "$OUT/guest-journal.log" ]; then
    echo "guest journal, the job's unit and the kernel's kills:"
    grep -E 'cgv2vm-job|oom|Killed process|Failed with result' "$OUT/guest-journal.log" | tail -n 15 | sed 's/^/    /'
    echo "job.log's last lines:"
    tail -n 5 "$OUT/job.log" 2>/dev/null | sed 's/^/    /'
fi
cat "$OUT/speed.txt" 2>/dev/null || echo "(no speed.txt)"
if [ "$BOOT72" = 1 ]; then
    echo "7.2 boot ($SUITES_72): UML $(cat "$SB72/out.72/kernel.txt" 2>/dev/null || echo '? (no kernel.txt)'), exit $RC72"
    cat "$SB72/out.72/speed.txt" 2>/dev/null || echo "(no speed.txt in $SB72/out.72)"
elif [ "$SPLIT" = 1 ]; then
    echo "security boot beside it: UML $(cat "$SB/out/kernel.txt" 2>/dev/null || echo '? (no kernel.txt)'), exit $RCSEC"
    cat "$SB/out/speed.txt" 2>/dev/null || echo "(no speed.txt in $SB/out)"
fi
echo
echo "==== warmpod doctor (in the guest) ===="
cat "$OUT/doctor.txt" 2>/dev/null || echo "(no doctor.txt)"
for check in doctor-check pause latency-summary; do
    [ -f "$OUT/$check.txt" ] && { echo; cat "$OUT/$check.txt"; }
done
echo
echo "==== guest job steps ===="
cat "$OUT/steps.txt" 2>/dev/null || echo "(no steps.txt)"
if [ "$BOOT72" = 1 ]; then
    echo "-- 7.2 boot ($SB72/out.72)"
    cat "$SB72/out.72/steps.txt" 2>/dev/null || echo "(no steps.txt)"
elif [ "$SPLIT" = 1 ]; then
    echo "-- security boot ($SB/out)"
    cat "$SB/out/steps.txt" 2>/dev/null || echo "(no steps.txt)"
fi
if [ -f "$OUT/latency.txt" ]; then
    echo
    echo "==== bench/latency.py (in the guest) ===="
    cat "$OUT/latency.txt"
fi
echo
echo "==== pytest (in the guest; logs $OUT/pytest-*.txt) ===="
for panicked in "$S"/out.panic-* "${SB:-/nonexistent}"/out.panic-*; do
    [ -d "$panicked" ] || continue
    echo "AN EARLIER BOOT'S KERNEL PANICKED ($panicked); last test started:"
    grep -h -E '^tests/.*::' "$panicked"/pytest-*.txt 2>/dev/null | tail -1 | sed 's/^/    /'
done
if grep -q 'Kernel panic' "$OUT/console.log" 2>/dev/null; then
    echo "THE GUEST KERNEL PANICKED (a UML bug, not warmpod); last test started:"
    grep -h -E '^tests/.*::' "$OUT"/pytest-*.txt 2>/dev/null | tail -1 | sed 's/^/    /'
    sed -n '/Kernel panic/,/fork_handler/p' "$OUT/console.log" | head -30 | sed 's/^/    /'
fi
if [ -s "$OUT/deselected.txt" ]; then sed 's/^/DESELECTED in the guest: /' "$OUT/deselected.txt"; fi
TESTS_OK=1
JUNIT=()
for name in unit-py3.13 api-py3.13; do
    [ -f "$W/py313/junit-$name.xml" ] && JUNIT+=("$W/py313/junit-$name.xml")
done
for name in integration security security-time custom; do
    [ -f "$OUT/junit-$name.xml" ] && JUNIT+=("$OUT/junit-$name.xml")
    [ "$SPLIT" = 1 ] && [ -f "$SB/out/junit-$name.xml" ] && JUNIT+=("$SB/out/junit-$name.xml")
done
if [ ${#JUNIT[@]} -gt 0 ]; then
    "$PY" - "${JUNIT[@]}" <<'EOF' || TESTS_OK=0
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def cases(path):
    """(test id, failure or error element or None, skipped) for each test case of a junit file."""
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        yield f"{case.get('classname')}::{case.get('name')}", bad, case.find("skipped") is not None


grand = {"passed": 0, "failed": 0, "flaky": 0, "skipped": 0}
for path in map(Path, sys.argv[1:]):
    rerun = path.with_name(path.stem + "-rerun.xml")
    again = {test for test, bad, skipped in cases(rerun) if bad is None and not skipped} if rerun.exists() else set()
    count = {"passed": 0, "failed": 0, "flaky": 0, "skipped": 0}
    lines = []
    for test, bad, skipped in cases(path):
        if skipped:
            count["skipped"] += 1
        elif bad is None:
            count["passed"] += 1
        else:
            message = " ".join((bad.get("message") or "").split())[:400]
            kind = "flaky" if test in again else "failed"
            count[kind] += 1
            label = "FLAKY (failed, then passed on its rerun)" if kind == "flaky" else bad.tag.upper()
            lines.append(f"    {label} {test}: {message}")
    name = path.stem.removeprefix("junit-")
    print(f"{name:14} {count['passed']:4} passed {count['failed']:4} failed {count['flaky']:2} flaky "
          f"{count['skipped']:3} skipped")
    for line in lines:
        print(line)
    for key in grand:
        grand[key] += count[key]
print(f"{grand['passed']} passed, {grand['failed']} failed, {grand['flaky']} flaky, {grand['skipped']} skipped")
sys.exit(1 if grand["failed"] else 0)
EOF
else
    echo "(no junit-*.xml: pytest did not run; see $OUT/job.log)"
    TESTS_OK=0
fi
echo
[ "$HOST_RC" = 0 ] || { echo "unit/API suites on Python 3.13 (host) exited $HOST_RC"; TESTS_OK=0; }
log "total $(secs $(( $(now) - T0 )))s: prepare ${PREP}s, unit+API on 3.13 ${TIMES[py313]:-0}s, main boot (UML $KERNEL) ${TIMES[guest]}s, security boot beside it ${TIMES[guest_security]:-0}s, 7.2 boot ${TIMES[guest72]:-0}s; guest job exit codes $RC, $RCSEC, $RC72"
if [ "$RC" = 0 ]; then RC=$RCSEC; fi
if [ "$RC" = 0 ]; then RC=$RC72; fi
if [ "$RC" != 0 ] || [ "$TESTS_OK" != 1 ]; then exit $(( RC != 0 ? RC : 1 )); fi
