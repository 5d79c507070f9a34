//! whet-train: LoRA training of the one Llama — the loop, AdamW, learning-rate schedules,
//! gradient accumulation and clipping, validation and early stopping, atomic checkpoints with
//! true resume, and adapters in PEFT's format.
//!
//! Modules depend one way: [`trainer`] (the loop) uses `objective` (what the loss is),
//! [`checkpoint`], `shards`, [`dist`] (ranks of an MPI job), [`optim`] and [`config`]; all of
//! them report through [`error`] and [`events`], which depend on nothing else here.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod error;
pub mod events;
mod objective;
pub mod optim;
pub mod plot;
mod shards;
pub mod trainer;

pub use config::{ObjectiveKind, TrainConfig};
pub use dist::World;
pub use error::TrainError;
pub use events::{Event, Stopped, Summary};
pub use objective::pair_logps;
pub use trainer::{train, TrainData};
