#!/usr/bin/env bash
# The cluster profile's system packages (Debian): PostgreSQL's server and Redis, installed when missing.
# Neither is started as a system service here: `make cluster` runs its own instances under supervisord.
set -euo pipefail
missing=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" > /dev/null || missing+=(postgresql)
command -v redis-server > /dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "the cluster profile needs ${missing[*]}: install with  sudo apt-get install -y ${missing[*]}" >&2; exit 1
fi
echo "==> installing ${missing[*]} (apt)"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: the packages' own system services are not started (the profile runs its own instances).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq "${missing[@]}" > /dev/null
