//! Dataset formats in, one [`Example`] type out. Every line is checked; problems are collected
//! as `path:line: what is wrong` rather than stopping at the first or skipping silently.

use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// The record layouts whet reads, one per line of a JSONL file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"messages": [{"role": "user", "content": "..."}, ...]}`
    Chat,
    /// `{"prompt": "...", "completion": "..."}`
    PromptCompletion,
    /// `{"text": "..."}`
    Text,
    /// `{"instruction": "...", "input": "...", "output": "..."}`
    Alpaca,
    /// `{"conversations": [{"from": "human", "value": "..."}, ...]}`
    ShareGpt,
    /// `{"prompt": ..., "chosen": ..., "rejected": ...}` (TRL's preference format; strings or
    /// message lists, an optional `system`): the data of DPO and its relatives.
    Preference,
    /// `{"prompt": ..., "completion": ..., "label": true|false}` (TRL's unpaired preference
    /// format, KTO's: one answer, desirable or not; strings or message lists, an optional
    /// `system`).
    Unpaired,
}

/// `--format`: detect each file's record layout from its first record, or say it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    /// Detected per file.
    #[default]
    Auto,
    /// [`Format::Chat`].
    Chat,
    /// [`Format::PromptCompletion`].
    Completion,
    /// [`Format::Text`].
    Text,
    /// [`Format::Alpaca`].
    Alpaca,
    /// [`Format::ShareGpt`].
    Sharegpt,
    /// [`Format::Preference`].
    Preference,
    /// [`Format::Unpaired`].
    Unpaired,
}

impl FormatChoice {
    /// The format it fixes; `None` for `auto`.
    pub fn format(self) -> Option<Format> {
        match self {
            FormatChoice::Auto => None,
            FormatChoice::Chat => Some(Format::Chat),
            FormatChoice::Completion => Some(Format::PromptCompletion),
            FormatChoice::Text => Some(Format::Text),
            FormatChoice::Alpaca => Some(Format::Alpaca),
            FormatChoice::Sharegpt => Some(Format::ShareGpt),
            FormatChoice::Preference => Some(Format::Preference),
            FormatChoice::Unpaired => Some(Format::Unpaired),
        }
    }

    /// The name flags and config files use.
    pub fn name(self) -> &'static str {
        self.format().map_or("auto", Format::name)
    }
}

impl Format {
    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Chat => "chat",
            Format::PromptCompletion => "completion",
            Format::Text => "text",
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
            Format::Preference => "preference",
            Format::Unpaired => "unpaired",
        }
    }

    /// Which layout a record has, from its keys.
    fn detect(obj: &Map<String, Value>) -> Option<Self> {
        if obj.contains_key("messages") {
            Some(Format::Chat)
        } else if obj.contains_key("conversations") {
            Some(Format::ShareGpt)
        } else if obj.contains_key("chosen") || obj.contains_key("rejected") {
            Some(Format::Preference)
        } else if obj.contains_key("completion") && obj.contains_key("label") {
            Some(Format::Unpaired)
        } else if obj.contains_key("prompt") && obj.contains_key("completion") {
            Some(Format::PromptCompletion)
        } else if obj.contains_key("instruction") && obj.contains_key("output") {
            Some(Format::Alpaca)
        } else if obj.contains_key("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

/// A conversation role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The person.
    User,
    /// The model: what it learns to say.
    Assistant,
}

impl Role {
    /// The role's name in chat templates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
    /// Per-message override of whether the loss covers this message (`"train": false`).
    pub train: Option<bool>,
}

/// One training example, whatever file format it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// A conversation (chat, ShareGPT and alpaca records).
    Chat(Vec<Turn>),
    /// A prompt and the completion to learn.
    Completion {
        /// Shown to the model, not trained.
        prompt: String,
        /// Trained.
        completion: String,
    },
    /// Plain text, trained throughout.
    Text(String),
    /// A preference pair: one prompt (ending with a user turn), a better and a worse answer
    /// (assistant turns).
    Preference {
        /// The conversation so far, its last turn the user's.
        prompt: Vec<Turn>,
        /// The preferred answer.
        chosen: Vec<Turn>,
        /// The answer that should become less likely.
        rejected: Vec<Turn>,
    },
    /// One answer to a prompt, marked desirable or not (KTO's data).
    Unpaired {
        /// The conversation so far, its last turn the user's.
        prompt: Vec<Turn>,
        /// The answer (assistant turns).
        completion: Vec<Turn>,
        /// Whether the answer is one to make more likely (`"label": true`).
        desirable: bool,
    },
}

impl Example {
    /// Whether this is a preference pair (the data of DPO and its relatives).
    pub fn is_preference(&self) -> bool {
        matches!(self, Example::Preference { .. })
    }

    /// Whether this is an unpaired, labelled answer (KTO's data).
    pub fn is_unpaired(&self) -> bool {
        matches!(self, Example::Unpaired { .. })
    }

    /// A prompt and the answers scored against it (preference pairs and unpaired answers):
    /// trained through TRL's prompt/completion tokenization, not the chat masks.
    pub fn is_scored(&self) -> bool {
        self.is_preference() || self.is_unpaired()
    }
}

/// An example and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line number in its file.
    pub line: usize,
    /// The example.
    pub example: Example,
}

/// One problem in a data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, or 0 for the file as a whole.
    pub line: usize,
    /// What is wrong.
    pub msg: String,
    /// How to fix it, when known.
    pub hint: Option<String>,
}

impl LineError {
    /// A problem at `path:line` (line 0: the file as a whole), with a hint when the fix is known.
    pub fn new(path: &Path, line: usize, msg: String, hint: Option<&str>) -> Self {
        Self { path: path.to_path_buf(), line, msg, hint: hint.map(str::to_string) }
    }
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.msg)?;
        } else {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.msg)?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// Most line errors reported per file; the rest are counted.
pub const MAX_ERRORS: usize = 20;

/// Every problem found in one or more files.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct DataErrors {
    /// The first problems, in file order.
    pub errors: Vec<LineError>,
    /// How many more there were.
    pub more: usize,
}

impl DataErrors {
    pub(crate) fn push(&mut self, e: LineError) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        } else {
            self.more += 1;
        }
    }

    /// Whether nothing went wrong.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty() && self.more == 0
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.errors.len() + self.more
    }

    pub(crate) fn extend(&mut self, other: DataErrors) {
        for e in other.errors {
            self.push(e);
        }
        self.more += other.more;
    }
}

impl fmt::Display for DataErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        if self.more > 0 {
            write!(f, "\n... and {} more", self.more)?;
        }
        Ok(())
    }
}

/// Read a JSONL file. The format is detected from the first record unless `format` is given;
/// every record must then have it.
pub fn read_jsonl(
    path: &Path,
    format: Option<Format>,
) -> Result<(Format, Vec<Record>), DataErrors> {
    let mut errors = DataErrors::default();
    let err = |line, msg, hint| LineError::new(path, line, msg, hint);
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            errors.push(err(0, format!("cannot read: {e}"), None));
            return Err(errors);
        }
    };
    // A UTF-8 byte-order mark (Windows editors write one) is not part of the first record.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut file_format = format;
    let mut first_line = 0;
    let mut records = vec![];
    let mut unknown: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        // CRLF line endings: the \r belongs to the line ending, not to the JSON.
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                let at = e.valid_up_to();
                errors.push(err(
                    line,
                    format!("invalid UTF-8 (byte {:#04x} at column {})", raw[at], at + 1),
                    Some("save the file as UTF-8"),
                ));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                errors.push(err(
                    line,
                    format!("invalid JSON: {e}"),
                    Some("each line must be one complete JSON object"),
                ));
                continue;
            }
        };
        let Value::Object(obj) = value else {
            errors.push(err(line, format!("expected a JSON object, got {}", kind(&value)), None));
            continue;
        };
        let Some(found) = Format::detect(&obj) else {
            let keys: Vec<String> = obj.keys().map(|k| format!("`{k}`")).collect();
            errors.push(err(
                line,
                format!("unrecognised record with keys {}", if keys.is_empty() { "(none)".into() } else { keys.join(", ") }),
                Some("use `messages`, `conversations`, `prompt`+`completion`, `instruction`+`output`, `text`, or `prompt`+`chosen`+`rejected` for preference pairs"),
            ));
            continue;
        };
        match file_format {
            None => {
                file_format = Some(found);
                first_line = line;
            }
            Some(f) if f != found => {
                let origin = if format.is_some() {
                    "--format".to_string()
                } else {
                    format!("line {first_line}")
                };
                errors.push(err(
                    line,
                    format!("a `{}` record, but {origin} is `{}`", found.name(), f.name()),
                    Some("keep one format per file"),
                ));
                continue;
            }
            Some(_) => {}
        }
        for field in unknown_message_fields(found, &obj) {
            let seen = unknown.entry(field).or_insert((line, 0));
            seen.1 += 1;
        }
        match parse(found, &obj) {
            Ok(example) => records.push(Record { line, example }),
            Err((msg, hint)) => errors.push(err(line, msg, hint)),
        }
    }
    // A misspelt `"trian": false` must not pass unseen: one warning per field, at its first line.
    for (field, (line, count)) in &unknown {
        let known = known_message_fields(file_format.unwrap_or(Format::Chat));
        let hint = known
            .iter()
            .find(|k| edit_distance(k, field) <= 2)
            .map(|k| format!("; hint: did you mean `{k}`?"))
            .unwrap_or_default();
        tracing::warn!(
            "{}:{line}: message field `{field}` is not one whet reads (it is ignored; {count} record(s) have it){hint}",
            path.display()
        );
    }
    if records.is_empty() && errors.is_empty() {
        errors.push(err(
            0,
            "the file holds no records".into(),
            Some("write one JSON object per line"),
        ));
    }
    if errors.is_empty() {
        Ok((file_format.unwrap_or(Format::Chat), records))
    } else {
        Err(errors)
    }
}

type ParseError = (String, Option<&'static str>);

/// The keys a message of `format` may have.
fn known_message_fields(format: Format) -> &'static [&'static str] {
    match format {
        Format::ShareGpt => &["from", "value", "train"],
        _ => &["role", "content", "train"],
    }
}

/// Keys of a record's messages that whet does not read (`trian`, `weight`), each once.
fn unknown_message_fields(format: Format, obj: &Map<String, Value>) -> Vec<String> {
    let list = match format {
        Format::Chat => "messages",
        Format::ShareGpt => "conversations",
        _ => return vec![],
    };
    let known = known_message_fields(format);
    let mut out: Vec<String> = vec![];
    if let Some(Value::Array(items)) = obj.get(list) {
        for m in items.iter().filter_map(Value::as_object) {
            for key in m.keys() {
                if !known.contains(&key.as_str()) && !out.contains(key) {
                    out.push(key.clone());
                }
            }
        }
    }
    out
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string(
    obj: &Map<String, Value>,
    key: &str,
    at: &str,
    required: bool,
) -> Result<Option<String>, ParseError> {
    match obj.get(key) {
        None | Some(Value::Null) if !required => Ok(None),
        None => Err((format!("missing field `{at}{key}`"), None)),
        Some(Value::String(s)) => {
            if required && s.trim().is_empty() {
                Err((format!("field `{at}{key}` is empty"), None))
            } else {
                Ok(Some(s.clone()))
            }
        }
        Some(v) => Err((format!("field `{at}{key}` must be a string, got {}", kind(v)), None)),
    }
}

fn required(obj: &Map<String, Value>, key: &str, at: &str) -> Result<String, ParseError> {
    Ok(string(obj, key, at, true)?.unwrap_or_default())
}

fn parse(format: Format, obj: &Map<String, Value>) -> Result<Example, ParseError> {
    match format {
        Format::Chat => turns(obj, "messages", "role", "content"),
        Format::ShareGpt => turns(obj, "conversations", "from", "value"),
        Format::PromptCompletion => {
            let prompt = required(obj, "prompt", "")?;
            let completion = required(obj, "completion", "")?;
            Ok(Example::Completion { prompt, completion })
        }
        Format::Alpaca => {
            let instruction = required(obj, "instruction", "")?;
            let input = string(obj, "input", "", false)?.filter(|s| !s.trim().is_empty());
            let output = required(obj, "output", "")?;
            let user = match input {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction,
            };
            Ok(Example::Chat(vec![
                Turn { role: Role::User, content: user, train: None },
                Turn { role: Role::Assistant, content: output, train: None },
            ]))
        }
        Format::Text => Ok(Example::Text(required(obj, "text", "")?)),
        Format::Preference => preference(obj),
        Format::Unpaired => unpaired(obj),
    }
}

fn turns(
    obj: &Map<String, Value>,
    list: &str,
    role_key: &str,
    content_key: &str,
) -> Result<Example, ParseError> {
    let items = match obj.get(list) {
        Some(Value::Array(items)) => items,
        Some(v) => return Err((format!("field `{list}` must be a list, got {}", kind(v)), None)),
        None => return Err((format!("missing field `{list}`"), None)),
    };
    let turns = message_list(items, list, role_key, content_key)?;
    if !turns.iter().any(|t| t.role == Role::Assistant) {
        return Err((
            "conversation has no assistant turn, so there is nothing to learn".into(),
            Some("add the reply the model should give"),
        ));
    }
    Ok(Example::Chat(turns))
}

/// An answer field of a preference or unpaired record: a string (one assistant turn) or a list
/// of messages.
fn answer(
    obj: &Map<String, Value>,
    key: &str,
    hint: &'static str,
) -> Result<Vec<Turn>, ParseError> {
    match obj.get(key) {
        None | Some(Value::Null) => Err((format!("missing field `{key}`"), Some(hint))),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err((format!("field `{key}` is empty"), None))
        }
        Some(Value::String(s)) => {
            Ok(vec![Turn { role: Role::Assistant, content: s.clone(), train: None }])
        }
        Some(Value::Array(items)) if items.is_empty() => {
            Err((format!("field `{key}` is an empty list"), None))
        }
        Some(Value::Array(items)) => message_list(items, key, "role", "content"),
        Some(v) => Err((
            format!("field `{key}` must be a string or a list of messages, got {}", kind(v)),
            None,
        )),
    }
}

/// An explicit `prompt`: a string (one user turn) or a message list; `None` when absent.
fn explicit_prompt(obj: &Map<String, Value>) -> Result<Option<Vec<Turn>>, ParseError> {
    match obj.get("prompt") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(("field `prompt` is empty".into(), None))
        }
        Some(Value::String(s)) => {
            Ok(Some(vec![Turn { role: Role::User, content: s.clone(), train: None }]))
        }
        Some(Value::Array(items)) if items.is_empty() => {
            Err(("field `prompt` is an empty list".into(), None))
        }
        Some(Value::Array(items)) => Ok(Some(message_list(items, "prompt", "role", "content")?)),
        Some(v) => Err((
            format!("field `prompt` must be a string or a list of messages, got {}", kind(v)),
            None,
        )),
    }
}

/// The checks every scored record passes: the prompt ends with the user's turn, each answer
/// (`keys`) holds assistant turns only; then the optional `system` string opens the prompt.
fn finish_prompt(
    obj: &Map<String, Value>,
    mut prompt: Vec<Turn>,
    answers: &[(&str, &[Turn])],
) -> Result<Vec<Turn>, ParseError> {
    if prompt.last().map(|t| t.role) != Some(Role::User) {
        return Err((
            "the prompt's last message must be the user's".into(),
            Some("the answers reply to it"),
        ));
    }
    for &(key, turns) in answers {
        if turns.is_empty() {
            return Err((format!("field `{key}` holds no answer after the prompt"), None));
        }
        if let Some(i) = turns.iter().position(|t| t.role != Role::Assistant) {
            return Err((
                format!(
                    "`{key}[{i}]` is a `{}` message; an answer holds assistant messages only",
                    turns[i].role.as_str()
                ),
                Some("put the conversation before the answer in `prompt`"),
            ));
        }
    }
    if let Some(system) = string(obj, "system", "", false)? {
        if prompt.first().map(|t| t.role) == Some(Role::System) {
            return Err((
                "both `system` and a system message in `prompt`".into(),
                Some("keep one of them"),
            ));
        }
        prompt.insert(0, Turn { role: Role::System, content: system, train: None });
    }
    Ok(prompt)
}

/// A preference record, as TRL reads one: `prompt` a string (one user turn) or a message list
/// ending with a user turn, `chosen`/`rejected` a string (one assistant turn) or a list of
/// assistant turns; without `prompt`, `chosen` and `rejected` are whole conversations whose
/// turns up to the last user turn are the prompt, and must agree. An optional `system` string
/// opens the prompt.
fn preference(obj: &Map<String, Value>) -> Result<Example, ParseError> {
    const HINT: &str = "a preference record has `prompt`, `chosen` and `rejected`";
    let (mut chosen, mut rejected) = (answer(obj, "chosen", HINT)?, answer(obj, "rejected", HINT)?);
    let prompt = match explicit_prompt(obj)? {
        Some(prompt) => prompt,
        None => {
            // The implicit prompt: each side's turns up to its last user turn.
            let split = |turns: &mut Vec<Turn>, key: &str| -> Result<Vec<Turn>, ParseError> {
                let at = turns.iter().rposition(|t| t.role == Role::User).ok_or_else(|| {
                    (
                        format!("missing field `prompt`, and `{key}` has no user turn to take it from"),
                        Some("give `prompt` (a string or messages), or whole conversations in `chosen` and `rejected`"),
                    )
                })?;
                let rest = turns.split_off(at + 1);
                Ok(std::mem::replace(turns, rest))
            };
            let (pc, pr) = (split(&mut chosen, "chosen")?, split(&mut rejected, "rejected")?);
            if pc != pr {
                let at =
                    pc.iter().zip(&pr).position(|(a, b)| a != b).unwrap_or(pc.len().min(pr.len()));
                return Err((
                    format!("the prompts of `chosen` and `rejected` differ at message {at} (`chosen[{at}]` against `rejected[{at}]`)"),
                    Some("both sides of a pair answer the same conversation; give it once as `prompt`"),
                ));
            }
            pc
        }
    };
    let prompt = finish_prompt(obj, prompt, &[("chosen", &chosen), ("rejected", &rejected)])?;
    Ok(Example::Preference { prompt, chosen, rejected })
}

/// An unpaired record, as TRL's `KTOTrainer` reads one: `prompt` (a string or messages ending
/// with a user turn), `completion` (a string or assistant messages) and `label`, a boolean:
/// whether the answer is desirable.
fn unpaired(obj: &Map<String, Value>) -> Result<Example, ParseError> {
    const HINT: &str = "an unpaired record has `prompt`, `completion` and `label` (true or false)";
    let completion = answer(obj, "completion", HINT)?;
    let prompt = explicit_prompt(obj)?.ok_or(("missing field `prompt`".to_string(), Some(HINT)))?;
    let desirable = match obj.get("label") {
        Some(Value::Bool(b)) => *b,
        None | Some(Value::Null) => return Err(("missing field `label`".into(), Some(HINT))),
        Some(v) => {
            return Err((
                format!("field `label` must be true or false, got {}", kind(v)),
                Some("true marks a desirable answer, false an undesirable one"),
            ))
        }
    };
    let prompt = finish_prompt(obj, prompt, &[("completion", &completion)])?;
    Ok(Example::Unpaired { prompt, completion, desirable })
}

/// The messages of a list field, each a role and a non-empty content.
fn message_list(
    items: &[Value],
    list: &str,
    role_key: &str,
    content_key: &str,
) -> Result<Vec<Turn>, ParseError> {
    if items.is_empty() {
        return Err((format!("field `{list}` is an empty list"), None));
    }
    let mut turns = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{list}[{i}].");
        let Value::Object(m) = item else {
            return Err((format!("`{list}[{i}]` must be an object, got {}", kind(item)), None));
        };
        let role_name = required(m, role_key, &at)?;
        let role = match role_name.as_str() {
            "system" => Role::System,
            "user" | "human" => Role::User,
            "assistant" | "gpt" => Role::Assistant,
            other => {
                return Err((
                    format!("unknown role `{other}` in `{at}{role_key}`"),
                    Some(if role_key == "from" {
                        "ShareGPT roles are `system`, `human` and `gpt`"
                    } else {
                        "roles are `system`, `user` and `assistant`"
                    }),
                ))
            }
        };
        let content = required(m, content_key, &at)?;
        let train = match m.get("train") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                return Err((
                    format!("field `{at}train` must be true or false, got {}", kind(v)),
                    None,
                ))
            }
        };
        turns.push(Turn { role, content, train });
    }
    Ok(turns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &[u8]) -> Result<(Format, Vec<Record>), DataErrors> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, text).unwrap();
        read_jsonl(&path, None).map_err(|mut e| {
            for x in &mut e.errors {
                x.path = PathBuf::from("d.jsonl");
            }
            e
        })
    }

    fn first_error(text: &[u8]) -> String {
        read(text).unwrap_err().errors[0].to_string()
    }

    #[test]
    fn detects_every_format() {
        let cases: [(&str, Format); 5] = [
            (
                r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
                Format::Chat,
            ),
            (r#"{"prompt":"a","completion":"b"}"#, Format::PromptCompletion),
            (r#"{"text":"a"}"#, Format::Text),
            (r#"{"instruction":"a","input":"","output":"b"}"#, Format::Alpaca),
            (
                r#"{"conversations":[{"from":"human","value":"a"},{"from":"gpt","value":"b"}]}"#,
                Format::ShareGpt,
            ),
        ];
        for (line, want) in cases {
            let (f, records) = read(line.as_bytes()).unwrap();
            assert_eq!(f, want);
            assert_eq!(records.len(), 1);
        }
        let (_, r) = read(br#"{"instruction":"Sum","input":"1 2","output":"3"}"#).unwrap();
        assert_eq!(
            r[0].example,
            Example::Chat(vec![
                Turn { role: Role::User, content: "Sum\n\n1 2".into(), train: None },
                Turn { role: Role::Assistant, content: "3".into(), train: None },
            ])
        );
    }

    #[test]
    fn bad_lines_are_reported_with_file_and_line() {
        assert_eq!(first_error(b"{\"text\": \"a\"}\n{\"text\": \"b\"\n"), "d.jsonl:2: invalid JSON: EOF while parsing an object at line 1 column 12\n  hint: each line must be one complete JSON object");
        assert_eq!(
            first_error(br#"{"messages": "hi"}"#),
            "d.jsonl:1: field `messages` must be a list, got a string"
        );
        assert_eq!(
            first_error(br#"{"messages":[{"role":"tool","content":"x"}]}"#),
            "d.jsonl:1: unknown role `tool` in `messages[0].role`\n  hint: roles are `system`, `user` and `assistant`"
        );
        assert_eq!(first_error(br#"{"messages":[{"role":"user","content":"  "},{"role":"assistant","content":"x"}]}"#), "d.jsonl:1: field `messages[0].content` is empty");
        assert_eq!(
            first_error(br#"{"messages":[{"role":"user","content":3}]}"#),
            "d.jsonl:1: field `messages[0].content` must be a string, got a number"
        );
        assert!(first_error(br#"{"messages":[{"role":"user","content":"x"}]}"#)
            .starts_with("d.jsonl:1: conversation has no assistant turn"));
        assert_eq!(
            first_error(b"{\"text\":\"a\"}\n{\"prompt\":\"p\",\"completion\":\"c\"}\n"),
            "d.jsonl:2: a `completion` record, but line 1 is `text`\n  hint: keep one format per file"
        );
        assert_eq!(
            first_error(b"{\"text\":\"caf\xe9\"}"),
            "d.jsonl:1: invalid UTF-8 (byte 0xe9 at column 13)\n  hint: save the file as UTF-8"
        );
        assert_eq!(
            first_error(b""),
            "d.jsonl: the file holds no records\n  hint: write one JSON object per line"
        );
        assert_eq!(first_error(b"[1, 2]"), "d.jsonl:1: expected a JSON object, got a list");
    }

    #[test]
    fn errors_are_aggregated_up_to_a_limit() {
        let text = "not json\n".repeat(30);
        let e = read(text.as_bytes()).unwrap_err();
        assert_eq!(e.errors.len(), MAX_ERRORS);
        assert_eq!(e.more, 10);
        assert_eq!(e.len(), 30);
        assert_eq!(e.errors[19].line, 20);
        assert!(e.to_string().ends_with("... and 10 more"));
    }

    #[test]
    fn bom_and_crlf_are_line_endings_not_content() {
        let (_, r) = read(b"\xEF\xBB\xBF{\"text\":\"a\"}\r\n{\"text\":\"b\"}\r\n").unwrap();
        assert_eq!(
            r.iter().map(|r| r.example.clone()).collect::<Vec<_>>(),
            vec![Example::Text("a".into()), Example::Text("b".into())]
        );
    }
}
