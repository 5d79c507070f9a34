#!/usr/bin/env bash
# whet's main job, end to end on a fresh machine with Rust and Python 3 + pip:
# fetch the default model, build whet, and ask it a question through its chat template.
# (Training and `whet compare` join this script as they land.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh
cargo build --release --locked
echo '$ whet generate --chat --prompt "What is the capital of France?"' >&2
target/release/whet generate --chat --prompt "What is the capital of France?"
