#!/usr/bin/env bash
# Prometheus server and promtool, from Debian's packages: tests/test_deployment.py checks the
# scrape config and alert rules with promtool and scrapes the real service with the server.
# Quiet and idempotent: nothing is fetched when both are already on PATH.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
# Another apt run (a developer's, another installer's) holds dpkg's lock for a while: wait for
# it instead of failing.
sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo="sudo"
fi
# env inside sudo, which would otherwise drop the variables that keep apt from asking questions.
apt_get() { $sudo env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get update -qq
# The package's postinst starts a daemon where an init system runs; in CI there is none, and
# the tests start their own server on a free loopback port either way.
apt_get install -y -qq --no-install-recommends prometheus >/dev/null
prometheus --version 2>&1 | head -n 1
