//! whet-eval: `whet eval` and `whet compare` — a model (with or without an adapter, a system
//! prompt, few-shot examples) run over held-out examples by the batched engine, each output
//! scored against its reference with the metric that fits the task, every mean with a seeded
//! bootstrap interval; and the comparison of fine-tuning against prompting on the same data.
#![warn(missing_docs)]

pub mod compare;
pub mod metrics;
pub mod pairs;
pub mod report;
pub mod rules;
pub mod run;
pub mod schema;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use whet_infer::Message;

/// Errors of evaluation; each names the file (and line or field) it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Data, rules or settings that cannot be used.
    #[error("{0}")]
    Input(String),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] whet_model::Error),
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] whet_infer::Error),
    /// A tensor operation failed.
    #[error("evaluation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Writing a report failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// One held-out example: the conversation up to the answer, the reference answer, and its
/// paraphrase group (field `"group"`), if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Messages before the answer (system and user turns, earlier assistant turns).
    pub messages: Vec<Message>,
    /// The reference answer (the last assistant message).
    pub reference: String,
    /// Examples with the same group ask the same thing in other words.
    pub group: Option<String>,
    /// `FILE:LINE`, for messages.
    pub at: String,
}

/// Read chat-format examples that end in the assistant's answer. A line without a reference
/// (no final assistant message, or another format) is an error naming the line.
pub fn read_examples(path: &Path) -> Result<Vec<Example>, Error> {
    let (_, records) = whet_data::format::read_jsonl(path, None)
        .map_err(|e| Error::Input(e.to_string().lines().next().unwrap_or("").to_string()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = vec![];
    for r in records {
        let at = format!("{}:{}", path.display(), r.line);
        let whet_data::Example::Chat(turns) = r.example else {
            return Err(Error::Input(format!(
                "{at}: whet eval reads chat examples (`messages` ending in the assistant's answer); this one has no reference answer"
            )));
        };
        let Some((last, before)) = turns.split_last() else {
            return Err(Error::Input(format!("{at}: no messages")));
        };
        if last.role != whet_data::Role::Assistant || before.is_empty() {
            return Err(Error::Input(format!(
                "{at}: the last message must be the assistant's reference answer, after the question"
            )));
        }
        let group = lines
            .get(r.line.saturating_sub(1))
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| match &v["group"] {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            });
        out.push(Example {
            messages: before.iter().map(|t| Message::new(t.role.as_str(), &t.content)).collect(),
            reference: last.content.clone(),
            group,
            at,
        });
    }
    if out.is_empty() {
        return Err(Error::Input(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

/// The metrics whet knows, by the names `--metric` takes.
pub const METRICS: [&str; 7] =
    ["accuracy", "exact_match", "chrf", "rouge_l", "json_valid", "json_fields", "rules"];

/// What kind of task a test set is, which decides its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Short answers from a small label set.
    Labels,
    /// JSON answers.
    Json,
    /// Free text.
    Text,
}

impl Task {
    /// Guess from the references: every one JSON -> `Json`; every one a short single line,
    /// with labels that repeat -> `Labels`; else `Text`.
    pub fn detect(references: &[String]) -> Self {
        let objects = references
            .iter()
            .all(|r| matches!(metrics::parse_json(r), Some(v) if v.is_object() || v.is_array()));
        if objects {
            return Task::Json;
        }
        let short = references
            .iter()
            .all(|r| !r.trim().contains('\n') && r.split_whitespace().count() <= 4);
        let labels: BTreeSet<String> = references.iter().map(|r| metrics::normalize(r)).collect();
        if short && labels.len() <= (references.len() / 2).max(2) {
            Task::Labels
        } else {
            Task::Text
        }
    }

    /// Its metrics, the first the one comparisons rank by.
    pub fn metrics(self, has_rules: bool) -> Vec<&'static str> {
        match self {
            Task::Labels => vec!["accuracy", "exact_match"],
            Task::Json => vec!["json_fields", "json_valid"],
            Task::Text if has_rules => vec!["rules", "chrf", "rouge_l"],
            Task::Text => vec!["chrf", "rouge_l"],
        }
    }
}

/// The per-example score of `metric` (see [`METRICS`]); `rules` is 1 when every rule holds.
pub fn score(metric: &str, output: &str, reference: &str, rules: Option<&rules::Rules>) -> f64 {
    match metric {
        "accuracy" => metrics::label_match(output, reference),
        "exact_match" => metrics::exact_match(output, reference),
        "chrf" => metrics::chrf(output, reference),
        "rouge_l" => metrics::rouge_l(output, reference),
        "json_valid" => metrics::json_valid(output),
        "json_fields" => metrics::json_field_match(output, reference),
        "rules" => {
            f64::from(u8::from(rules.is_some_and(|r| r.rules.iter().all(|x| x.check(output)))))
        }
        _ => f64::NAN,
    }
}

/// Whether two answers agree, for consistency: equal labels or JSON for those tasks, chrF / 100
/// for free text.
pub fn agreement(task: Task, a: &str, b: &str) -> f64 {
    match task {
        Task::Labels => metrics::label_match(a, b),
        Task::Json => f64::from(u8::from(
            metrics::parse_json(a).is_some() && metrics::parse_json(a) == metrics::parse_json(b),
        )),
        Task::Text => metrics::chrf(a, b) / 100.0,
    }
}

/// Check `--metric` names, or choose the task's.
pub fn choose_metrics(
    given: &[String],
    task: Task,
    rules: Option<&rules::Rules>,
) -> Result<Vec<String>, Error> {
    if given.is_empty() {
        return Ok(task.metrics(rules.is_some()).into_iter().map(String::from).collect());
    }
    for m in given {
        if !METRICS.contains(&m.as_str()) {
            return Err(Error::Input(format!("--metric `{m}`: not one of {}", METRICS.join(", "))));
        }
        if m == "rules" && rules.is_none() {
            return Err(Error::Input("--metric rules needs a rules.toml beside the data".into()));
        }
    }
    Ok(given.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_follows_the_references() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            Task::detect(&s(&["refund", "cancel", "refund", "other", "cancel", "other"])),
            Task::Labels
        );
        assert_eq!(
            Task::detect(&s(&["a b", "c d", "e f", "g h"])),
            Task::Text,
            "short but never repeated"
        );
        assert_eq!(Task::detect(&s(&["{\"a\": 1}", "{\"a\": 2}"])), Task::Json);
        assert_eq!(
            Task::detect(&s(&["Hi there!\n- one", "Hello, a longer answer here"])),
            Task::Text
        );
        assert_eq!(Task::Text.metrics(true)[0], "rules");
    }

    #[test]
    fn examples_need_a_reference() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("test.jsonl");
        std::fs::write(&p, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"a\"}], \"group\": 3}\n").unwrap();
        let e = read_examples(&p).unwrap();
        assert_eq!((e[0].reference.as_str(), e[0].group.as_deref()), ("a", Some("3")));
        std::fs::write(&p, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n")
            .unwrap();
        let err = read_examples(&p).unwrap_err().to_string();
        assert!(err.contains("test.jsonl:1") && err.contains("no assistant turn"), "{err}");
    }
}
