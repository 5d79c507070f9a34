//! whet-data: chat templates and (later) dataset preparation — everything between text files and
//! token ids with loss masks. Depends on no model code.
#![warn(missing_docs)]

pub mod template;

pub use template::{ChatTemplate, Message, TemplateError, CHATML};
