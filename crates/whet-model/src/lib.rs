//! whet-model: the one Llama implementation whet trains and runs, and everything needed to load
//! it — GGUF files, Hugging Face directories, hub ids, random presets — with its tokenizer.
#![warn(missing_docs)]

pub mod adapter;
mod attention_cpu;
pub mod config;
mod cpu_matmul;
pub mod device;
pub mod error;
pub mod export;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod lora;
pub mod loss;
pub mod ops;
pub mod tokenizer;

pub use config::{Arch, Config, ConfigFile};
pub use device::{device_name, parse_device, parse_dtype, parse_quantization};
pub use error::{Error, Result};
pub use llama::{Cache, Llama};
pub use load::{load, load_tokenizer, LoadedModel, ModelSource, DEFAULT_MODEL, FETCH_HINT};
pub use tokenizer::ModelTokenizer;
