//! whet-train: LoRA training of the one Llama — the loop, AdamW, learning-rate schedules,
//! gradient accumulation and clipping, validation and early stopping, atomic checkpoints with
//! true resume, and adapters in PEFT's format.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod optim;
pub mod plot;
mod shards;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{train, Event, Summary, TrainData, TrainError};
