//! The model wiring. There is one implementation, [`llama`]: a family (SmolLM, Qwen2, ...) is a
//! [`crate::Config`] difference plus the layers that differ, not a second model.

pub mod llama;
