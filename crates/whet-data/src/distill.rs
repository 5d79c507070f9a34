//! The data side of `whet distill`: unlabelled inputs in, a teacher's answers voted on and
//! filtered, a chat dataset out. No model code: the CLI asks the teacher.

use crate::format::{DataErrors, LineError};
use crate::template::Message;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One unlabelled input: the conversation the teacher continues (and the student learns to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Stable across runs: the record's own `id`, else a hash of its messages.
    pub id: String,
    /// Where it was read (`FILE:LINE`), for messages.
    pub at: String,
    /// The conversation so far, ending with a user turn; any answer in the record is left out.
    pub messages: Vec<Message>,
}

/// Fields a JSONL input may carry its text in, in the order they are looked for.
pub const TEXT_FIELDS: [&str; 5] = ["text", "input", "prompt", "question", "instruction"];

/// Read unlabelled inputs: JSONL records with `messages` (answers after the last user turn are
/// dropped) or a text field ([`TEXT_FIELDS`]); any other file is one input per non-empty line.
pub fn read_inputs(path: &Path) -> Result<Vec<Input>, DataErrors> {
    let mut errors = DataErrors::default();
    let err = |line, msg, hint| LineError::new(path, line, msg, hint);
    let text = match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                errors.push(err(0, format!("invalid UTF-8: {}", e.utf8_error()), None));
                return Err(errors);
            }
        },
        Err(e) => {
            errors.push(err(0, format!("cannot read: {e}"), None));
            return Err(errors);
        }
    };
    let jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "json");
    let mut inputs = vec![];
    for (i, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{line_no}", path.display());
        if !jsonl {
            let messages = vec![Message::new("user", line.trim())];
            inputs.push(Input { id: hash_id(&messages), at, messages });
            continue;
        }
        let record: serde_json::Map<String, Value> = match serde_json::from_str(line) {
            Ok(Value::Object(o)) => o,
            Ok(_) => {
                errors.push(err(line_no, "expected a JSON object".into(), None));
                continue;
            }
            Err(e) => {
                errors.push(err(line_no, format!("invalid JSON: {e}"), None));
                continue;
            }
        };
        match messages_of(&record) {
            Ok(messages) => {
                let id = match record.get("id") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => hash_id(&messages),
                };
                inputs.push(Input { id, at, messages });
            }
            Err((msg, hint)) => errors.push(err(line_no, msg, hint)),
        }
    }
    if inputs.is_empty() && errors.is_empty() {
        errors.push(err(0, "no inputs".into(), Some("write one input per line")));
    }
    if errors.is_empty() {
        Ok(inputs)
    } else {
        Err(errors)
    }
}

fn messages_of(
    record: &serde_json::Map<String, Value>,
) -> Result<Vec<Message>, (String, Option<&'static str>)> {
    if let Some(list) = record.get("messages") {
        let Value::Array(items) = list else {
            return Err(("field `messages` must be a list".into(), None));
        };
        let mut messages = vec![];
        for (i, m) in items.iter().enumerate() {
            let (Some(role), Some(content)) =
                (m.get("role").and_then(Value::as_str), m.get("content").and_then(Value::as_str))
            else {
                return Err((format!("`messages[{i}]` needs a string `role` and `content`"), None));
            };
            messages.push(Message::new(role, content));
        }
        // The answer, if the record has one, is the teacher's to give.
        while messages.last().is_some_and(|m| m.role == "assistant") {
            messages.pop();
        }
        if messages.last().is_none_or(|m| m.role != "user") {
            return Err((
                "`messages` has no user turn to answer".into(),
                Some("end each conversation with the user's message"),
            ));
        }
        return Ok(messages);
    }
    for field in TEXT_FIELDS {
        match record.get(field) {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                return Ok(vec![Message::new("user", s.trim())]);
            }
            Some(Value::String(_)) => return Err((format!("field `{field}` is empty"), None)),
            Some(v) => return Err((format!("field `{field}` must be a string, got {v}"), None)),
            None => {}
        }
    }
    Err((format!("no input text: expected `messages` or one of {}", TEXT_FIELDS.join(", ")), None))
}

/// An id from the conversation itself, so that a record keeps its answers across runs however
/// the file is reordered.
fn hash_id(messages: &[Message]) -> String {
    let json = serde_json::to_string(messages).unwrap_or_default();
    crate::cache::sha256_hex(json.as_bytes())[..16].to_string()
}

/// The teacher's answer to one input after the vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// The answer most samples gave (the first to reach that count, on a tie).
    pub answer: String,
    /// Its share of the samples, 0..=1.
    pub agreement: f64,
}

/// The majority of `answers` as `key` groups them (a label's canonical name, or the trimmed
/// text); answers `key` maps to `None` count against the majority but cannot win it. `None`
/// when no answer has a key.
pub fn majority(answers: &[String], key: impl Fn(&str) -> Option<String>) -> Option<Vote> {
    let mut counts: Vec<(String, usize)> = vec![];
    for a in answers {
        let Some(k) = key(a) else { continue };
        match counts.iter_mut().find(|(c, _)| *c == k) {
            Some((_, n)) => *n += 1,
            None => counts.push((k, 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max()?;
    let (answer, n) = counts.into_iter().find(|(_, n)| *n == best)?;
    Some(Vote { answer, agreement: n as f64 / answers.len().max(1) as f64 })
}

/// `answer` as one of `labels`, or `None`: the answer is the label (case, surrounding spaces,
/// quotes and a final full stop ignored), or the label is the only one of `labels` it holds
/// as a word ("A positive review." is `positive`; "positive, not negative" is neither).
pub fn as_label(answer: &str, labels: &[String]) -> Option<String> {
    let a = answer.trim().trim_end_matches('.').trim_matches(|c| c == '"' || c == '\'').trim();
    if let Some(l) = labels.iter().find(|l| l.eq_ignore_ascii_case(a)) {
        return Some(l.clone());
    }
    let lower = a.to_lowercase();
    let words: Vec<&str> =
        lower.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-')).collect();
    let mut found = labels.iter().filter(|l| {
        let l = l.to_lowercase();
        // A label of several words is looked for as a phrase.
        if l.contains(char::is_whitespace) {
            lower.contains(&l)
        } else {
            words.contains(&l.as_str())
        }
    });
    match (found.next(), found.next()) {
        (Some(l), None) => Some(l.clone()),
        _ => None,
    }
}

/// Why an input left the dataset; each is counted in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dropped {
    /// The same input (same id) appeared before.
    DuplicateInput,
    /// Every answer was empty.
    Empty,
    /// The answer ran into the token limit.
    Truncated,
    /// No answer was one of `--labels`.
    NotALabel,
    /// Every answer broke a rule of `--rules`.
    BreaksRules,
    /// No answer was JSON that `--json-schema` accepts.
    BreaksSchema,
    /// The majority held less than `--min-agreement` of the samples.
    LowAgreement,
}

impl Dropped {
    /// The name in the summary and in `distill.json`.
    pub fn name(self) -> &'static str {
        match self {
            Dropped::DuplicateInput => "duplicate_input",
            Dropped::Empty => "empty",
            Dropped::Truncated => "truncated",
            Dropped::NotALabel => "not_a_label",
            Dropped::BreaksRules => "breaks_rules",
            Dropped::BreaksSchema => "breaks_schema",
            Dropped::LowAgreement => "low_agreement",
        }
    }
}

/// Train, validation and test shares that sum to 1, from `--split 0.8,0.1,0.1`.
pub fn parse_split(spec: &str) -> Result<[f64; 3], String> {
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let bad = || format!("--split `{spec}`: expected three shares that sum to 1, like 0.8,0.1,0.1");
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut out = [0.0; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p.parse::<f64>().map_err(|_| bad())?;
        if !(0.0..=1.0).contains(o) {
            return Err(bad());
        }
    }
    if (out.iter().sum::<f64>() - 1.0).abs() > 1e-6 || out[0] == 0.0 {
        return Err(bad());
    }
    Ok(out)
}

/// Which split (0 train, 1 valid, 2 test) each of `ids` goes to: a seeded shuffle cut at the
/// shares, so the split depends on the ids and the seed only.
pub fn assign_splits(ids: &[String], shares: [f64; 3], seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    let key = |i: usize| crate::cache::sha256_hex(format!("{seed}:{}", ids[i]).as_bytes());
    order.sort_by_cached_key(|&i| key(i));
    let n = ids.len() as f64;
    let (train, valid) = ((shares[0] * n).round() as usize, (shares[1] * n).round() as usize);
    let mut split = vec![0; ids.len()];
    for (rank, &i) in order.iter().enumerate() {
        split[i] = if rank < train {
            0
        } else if rank < train + valid {
            1
        } else {
            2
        };
    }
    split
}

/// The file a split is written to.
pub fn split_file(dir: &Path, split: usize) -> PathBuf {
    dir.join(["train.jsonl", "valid.jsonl", "test.jsonl"][split])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_majority_wins_and_its_share_is_the_agreement() {
        let labels = s(&["positive", "negative"]);
        let answers = s(&["Positive.", "negative", "positive", "banana", "POSITIVE"]);
        let v = majority(&answers, |a| as_label(a, &labels)).unwrap();
        assert_eq!(v, Vote { answer: "positive".into(), agreement: 0.6 });
        // A tie goes to the first answer to reach the count.
        let v = majority(&s(&["b", "a", "a", "b"]), |a| Some(a.to_string())).unwrap();
        assert_eq!((v.answer.as_str(), v.agreement), ("b", 0.5));
        assert_eq!(majority(&s(&["x", "y"]), |a| as_label(a, &labels)), None);
        assert_eq!(as_label("A positive review.", &labels).as_deref(), Some("positive"));
        assert_eq!(as_label("positive, not negative", &labels), None);
        assert_eq!(as_label("postive", &labels), None);
        assert_eq!(as_label("nonpositive", &labels), None);
    }

    #[test]
    fn splits_follow_the_shares_and_not_the_order() {
        let ids: Vec<String> = (0..100).map(|i| format!("id{i}")).collect();
        let a = assign_splits(&ids, [0.8, 0.1, 0.1], 7);
        assert_eq!([0, 1, 2].map(|k| a.iter().filter(|&&x| x == k).count()), [80, 10, 10]);
        let mut rev = ids.clone();
        rev.reverse();
        let b = assign_splits(&rev, [0.8, 0.1, 0.1], 7);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(a[i], b[rev.iter().position(|r| r == id).unwrap()]);
        }
        assert!(parse_split("0.8,0.1,0.2").unwrap_err().contains("sum to 1"));
        assert!(parse_split("0.8,0.2").is_err());
        assert_eq!(parse_split("0.9, 0.1, 0").unwrap(), [0.9, 0.1, 0.0]);
    }

    #[test]
    fn inputs_come_from_messages_text_fields_or_lines_and_answers_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(
            &p,
            concat!(
                "{\"id\": 7, \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"old answer\"}]}\n",
                "{\"text\": \"  a review \"}\n",
                "\n",
                "{\"question\": \"why?\", \"answer\": \"ignored\"}\n",
            ),
        )
        .unwrap();
        let got = read_inputs(&p).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].id.as_str(), got[0].messages.len()), ("7", 1));
        assert_eq!(got[1].messages[0].content, "a review");
        assert_eq!(got[2].at, format!("{}:4", p.display()));
        std::fs::write(
            &p,
            "{\"label\": \"x\"}\n{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}\n",
        )
        .unwrap();
        let e = read_inputs(&p).unwrap_err();
        assert_eq!(e.errors[0].line, 1);
        assert!(e.errors[0].msg.contains("no input text: expected `messages` or one of text"));
        assert!(e.errors[1].msg.contains("no user turn"));
        let t = dir.path().join("in.txt");
        std::fs::write(&t, "first\n\nsecond\n").unwrap();
        let got = read_inputs(&t).unwrap();
        assert_eq!(got.len(), 2);
        assert_ne!(got[0].id, got[1].id);
    }
}
