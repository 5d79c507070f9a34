//! The OpenAI request bodies whet serves, read strictly: a field that would change the output
//! and that whet does not implement is refused by name, as is any field it does not know
//! (a misspelt `temprature` must not be ignored). Fields that change nothing (`user`,
//! `metadata`, `n: 1`, penalties of 0, ...) are accepted.

use crate::error::ApiError;
use serde::Deserialize;
use serde_json::Value;
use whet_infer::Message;

/// Sampling and length fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Common {
    pub(crate) model: String,
    #[serde(default)]
    pub(crate) stream: bool,
    pub(crate) stream_options: Option<StreamOptions>,
    pub(crate) max_tokens: Option<usize>,
    pub(crate) max_completion_tokens: Option<usize>,
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) seed: Option<u64>,
    pub(crate) stop: Option<Stop>,
    pub(crate) n: Option<usize>,
    pub(crate) frequency_penalty: Option<f64>,
    pub(crate) presence_penalty: Option<f64>,
    pub(crate) logit_bias: Option<serde_json::Map<String, Value>>,
    pub(crate) logprobs: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: bool,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields of [`Common`].
const COMMON: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "user",
];

/// The fields of [`ChatRequest`] beyond [`COMMON`].
pub(crate) const CHAT: &[&str] = &[
    "messages",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "metadata",
    "store",
    "parallel_tool_calls",
];

/// The fields of [`CompletionRequest`] beyond [`COMMON`].
pub(crate) const COMPLETION: &[&str] = &["prompt", "echo", "suffix", "best_of"];

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    #[serde(flatten)]
    pub(crate) common: Common,
    pub(crate) messages: Vec<ChatMessage>,
    // Accepted when they change nothing (`metadata`, `store`, `parallel_tool_calls` and
    // `user` always are, and are not read).
    pub(crate) top_logprobs: Option<Value>,
    pub(crate) tools: Option<Vec<Value>>,
    pub(crate) tool_choice: Option<Value>,
    pub(crate) response_format: Option<Value>,
}

/// One message; `content` is a string or a list of `{"type": "text", "text": ...}` parts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChatMessage {
    pub(crate) role: String,
    pub(crate) content: Content,
    /// A participant's name: accepted, and (as in the chat templates) not shown to the model.
    #[allow(dead_code)]
    pub(crate) name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a message's content. Only text is served; the other kinds OpenAI defines
/// (`image_url`, `input_audio`, `file`) are read so that the refusal can name them.
#[derive(Debug, Deserialize)]
pub(crate) struct Part {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) text: Option<String>,
    #[serde(flatten)]
    pub(crate) other: serde_json::Map<String, Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    #[serde(flatten)]
    pub(crate) common: Common,
    pub(crate) prompt: Prompt,
    pub(crate) echo: Option<bool>,
    pub(crate) suffix: Option<String>,
    pub(crate) best_of: Option<usize>,
}

/// `prompt`: text, token ids, or a list of one of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// What a prompt turns into: text for the tokenizer, or ids as given.
pub(crate) enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// Parse a body whose fields are [`COMMON`] and `extra`: not JSON is 400; an object with a
/// field whet does not know, or of the wrong shape, is 422 naming the field.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    extra: &[&str],
) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(fields) = &value else {
        return Err(ApiError::unprocessable("the body must be a JSON object".into(), None));
    };
    if let Some(unknown) =
        fields.keys().find(|k| !COMMON.contains(&k.as_str()) && !extra.contains(&k.as_str()))
    {
        return Err(ApiError::unprocessable(
            format!("unknown field `{unknown}`"),
            Some(unknown.as_str()),
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::unprocessable(format!("invalid request: {e}"), None))
}

/// Refuse `what` when it is set to something other than what changes nothing.
fn refuse_if(set: bool, what: &str) -> Result<(), ApiError> {
    if set {
        Err(ApiError::unprocessable(format!("`{what}` is not supported by whet"), Some(what)))
    } else {
        Ok(())
    }
}

impl Common {
    /// Check the fields whet accepts only at their no-op values.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        refuse_if(self.n.is_some_and(|n| n != 1), "n")?;
        refuse_if(self.frequency_penalty.is_some_and(|p| p != 0.0), "frequency_penalty")?;
        refuse_if(self.presence_penalty.is_some_and(|p| p != 0.0), "presence_penalty")?;
        refuse_if(self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()), "logit_bias")?;
        refuse_if(
            self.logprobs.as_ref().is_some_and(|l| !(l.is_null() || l == &Value::Bool(false))),
            "logprobs",
        )?;
        if let (Some(a), Some(b)) = (self.max_tokens, self.max_completion_tokens) {
            if a != b {
                return Err(ApiError::unprocessable(
                    format!("`max_tokens` {a} and `max_completion_tokens` {b} disagree: give one (`max_tokens` is OpenAI's older name for `max_completion_tokens`)"),
                    Some("max_completion_tokens"),
                ));
            }
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::unprocessable(
                "`stream_options` is only allowed with `stream: true`".into(),
                Some("stream_options"),
            ));
        }
        Ok(())
    }

    pub(crate) fn stop(&self) -> Result<Vec<String>, ApiError> {
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::unprocessable(
                "`stop` takes at most 4 non-empty strings".into(),
                Some("stop"),
            ));
        }
        Ok(stop)
    }

    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        self.common.check()?;
        refuse_if(self.tools.as_ref().is_some_and(|t| !t.is_empty()), "tools")?;
        refuse_if(
            self.tool_choice.as_ref().is_some_and(|c| !(c.is_null() || c == "none")),
            "tool_choice",
        )?;
        refuse_if(
            self.response_format
                .as_ref()
                .is_some_and(|f| !(f.is_null() || f.get("type").is_some_and(|t| t == "text"))),
            "response_format",
        )?;
        refuse_if(self.top_logprobs.as_ref().is_some_and(|t| !t.is_null()), "top_logprobs")?;
        if self.messages.is_empty() {
            return Err(ApiError::unprocessable("`messages` is empty".into(), Some("messages")));
        }
        Ok(())
    }

    /// The messages as the chat template takes them.
    pub(crate) fn messages(&self) -> Result<Vec<Message>, ApiError> {
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    Content::Text(t) => t.clone(),
                    Content::Parts(parts) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            let at = format!("messages[{i}].content[{j}]");
                            let refuse = |msg: String| {
                                Err(ApiError::unprocessable(format!("{at}: {msg}"), Some("messages")))
                            };
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) if p.other.is_empty() => text.push_str(t),
                                ("text", Some(_)) => {
                                    let field = p.other.keys().next().map_or("", String::as_str);
                                    return refuse(format!("unknown field `{field}` in a text part"));
                                }
                                ("text", None) => return refuse("a text part without `text`".into()),
                                ("image_url" | "image", _) => {
                                    return refuse("images are not supported: whet serves text-only models".into())
                                }
                                ("input_audio" | "audio", _) => {
                                    return refuse("audio is not supported: whet serves text-only models".into())
                                }
                                (kind, _) => {
                                    return refuse(format!("a `{kind}` part is not supported (text only)"))
                                }
                            }
                        }
                        text
                    }
                };
                if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
                    return Err(ApiError::unprocessable(
                        format!("messages[{i}].role: `{}` is not one of system, developer, user, assistant", m.role),
                        Some("messages"),
                    ));
                }
                // OpenAI's `developer` role is the system prompt of newer models.
                let role = if m.role == "developer" { "system" } else { m.role.as_str() };
                Ok(Message::new(role, content))
            })
            .collect()
    }
}

impl CompletionRequest {
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        self.common.check()?;
        refuse_if(self.echo == Some(true), "echo")?;
        refuse_if(self.suffix.as_ref().is_some_and(|s| !s.is_empty()), "suffix")?;
        refuse_if(self.best_of.is_some_and(|b| b != 1), "best_of")?;
        Ok(())
    }

    /// The one prompt of the request (a list of several is refused: one completion per
    /// request).
    pub(crate) fn prompt(&self) -> Result<PromptInput, ApiError> {
        let several = || {
            ApiError::unprocessable(
                "`prompt` must hold one prompt; send one request per prompt".into(),
                Some("prompt"),
            )
        };
        Ok(match &self.prompt {
            Prompt::Text(t) => PromptInput::Text(t.clone()),
            Prompt::Ids(ids) => PromptInput::Ids(ids.clone()),
            Prompt::Texts(v) if v.len() == 1 => PromptInput::Text(v[0].clone()),
            Prompt::IdLists(v) if v.len() == 1 => PromptInput::Ids(v[0].clone()),
            _ => return Err(several()),
        })
    }
}
