//! whet-data: everything between text files and token ids with loss masks — dataset formats,
//! chat templates, masking, length handling, packing and the prepared-dataset cache. Depends on
//! no model code.
#![warn(missing_docs)]

pub mod cache;
pub mod dataset;
pub mod distill;
pub mod format;
pub mod pack;
pub mod template;
pub mod tokenize;

pub use format::{DataErrors, Example, Format, FormatChoice, LineError, Record, Role, Turn};
pub use template::{ChatTemplate, Message, TemplateError, CHATML};
pub use tokenize::{Encoded, Overlong, Renderer, Tokenized, TrainOn};
