//! Chat templates: the Jinja template a model ships (`chat_template.jinja`,
//! `tokenizer_config.json`'s `chat_template` or GGUF's `tokenizer.chat_template`), rendered with
//! minijinja the way transformers' `apply_chat_template` renders it — the same whitespace
//! control, `raise_exception`, `strftime_now` and a `tojson` that writes what Python's
//! `json.dumps` writes — with ChatML as the fallback for models without one.

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

/// The most instructions one render may run: about a second of work at most, thousands of
/// times what a chat template needs for a long conversation with tools.
pub const RENDER_FUEL: u64 = 20_000_000;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    bos_token: String,
    eos_token: String,
    is_fallback: bool,
    /// Variables visible to the template besides the messages (`date_string`, `tools`, ...).
    vars: BTreeMap<String, Value>,
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
        // A template is code from a model file: a loop nest that never ends in practice
        // (`range(100000)` inside another) must end in an error, not hang whet or fill memory.
        env.set_fuel(Some(RENDER_FUEL));
        // transformers renders with trim_blocks and lstrip_blocks; without them whitespace differs.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string methods (`.strip()`, `.startswith()`, ...) that HF templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        // transformers provides the local time; Llama 3.x stamps it into every system header
        // (pin it for reproducible data with the `date_string` variable).
        env.add_function("strftime_now", |format: String| -> Result<String, minijinja::Error> {
            use std::fmt::Write;
            let mut out = String::new();
            write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: invalid format `{format}`"),
                )
            })?;
            Ok(out)
        });
        env.add_filter("tojson", tojson);
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
            vars: BTreeMap::new(),
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

    /// Make `name` visible to the template with `value` (`date_string`, `tools`,
    /// `enable_thinking`, ...), as transformers passes `apply_chat_template`'s keyword arguments.
    pub fn set_var(&mut self, name: &str, value: serde_json::Value) {
        self.vars.insert(name.to_string(), Value::from_serialize(&value));
    }

    /// [`ChatTemplate::set_var`] for each `NAME=VALUE` of `specs` (`--template-var`): the value
    /// is JSON when it parses as JSON (`false`, `[..]`), a string otherwise (`01 Dec 2026`).
    pub fn set_vars(&mut self, specs: &[String]) -> Result<(), String> {
        for spec in specs {
            let (name, value) = spec
                .split_once('=')
                .filter(|(n, _)| !n.trim().is_empty())
                .ok_or_else(|| format!("--template-var `{spec}`: expected NAME=VALUE"))?;
            let value = serde_json::from_str(value)
                .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
            self.set_var(name.trim(), value);
        }
        Ok(())
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
            ..Value::from_serialize(&self.vars)
        })
        .map_err(err)
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. minijinja's own writes `{"a":1}` where Python
/// writes `{"a": 1}`, which changes every tool-calling prompt.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item, key) = match &separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        _ => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    write_json(&json, indent, 0, sort_keys.unwrap_or(false), (&item, &key), &mut out);
    // Safe: Python's filter output is marked safe too (no HTML escaping in chat templates).
    Ok(Value::from_safe_string(out))
}

/// `json.dumps` formatting of `v` into `out`.
fn write_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    depth: usize,
    sort_keys: bool,
    seps: (&str, &str),
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(seps.0);
                }
                newline(out, depth + 1);
                write_json(x, indent, depth + 1, sort_keys, seps, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(seps.0);
                }
                newline(out, depth + 1);
                out.push_str(&python_string(k));
                out.push_str(seps.1);
                write_json(x, indent, depth + 1, sort_keys, seps, out);
            }
            newline(out, depth);
            out.push('}');
        }
        J::String(s) => out.push_str(&python_string(s)),
        J::Number(n) => match n.as_f64() {
            // Python writes floats with a decimal point (`1.0`), integers without.
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e16 => {
                out.push_str(&format!("{f:.1}"))
            }
            _ => out.push_str(&n.to_string()),
        },
        other => out.push_str(&other.to_string()),
    }
}

/// A JSON string as `json.dumps(ensure_ascii=False)` writes it.
fn python_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// minijinja's error as one line, with the template line when known.
fn describe(e: &minijinja::Error) -> String {
    if e.kind() == ErrorKind::OutOfFuel {
        return format!(
            "rendering ran past {RENDER_FUEL} steps, the limit for one render (a loop that runs too long?)"
        );
    }
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
    fn a_template_whose_loops_run_too_long_fails_naming_it() {
        let hang = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(hang, "models/evil/tokenizer_config.json", None, None).unwrap();
        let e = t.render(&[Message::new("user", "Hi")], true).unwrap_err().to_string();
        assert!(e.starts_with("models/evil/tokenizer_config.json: chat template failed to render: rendering ran past"), "{e}");
        // A long conversation is far below the limit.
        let many: Vec<Message> = (0..2000).map(|i| Message::new("user", format!("m{i}"))).collect();
        let t = ChatTemplate::new(SMOLLM2, "test", None, None).unwrap();
        assert!(t.render(&many, true).is_ok());
    }

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

/// Real templates against transformers' own rendering (`scripts/reference_templates.py`,
/// tests/fixtures/template_golden.json): Llama 3.1 and 3.2 (`strftime_now`, tools, ipython),
/// Qwen2.5 with tools (`tojson`), Qwen3 (`enable_thinking`), Mistral Nemo (`raise_exception`).
#[cfg(test)]
mod golden {
    use super::*;

    #[test]
    fn real_templates_render_like_transformers() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("template_golden.json")).unwrap(),
        )
        .unwrap();
        let their_today = golden["today"].as_str().unwrap();
        let today = chrono::Local::now().format("%d %b %Y").to_string();
        let mut checked = 0;
        for t in golden["templates"].as_array().unwrap() {
            let file = t["file"].as_str().unwrap();
            let source = std::fs::read_to_string(root.join("templates").join(file)).unwrap();
            for case in t["cases"].as_array().unwrap() {
                let mut tmpl = ChatTemplate::new(&source, file, Some("<s>"), Some("</s>")).unwrap();
                if let Some(tools) = case.get("tools") {
                    tmpl.set_var("tools", tools.clone());
                }
                if let Some(vars) = case.get("vars").and_then(|v| v.as_object()) {
                    for (k, v) in vars {
                        tmpl.set_var(k, v.clone());
                    }
                }
                let messages: Vec<Message> =
                    serde_json::from_value(case["messages"].clone()).unwrap();
                let gen = case["add_generation_prompt"].as_bool().unwrap();
                let what = format!("{file} {} (generation prompt {gen})", case["name"]);
                let got = tmpl.render(&messages, gen);
                match case.get("text").and_then(|t| t.as_str()) {
                    Some(want) => {
                        let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                        let want = if case.get("dated").is_some() {
                            assert!(want.contains(their_today), "{what}: no date in the golden");
                            want.replace(their_today, &today)
                        } else {
                            want.to_string()
                        };
                        assert_eq!(got, want, "{what}");
                    }
                    None => {
                        let want = case["error"].as_str().unwrap();
                        let err = got.expect_err(&what).to_string();
                        assert!(err.contains(want), "{what}: {err} vs {want}");
                    }
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 50);
    }

    /// Regression: Llama 3.x templates test `strftime_now is defined`, and without it stamped
    /// "26 Jul 2024" into every system header where transformers stamps today's date.
    #[test]
    fn strftime_now_is_provided_and_date_string_pins_it() {
        let src = "{% if not date_string is defined %}{% if strftime_now is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% else %}{% set date_string = '26 Jul 2024' %}{% endif %}{% endif %}{{ date_string }}";
        let mut t = ChatTemplate::new(src, "t", None, None).unwrap();
        let today = chrono::Local::now().format("%d %b %Y").to_string();
        assert_eq!(t.render(&[], false).unwrap(), today);
        t.set_var("date_string", serde_json::json!("01 Jan 2025"));
        assert_eq!(t.render(&[], false).unwrap(), "01 Jan 2025");
    }

    /// Regression: minijinja's `tojson` wrote `{"a":1}` where transformers writes `{"a": 1}`.
    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let src = "{{ x | tojson }}|{{ x | tojson(indent=2) }}";
        let mut t = ChatTemplate::new(src, "t", None, None).unwrap();
        t.set_var("x", serde_json::json!({"b": [1, 2.5, 3.0], "a": "é\"\n", "c": {}}));
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"b\": [1, 2.5, 3.0], \"a\": \"é\\\"\\n\", \"c\": {}}|{\n  \"b\": [\n    1,\n    2.5,\n    3.0\n  ],\n  \"a\": \"é\\\"\\n\",\n  \"c\": {}\n}"
        );
    }
}
