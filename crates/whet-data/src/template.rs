//! Chat templates: the Jinja template a model ships (`tokenizer_config.json`'s `chat_template`
//! or GGUF's `tokenizer.chat_template`), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it, with ChatML as the fallback for models without one.

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A template that cannot be compiled or rendered.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: chat template {action}: {msg}")]
pub struct TemplateError {
    /// Where the template came from (a file path, or `ChatML fallback`).
    pub origin: String,
    /// `does not compile` or `failed to render`.
    pub action: &'static str,
    /// minijinja's description, one line.
    pub msg: String,
}

/// The ChatML template (Qwen2, SmolLM2 and many others use it), for models that ship none.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    bos_token: String,
    eos_token: String,
    is_fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compile `source`; `origin` names it in errors. `bos_token`/`eos_token` are visible to the
    /// template as in transformers.
    pub fn new(
        source: &str,
        origin: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks; without them whitespace differs.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string methods (`.strip()`, `.startswith()`, ...) that HF templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| TemplateError {
            origin: origin.to_string(),
            action: "does not compile",
            msg: describe(&e),
        })?;
        Ok(Self {
            env,
            origin: origin.to_string(),
            bos_token: bos_token.unwrap_or("").to_string(),
            eos_token: eos_token.unwrap_or("").to_string(),
            is_fallback: false,
        })
    }

    /// The model's template when it has one, ChatML otherwise.
    pub fn from_model(
        source: Option<&str>,
        origin: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TemplateError> {
        match source {
            Some(s) => Self::new(s, origin, bos_token, eos_token),
            None => {
                let mut t = Self::new(CHATML, "ChatML fallback", bos_token, eos_token)?;
                t.is_fallback = true;
                Ok(t)
            }
        }
    }

    /// Whether this is the ChatML fallback rather than the model's own template.
    pub fn is_fallback(&self) -> bool {
        self.is_fallback
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let err = |e: minijinja::Error| TemplateError {
            origin: self.origin.clone(),
            action: "failed to render",
            msg: describe(&e),
        };
        let tmpl = self.env.get_template("chat").map_err(err)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(err)
    }
}

/// minijinja's error as one line, with the template line when known.
fn describe(e: &minijinja::Error) -> String {
    let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string());
    match e.line() {
        Some(line) => format!("{detail} (template line {line})"),
        None => detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, verbatim from its tokenizer_config.json.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_adds_its_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "test", None, None).unwrap();
        let text = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = t
            .render(&[Message::new("system", "Be brief."), Message::new("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn chatml_fallback_when_the_model_has_none() {
        let t = ChatTemplate::from_model(None, "m.gguf", None, None).unwrap();
        assert!(t.is_fallback());
        let text = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_special_tokens_work() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "t", Some("<s>"), Some("</s>")).unwrap();
        assert_eq!(t.render(&[Message::new("user", "  hi ")], false).unwrap(), "<s>HI</s>");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_one_line_errors() {
        let src = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}";
        let t = ChatTemplate::new(src, "m/tokenizer_config.json", None, None).unwrap();
        let err = t.render(&[Message::new("system", "x")], false).unwrap_err().to_string();
        assert_eq!(err, "m/tokenizer_config.json: chat template failed to render: System role not supported (template line 1)");
        let err = ChatTemplate::new("{% for %}", "x.gguf", None, None).unwrap_err().to_string();
        assert!(err.starts_with("x.gguf: chat template does not compile: "), "{err}");
        assert_eq!(err.lines().count(), 1);
    }
}
