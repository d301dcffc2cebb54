#!/usr/bin/env bash
# Install the Debian packages speechllm needs outside Python (the offline TTS engines of
# `speechllm synth`, sox, the headless browser + its WebDriver that the end-to-end test of
# `speechllm serve` drives, and two packages of real recorded speech the demo evaluates on:
# pocketsphinx-testdata's LibriVox clips and alsa-utils' spoken channel names):
#   - every package's command already on PATH (or its file in place): nothing to do (re-runs are instant);
#   - otherwise apt-get update + install of the missing ones, as root or through sudo;
#   - no apt-get, or neither root nor sudo: a message naming the packages, and exit status 1.
set -euo pipefail

# package -> the command it provides, or (an absolute path) a file it installs
declare -A PROVIDES=([espeak-ng]=espeak-ng [flite]=flite [sox]=sox [chromium]=chromium [chromium-driver]=chromedriver
                     [pocketsphinx-testdata]=/usr/share/pocketsphinx/test/data/librivox/transcription
                     [alsa-utils]=/usr/share/sounds/alsa/Front_Center.wav)

missing=()
for package in espeak-ng flite sox chromium chromium-driver pocketsphinx-testdata alsa-utils; do
    what=${PROVIDES[$package]}
    if [[ $what == /* ]]; then
        [[ -e $what ]] || missing+=("$package")
    else
        command -v "$what" >/dev/null 2>&1 || missing+=("$package")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
    as_root() { "$@"; }
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root() { sudo -n "$@"; }
else
    as_root=unavailable
fi
if ! command -v apt-get >/dev/null 2>&1 || [[ ${as_root:-} == unavailable ]]; then
    echo "speechllm needs the Debian/Ubuntu packages: ${missing[*]}" >&2
    echo "install them as root, e.g.: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    echo "(this script installs them itself only as root or with password-less sudo, where apt-get exists)" >&2
    exit 1
fi

echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
as_root apt-get update -q
as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
