//! JSON answers held to a JSON Schema (`--json-schema FILE`): `whet distill` keeps a teacher's
//! answer only when it is JSON that the schema accepts. Validation is the `jsonschema` crate's
//! (drafts 4, 6, 7, 2019-09 and 2020-12, by the schema's `$schema`; 2020-12 without one),
//! with references resolved inside the file only: no schema is fetched.

use crate::Error;
use std::path::{Path, PathBuf};

/// A compiled schema and the file it came from.
pub struct JsonSchema {
    validator: jsonschema::Validator,
    /// The schema's file, for messages.
    pub path: PathBuf,
}

impl std::fmt::Debug for JsonSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonSchema").field("path", &self.path).finish()
    }
}

impl JsonSchema {
    /// Read and compile the schema in `path`; one that is not JSON, or not a valid schema, is
    /// an error naming the file (and the schema's bad part).
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Input(format!("{}: not JSON: {e}", path.display())))?;
        let validator = jsonschema::validator_for(&value).map_err(|e| {
            Error::Input(format!("{}: not a valid JSON Schema: {e}", path.display()))
        })?;
        Ok(Self { validator, path: path.to_path_buf() })
    }

    /// The JSON value of `answer` (the whole text, or its one `{...}`/`[...]` block) when the
    /// schema accepts it; else why not, the first violation with its place in the value.
    pub fn check(&self, answer: &str) -> Result<serde_json::Value, String> {
        let value = crate::metrics::parse_json(answer).ok_or("not JSON")?;
        let first = self.validator.iter_errors(&value).next().map(|e| {
            let at = e.instance_path().to_string();
            format!("at `{}`: {e}", if at.is_empty() { "/" } else { &at })
        });
        match first {
            None => Ok(value),
            Some(why) => Err(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> Result<JsonSchema, Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schema.json");
        std::fs::write(&path, text).unwrap();
        JsonSchema::read(&path)
    }

    #[test]
    fn answers_are_held_to_the_schema() {
        let s = schema(
            r#"{"type": "object", "required": ["sentiment"], "additionalProperties": false,
                "properties": {"sentiment": {"enum": ["positive", "negative"]},
                               "score": {"type": "integer", "minimum": 1, "maximum": 5}}}"#,
        )
        .unwrap();
        let ok = s.check("```json\n{\"sentiment\": \"positive\", \"score\": 4}\n```").unwrap();
        assert_eq!(ok, serde_json::json!({"sentiment": "positive", "score": 4}));
        for (bad, why) in [
            ("positive", "not JSON"),
            (r#"{"sentiment": "great"}"#, "at `/sentiment`"),
            (r#"{"sentiment": "negative", "score": 9}"#, "at `/score`"),
            (r#"{"score": 2}"#, "at `/`"),
            (r#"{"sentiment": "negative", "extra": 1}"#, "at `/`"),
        ] {
            let e = s.check(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_bad_schema_names_its_file() {
        let e = schema("{\"type\": 3}").unwrap_err().to_string();
        assert!(e.contains("schema.json: not a valid JSON Schema"), "{e}");
        let e = schema("{type: object}").unwrap_err().to_string();
        assert!(e.contains("schema.json: not JSON"), "{e}");
    }
}
