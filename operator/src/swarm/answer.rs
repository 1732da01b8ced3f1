//! Finding the answer in an output, so a vote compares answers, not wordings: a model that
//! reasons before it answers (how small models get arithmetic right) writes outputs no two
//! of which are equal.

use std::sync::LazyLock;

use regex::Regex;

use crate::api::{AnswerSpec, AnswerType};

/// How a job finds answers, compiled once per job.
#[derive(Debug, Clone)]
pub enum Extractor {
    /// The whole output, normalised: for outputs that are nothing but the answer.
    Whole,
    LastNumber,
    Regex(Regex),
    JsonField(String),
}

impl Extractor {
    /// The job's extractor; a bad pattern names the field and the fix.
    pub fn compile(spec: Option<&AnswerSpec>) -> Result<Self, String> {
        let Some(spec) = spec else {
            return Ok(Self::Whole);
        };
        match spec.type_ {
            AnswerType::LastNumber => Ok(Self::LastNumber),
            AnswerType::JsonField => Ok(Self::JsonField(spec.field.clone().unwrap_or_default())),
            AnswerType::Regex => {
                let pattern = spec.pattern.as_deref().unwrap_or_default();
                let regex = Regex::new(pattern).map_err(|err| {
                    format!(
                        "spec.aggregation.answer.pattern is not a valid regular expression: {err}"
                    )
                })?;
                match regex.captures_len() - 1 {
                    1 => Ok(Self::Regex(regex)),
                    n => Err(format!(
                        "spec.aggregation.answer.pattern has {n} capture groups; it needs exactly one, around the answer (use (?:...) for the others)"
                    )),
                }
            }
        }
    }

    /// The answer in `output` as written (for the gate to read), `None` when it has none.
    /// The whole output has no answer of its own to show.
    pub fn found(&self, output: &str) -> Option<String> {
        let found = match self {
            Self::Whole => return None,
            Self::LastNumber => last_number(output)?.to_owned(),
            Self::Regex(regex) => regex
                .captures_iter(output)
                .last()?
                .get(1)?
                .as_str()
                .to_owned(),
            Self::JsonField(field) => {
                let text = super::checks::document(output, |t| t.starts_with('{'));
                let value: serde_json::Value = serde_json::from_str(text).ok()?;
                match value.get(field)? {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => return None,
                    other => other.to_string(),
                }
            }
        };
        let found = found.trim();
        (!found.is_empty()).then(|| found.to_owned())
    }

    /// The answer in `output`, normalised so that equal answers compare equal; `None`
    /// when the output has none.
    pub fn extract(&self, output: &str) -> Option<String> {
        let answer = match self {
            Self::Whole => normalise(output),
            _ => normalise(&self.found(output)?),
        };
        (!answer.is_empty()).then_some(answer)
    }
}

/// A short answer reduced to what a vote compares: case, surrounding whitespace and
/// punctuation, inner runs of whitespace, and a leading "the answer is" do not count; a
/// number is compared as a number.
pub fn normalise(answer: &str) -> String {
    let lower = answer.trim().to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let joined = words.join(" ");
    let stripped = ["final answer:", "answer:", "the answer is"]
        .iter()
        .find_map(|prefix| joined.strip_prefix(prefix))
        .unwrap_or(&joined)
        .trim_matches(|c: char| c.is_whitespace() || (c.is_ascii_punctuation() && c != '-'));
    canonical_number(stripped).unwrap_or_else(|| stripped.to_owned())
}

/// The last number in `text` as written: "The total is $1,250." gives "1,250". A minus
/// sign counts only where a sign can stand, so a range "7-8" or a date "2024-01-05" does
/// not end on a negative number.
fn last_number(text: &str) -> Option<&str> {
    static NUMBER: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\d[\d,]*(?:\.\d+)?").expect("a valid pattern"));
    let found = NUMBER
        .find_iter(text)
        .filter(|m| canonical_number(m.as_str()).is_some())
        .last()?;
    let before = &text[..found.start()];
    let signed = before.strip_suffix('-').is_some_and(|rest| {
        rest.chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || "(=:$".contains(c))
    });
    Some(if signed {
        &text[found.start() - 1..found.end()]
    } else {
        found.as_str()
    })
}

/// `text` as a canonical number if it is one: thousands separators, a leading `+`, and
/// trailing zeros after the point do not count ("1,000.50" and "1000.5" are equal).
fn canonical_number(text: &str) -> Option<String> {
    let plain: String = text.trim().trim_start_matches('+').replace(',', "");
    let (sign, digits) = match plain.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", plain.as_str()),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    let fraction = fraction.trim_end_matches('0');
    let sign = if whole == "0" && fraction.is_empty() {
        ""
    } else {
        sign
    };
    Some(if fraction.is_empty() {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{fraction}")
    })
}

impl Extractor {
    /// The schema subagents write under so that their outputs have the answer: a JSON
    /// object whose `reasoning` comes before the answer, so a model works the problem
    /// out before it commits to a result.
    pub fn schema(&self) -> Option<(&'static str, serde_json::Value)> {
        let Self::JsonField(field) = self else {
            return None;
        };
        let mut properties = serde_json::Map::new();
        properties.insert("reasoning".into(), serde_json::json!({"type": "string"}));
        properties.insert(
            field.clone(),
            serde_json::json!({"type": ["string", "number"]}),
        );
        let required: Vec<&String> = properties.keys().collect();
        Some((
            "answer",
            serde_json::json!({
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": false,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(type_: AnswerType, pattern: Option<&str>, field: Option<&str>) -> AnswerSpec {
        AnswerSpec {
            type_,
            pattern: pattern.map(str::to_owned),
            field: field.map(str::to_owned),
        }
    }

    #[test]
    fn whole_answers_ignore_case_spacing_punctuation_and_preamble() {
        let whole = Extractor::Whole;
        assert_eq!(whole.extract("  Paris. ").unwrap(), "paris");
        assert_eq!(whole.extract("The answer is   PARIS!").unwrap(), "paris");
        assert_eq!(whole.extract("Answer: \"Paris\"").unwrap(), "paris");
        assert_eq!(whole.extract("New  York").unwrap(), "new york");
        assert_eq!(whole.extract("Final answer: 1,000.").unwrap(), "1000");
        assert_eq!(whole.extract(" ... "), None);
    }

    #[test]
    fn the_last_number_is_read_as_a_number() {
        let last = Extractor::compile(Some(&spec(AnswerType::LastNumber, None, None))).unwrap();
        assert_eq!(last.extract("3 apples and 4 pears: 7.").unwrap(), "7");
        assert_eq!(last.extract("The total is $1,250.00").unwrap(), "1250");
        assert_eq!(last.extract("It falls to -3.50 degrees").unwrap(), "-3.5");
        assert_eq!(last.extract("07").unwrap(), "7");
        assert_eq!(last.extract("between 7-8 hours").unwrap(), "8");
        assert_eq!(last.extract("on 2024-01-05").unwrap(), "5");
        assert_eq!(last.extract("x = -4").unwrap(), "-4");
        assert_eq!(last.found("The total is $1,250.").unwrap(), "1,250");
        assert_eq!(last.extract("no number here"), None);
    }

    #[test]
    fn a_pattern_needs_one_group_and_its_last_match_counts() {
        let regex = |p: &str| Extractor::compile(Some(&spec(AnswerType::Regex, Some(p), None)));
        let answer = regex(r"ANSWER: (\w+)").unwrap();
        assert_eq!(
            answer.extract("ANSWER: maybe\nno, ANSWER: Blue").unwrap(),
            "blue"
        );
        // The gate reads the answer as written.
        assert_eq!(answer.found("ANSWER: Blue").unwrap(), "Blue");
        assert_eq!(answer.extract("blue"), None);
        let two = regex(r"(a)(b)").unwrap_err();
        assert!(
            two.contains("2 capture groups") && two.contains("(?:"),
            "{two}"
        );
        let none = regex(r"ab").unwrap_err();
        assert!(none.contains("0 capture groups"), "{none}");
        let broken = regex(r"(a").unwrap_err();
        assert!(
            broken.starts_with("spec.aggregation.answer.pattern is not a valid"),
            "{broken}"
        );
    }

    #[test]
    fn a_json_field_is_read_from_the_object_and_required_by_the_schema() {
        let field =
            Extractor::compile(Some(&spec(AnswerType::JsonField, None, Some("result")))).unwrap();
        assert_eq!(
            field
                .extract(r#"{"reasoning": "2+2", "result": 4.0}"#)
                .unwrap(),
            "4"
        );
        assert_eq!(
            field
                .extract("```json\n{\"result\": \" Blue \"}\n```")
                .unwrap(),
            "blue"
        );
        assert_eq!(field.extract(r#"{"other": 1}"#), None);
        assert_eq!(field.extract(r#"{"result": 1e21}"#).unwrap(), "1e+21");
        assert_eq!(field.extract("not json"), None);
        let (_, schema) = field.schema().unwrap();
        assert_eq!(
            schema["required"],
            serde_json::json!(["reasoning", "result"])
        );
        assert_eq!(Extractor::Whole.schema(), None);
    }
}
