#!/usr/bin/env bash
# Install everything the tests need (Debian packages only when missing, then the Python
# package with its test extra) and run the whole suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v turnutils_uclient >/dev/null 2>&1 || need+=(coturn)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v fail2ban-regex >/dev/null 2>&1 || need+=(fail2ban)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  # Installing a server package (coturn, prometheus) must not start it: the tests start
  # their own processes. policy-rc.d says so to the package scripts, when nobody set one.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
  if [ "$own_policy" = 1 ]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# The compiled data path must have been built (gcc and the Python headers): the suite runs
# once against it and once against its pure-Python twin.
python3 -c "import turnserver._datapath" || {
  echo "turnserver._datapath was not built: install gcc and the Python headers" >&2; exit 1; }
python3 -m pytest -q -p no:cacheprovider "$@"
echo "--- again with the pure-Python data path (TURND_PURE_PYTHON=1)"
TURND_PURE_PYTHON=1 exec python3 -m pytest -q -p no:cacheprovider "$@"
