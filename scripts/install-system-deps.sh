#!/usr/bin/env bash
# Debian packages mmguard's built-in datasets read: the emoji font, Unicode's
# emoji names, Fashion-MNIST, and an English word list (natural triggers).
# Installs only what is missing.
set -euo pipefail
packages=(fonts-noto-color-emoji unicode-data unicode-cldr-core dataset-fashion-mnist wamerican)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "mmguard needs the Debian packages: ${missing[*]} (run as root or install them)" >&2
    exit 1
  fi
fi
echo "installing Debian packages: ${missing[*]}"
# Another apt run (an unattended upgrade, a second install) may hold apt's locks;
# `apt-get update` does not wait for them, so retry for up to ten minutes while the
# error is a lock and fail at once on any other error.
retry_while_locked() {
  local attempt errors
  for attempt in $(seq 60); do
    errors=$(mktemp)
    if "$@" 2> >(tee "$errors" >&2); then rm -f "$errors"; return 0; fi
    sleep 0.2  # let tee finish writing
    if ! grep -q "Could not get lock" "$errors"; then rm -f "$errors"; return 1; fi
    rm -f "$errors"
    echo "apt is busy; retrying in 10 s ($attempt/60)" >&2
    sleep 10
  done
  return 1
}
retry_while_locked $sudo apt-get update -qq
retry_while_locked $sudo env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
