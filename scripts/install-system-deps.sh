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
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
