//! House-style rules, declared in `rules.toml` beside the data:
//!
//! ```toml
//! [[rule]]
//! name = "greeting"
//! must_match = "^Hi there!"
//!
//! [[rule]]
//! name = "short"
//! max_words = 60
//!
//! [[rule]]
//! name = "sign-off"
//! required_lines = ["— Fjord Outfitters Support"]
//! must_not_match = "(?i)as an ai"
//! ```
//!
//! Each rule has a `name` and one or more checks; an output follows the rule when it passes
//! every check of it. Patterns are regular expressions (Python syntax, lookarounds included).

use crate::Error;
use serde::Deserialize;
use std::path::Path;

/// The rules of one dataset.
#[derive(Debug, Clone)]
pub struct Rules {
    /// In file order.
    pub rules: Vec<Rule>,
}

/// One named rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Reported as `rule:NAME`.
    pub name: String,
    must_match: Vec<fancy_regex::Regex>,
    must_not_match: Vec<fancy_regex::Regex>,
    max_words: Option<usize>,
    required_lines: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    rule: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    #[serde(default)]
    must_match: OneOrMany,
    #[serde(default)]
    must_not_match: OneOrMany,
    max_words: Option<usize>,
    #[serde(default)]
    required_lines: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(self) -> Vec<String> {
        match self {
            OneOrMany::None => vec![],
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

impl Rules {
    /// Read `path`; a file that does not parse, a rule without checks, or a bad pattern is an
    /// error naming the file and the rule.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let bad = |msg: String| Error::Input(format!("{}: {msg}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: File = toml::from_str(&text).map_err(|e| bad(one_line(&e.to_string())))?;
        let mut rules = vec![];
        for spec in file.rule {
            let name = spec.name.clone();
            let compile = |pats: OneOrMany| {
                pats.list()
                    .into_iter()
                    .map(|p| {
                        fancy_regex::Regex::new(&p).map_err(|e| {
                            bad(format!(
                                "rule `{name}`: pattern `{p}` is not a regular expression: {e}"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let rule = Rule {
                must_match: compile(spec.must_match)?,
                must_not_match: compile(spec.must_not_match)?,
                max_words: spec.max_words,
                required_lines: spec.required_lines,
                name: spec.name,
            };
            if rule.must_match.is_empty()
                && rule.must_not_match.is_empty()
                && rule.max_words.is_none()
                && rule.required_lines.is_empty()
            {
                return Err(bad(format!(
                    "rule `{}` has no check (must_match, must_not_match, max_words, required_lines)",
                    rule.name
                )));
            }
            rules.push(rule);
        }
        if rules.is_empty() {
            return Err(bad("no [[rule]] entries".into()));
        }
        Ok(Self { rules })
    }
}

impl Rule {
    /// Whether `output` follows the rule.
    pub fn check(&self, output: &str) -> bool {
        let text = output.trim();
        self.must_match.iter().all(|r| r.is_match(text).unwrap_or(false))
            && !self.must_not_match.iter().any(|r| r.is_match(text).unwrap_or(false))
            && self.max_words.is_none_or(|m| text.split_whitespace().count() <= m)
            && self.required_lines.iter().all(|l| text.lines().any(|t| t.trim() == l.trim()))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<Rules, Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, text).unwrap();
        Rules::read(&path)
    }

    #[test]
    fn each_check_by_hand() {
        let r = rules(
            "[[rule]]\nname = \"hi\"\nmust_match = \"^Hi there!\"\n\
             [[rule]]\nname = \"short\"\nmax_words = 5\n\
             [[rule]]\nname = \"sign\"\nrequired_lines = [\"— Bye\"]\nmust_not_match = [\"(?i)as an ai\"]\n",
        )
        .unwrap();
        let pass = |text: &str| r.rules.iter().map(|rule| rule.check(text)).collect::<Vec<_>>();
        assert_eq!(pass("Hi there!\n— Bye"), [true, true, true]);
        assert_eq!(pass("Hello. One two three four five"), [false, false, false]);
        assert_eq!(pass("Hi there! As an AI\n— Bye"), [true, false, false]);
        assert_eq!(pass("Hi there! Sure\n— Bye"), [true, true, true]);
    }

    #[test]
    fn bad_rule_files_are_refused_by_name() {
        let e = rules("[[rule]]\nname = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("rule `x` has no check"), "{e}");
        let e = rules("[[rule]]\nname = \"y\"\nmust_match = \"(\"\n").unwrap_err().to_string();
        assert!(e.contains("rule `y`: pattern `(` is not a regular expression"), "{e}");
        let e = rules("[[rule]]\nname = \"z\"\nmax_wrds = 3\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `max_wrds`"), "{e}");
        let e = rules("rule = [").unwrap_err().to_string();
        assert!(e.contains("rules.toml"), "{e}");
    }
}
