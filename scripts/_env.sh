# Sourced by scripts/demo.sh and scripts/test.sh: a project virtualenv with the given extras.
# Works on a fresh Debian/Ubuntu with Python 3.10+; installs python3-venv with apt when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {  # apt_install PKG...: install the Debian packages that are missing
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]} with apt-get" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

setup_venv() {  # setup_venv EXTRAS: a virtualenv (.venv, or $FEDTRANSPORT_VENV) with the project installed
  local py="${PYTHON:-python3}" venv="${FEDTRANSPORT_VENV:-.venv}"
  "$py" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ needed"'
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; apt_install python3-venv; "$py" -m venv "$venv"; }
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$1]"
  export PATH="$(cd "$venv" && pwd)/bin:$PATH"
}
