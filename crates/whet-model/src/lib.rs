//! whet-model: the one Llama implementation whet trains and runs, and everything needed to load
//! it — GGUF files, Hugging Face directories, hub ids, random presets — with its tokenizer.
//!
//! Layout: [`config`] (file config -> validated runtime config), [`layers`] (each layer's
//! struct, load, forward and backward), [`models`] (the wiring of blocks), [`lora`] and
//! [`adapter`] (LoRA wrappers; PEFT adapter files), [`io`] (model files in and out), [`ops`]
//! (differentiable ops with one backend dispatch each, CPU kernels, the composed reference).
#![warn(missing_docs)]

pub mod adapter;
pub mod config;
pub mod device;
pub mod error;
pub mod io;
pub mod layers;
pub mod lora;
pub mod loss;
pub mod models;
pub mod ops;

pub use config::{Arch, Config, ConfigFile};
pub use device::{device_name, parse_device, parse_dtype, DeviceSpec, Quantization, WeightDType};
pub use error::{Error, Result};
pub use io::tokenizer::ModelTokenizer;
pub use io::{
    load, load_quantized, load_tokenizer, LoadedModel, ModelSource, DEFAULT_MODEL, FETCH_HINT,
};
pub use layers::{GradCollector, TrainPass};
pub use models::llama::{Cache, Llama, Packing, Row};
