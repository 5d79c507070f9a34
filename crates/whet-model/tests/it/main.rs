//! whet-model integration tests: golden comparisons with PyTorch and bad-input handling.

mod adapters;
mod bad_input;
mod families;
mod golden;
mod lora;
mod sources;
mod vocab;

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model, or `None` (with a note on stderr) when it has not been fetched.
/// `WHET_REQUIRE_MODEL=1` (set by `scripts/test.sh`) turns its absence into a failure.
pub fn default_model() -> Option<PathBuf> {
    let path = root().join(whet_model::DEFAULT_MODEL);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("WHET_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "{} is missing and WHET_REQUIRE_MODEL=1; run scripts/fetch-model.sh",
            path.display()
        );
    }
    eprintln!("SKIPPED: {} not fetched; run scripts/fetch-model.sh", path.display());
    None
}

/// A golden fixture written by `scripts/reference.py`.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = root().join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// `n` greedy tokens after `ids` `[1, T]`, decoded one at a time through the KV cache.
pub fn greedy(model: &whet_model::Llama, ids: &candle_core::Tensor, n: usize) -> Vec<u32> {
    use candle_core::{Device, Tensor};
    let mut cache = whet_model::Cache::new(model.config());
    let mut next = model.forward_last(ids, Some(&mut cache)).unwrap();
    let mut out = vec![];
    for _ in 0..n {
        let id = next.squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(id);
        next = model
            .forward_last(&Tensor::new(&[[id]], &Device::Cpu).unwrap(), Some(&mut cache))
            .unwrap();
    }
    out
}
