#!/usr/bin/env bash
# Download the published Open Cities 3rd-place checkpoints listed in models/urls.txt into models/,
# then verify that each one loads (architecture inferred from its keys) before keeping it.
# Usage: models/get_models.sh [name.pth ...]      (default: all; existing verified files are skipped)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
py="$repo/.venv/bin/python"; [ -x "$py" ] || py=python3
wanted=" $* "
fail=0
while read -r name id _; do
  case "$name" in ""|\#*) continue ;; esac
  [ $# -gt 0 ] && [[ "$wanted" != *" $name "* ]] && continue
  dest="$here/$name"
  if [ -s "$dest" ]; then echo "= $name already present"; continue; fi
  echo "+ downloading $name"
  tmp="$dest.part"
  if ! curl -fL --retry 3 -o "$tmp" "https://drive.usercontent.google.com/download?id=${id}&export=download&confirm=t"; then
    echo "error: $name: download failed (no network access to drive.google.com?)" >&2; rm -f "$tmp"; fail=1; continue
  fi
  if ! (cd "$repo" && "$py" -c "import sys; from model import load_model; load_model(sys.argv[1])" "$tmp" >/dev/null); then
    echo "error: $name: downloaded file is not a loadable checkpoint (Google Drive may have returned a web page)" >&2
    rm -f "$tmp"; fail=1; continue
  fi
  mv "$tmp" "$dest"; echo "ok $name ($(du -h "$dest" | cut -f1))"
done < "$here/urls.txt"
exit $fail
