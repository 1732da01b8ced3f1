//! Deterministic checks of an output, run before the gate model sees it.

use std::time::Duration;

use regex::Regex;

use super::sandbox::Program;
use crate::api::{OutputCheck, OutputCheckType};

/// A check ready to run: regular expressions compiled once per job.
#[derive(Debug, Clone)]
pub enum Check {
    Json,
    Xml,
    Svg,
    Regex(Regex),
    /// Runs in a sandbox, after every other check has passed: see `programs`.
    Tests {
        prelude: String,
        source: String,
        timeout: Duration,
    },
}

/// Compiles the job's checks; a bad pattern names the check.
pub fn compile(checks: &[OutputCheck]) -> Result<Vec<Check>, String> {
    checks
        .iter()
        .enumerate()
        .map(|(i, check)| match check.type_ {
            OutputCheckType::Json => Ok(Check::Json),
            OutputCheckType::Xml => Ok(Check::Xml),
            OutputCheckType::Svg => Ok(Check::Svg),
            OutputCheckType::Regex => {
                let pattern = check.pattern.as_deref().unwrap_or_default();
                Regex::new(pattern).map(Check::Regex).map_err(|err| {
                    format!("spec.verification.checks[{i}].pattern is not a valid regular expression: {err}")
                })
            }
            OutputCheckType::Tests => {
                let tests = check.tests.as_ref().ok_or_else(|| {
                    format!("spec.verification.checks[{i}].tests is required for type tests")
                })?;
                Ok(Check::Tests {
                    prelude: tests.prelude.clone().unwrap_or_default(),
                    source: tests.source.clone(),
                    timeout: Duration::from_secs(tests.timeout_seconds.clamp(1, 300) as u64),
                })
            }
        })
        .collect()
}

/// The programs an output's `tests` checks run: the prelude, the output's code (its
/// first fenced block, or all of it), the tests, then a marker line printed straight to
/// the standard output, as one file.
pub fn programs(checks: &[Check], output: &str) -> Vec<Program> {
    checks
        .iter()
        .filter_map(|check| match check {
            Check::Tests {
                prelude,
                source,
                timeout,
            } => {
                let marker = format!("kubeswarm-tests-finished-{:016x}", rand::random::<u64>());
                let code = code(output);
                // `from __future__` imports must open the file; they are moved there.
                let (future, prelude) = split_future(prelude);
                let (future_too, code) = split_future(&code);
                Some(Program {
                    // Not `__main__`: a model's `if __name__ == "__main__":` block (input(),
                    // sys.exit()) stays out of the way of the tests.
                    source: format!(
                        "{future}{future_too}__name__ = \"kubeswarm_tests\"\n{prelude}\n\n{code}\n\n{source}\n\nimport os as _kubeswarm_os\n_kubeswarm_os.write(1, b\"\\n{marker}\\n\")\n"
                    ),
                    timeout: *timeout,
                    marker,
                })
            }
            _ => None,
        })
        .collect()
}

/// The code in an output: its first fenced block when it has one (models explain around
/// their code), else the whole output; indented as a whole, dedented.
fn code(output: &str) -> String {
    dedent(fenced_body(output).unwrap_or(output))
}

/// `text` without the indentation all its lines share, and without blank lines around it.
fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text
        .trim_end()
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start_matches([' ', '\t']).len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `from __future__ import` lines of `code` (each with its newline), and the rest.
fn split_future(code: &str) -> (String, String) {
    let (future, rest): (Vec<&str>, Vec<&str>) = code
        .lines()
        .partition(|l| l.starts_with("from __future__ import"));
    let future: String = future.iter().map(|l| format!("{l}\n")).collect();
    (future, rest.join("\n"))
}

/// Problems an output has, one line each; empty when it passes every check.
pub fn run(checks: &[Check], output: &str) -> Vec<String> {
    checks
        .iter()
        .filter_map(|check| check.problem(output))
        .collect()
}

impl Check {
    fn problem(&self, output: &str) -> Option<String> {
        match self {
            Check::Json => {
                let text = document(output, |t| t.starts_with('{') || t.starts_with('['));
                serde_json::from_str::<serde_json::Value>(text)
                    .err()
                    .map(|err| format!("the output is not valid JSON: {err}"))
            }
            Check::Xml => {
                let text = document(output, |t| t.starts_with('<'));
                roxmltree::Document::parse(text)
                    .err()
                    .map(|err| format!("the output is not well-formed XML: {err}"))
            }
            Check::Svg => {
                let text = svg_document(output);
                match roxmltree::Document::parse(text) {
                    Err(err) => Some(format!("the output is not well-formed SVG: {err}")),
                    Ok(doc) if doc.root_element().tag_name().name() != "svg" => Some(format!(
                        "the output's root element is <{}>, not <svg>",
                        doc.root_element().tag_name().name()
                    )),
                    // Well-formed is not yet a picture.
                    Ok(_) => super::render::blank(text),
                }
            }
            Check::Regex(regex) => (!regex.is_match(output))
                .then(|| format!("the output does not match the pattern {}", regex.as_str())),
            Check::Tests { .. } => None,
        }
    }
}

/// The part of an output a check reads: the whole output when it looks like the format,
/// else its first fenced code block (models like to wrap answers in ```).
pub fn document(output: &str, looks_right: impl Fn(&str) -> bool) -> &str {
    let trimmed = output.trim();
    if looks_right(trimmed) {
        return trimmed;
    }
    fenced_block(trimmed).unwrap_or(trimmed)
}

/// The SVG document in an output: the output itself, its first fenced block, or the
/// span from `<svg` to the last `</svg>` when the model wrote a sentence around it.
pub fn svg_document(output: &str) -> &str {
    let text = document(output, |t| t.starts_with('<'));
    if text.starts_with('<') {
        return text;
    }
    match (text.find("<svg"), text.rfind("</svg>")) {
        (Some(start), Some(end)) if start < end => &text[start..end + "</svg>".len()],
        _ => text,
    }
}

fn fenced_block(text: &str) -> Option<&str> {
    fenced_body(text).map(str::trim)
}

/// The first fenced block's body as written, indentation included.
fn fenced_body(text: &str) -> Option<&str> {
    let start = text.find("```")?;
    let after_fence = &text[start + 3..];
    // Skip the info string (```json, ```svg).
    let body_start = after_fence.find('\n')? + 1;
    let body = &after_fence[body_start..];
    let end = body.find("```")?;
    Some(&body[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(type_: OutputCheckType, pattern: Option<&str>) -> Vec<Check> {
        compile(&[OutputCheck {
            type_,
            pattern: pattern.map(str::to_owned),
            tests: None,
        }])
        .unwrap()
    }

    #[test]
    fn json_accepts_plain_and_fenced_and_names_the_error() {
        let json = check(OutputCheckType::Json, None);
        assert!(run(&json, r#" {"a": 1} "#).is_empty());
        assert!(run(&json, "Here it is:\n```json\n[1, 2]\n```\nDone.").is_empty());
        let problems = run(&json, "{\"a\": }");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("the output is not valid JSON"),
            "{problems:?}"
        );
    }

    #[test]
    fn xml_must_be_well_formed() {
        let xml = check(OutputCheckType::Xml, None);
        assert!(run(&xml, "<a><b/></a>").is_empty());
        assert!(run(&xml, "<a><b></a>")[0].contains("not well-formed XML"));
    }

    #[test]
    fn svg_needs_an_svg_root_and_tolerates_prose_around_it() {
        let svg = check(OutputCheckType::Svg, None);
        let doc = r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 4 3"><rect width="4" height="3"/><circle cx="2" cy="1.5" r="1" fill="red"/></svg>"#;
        assert!(run(&svg, doc).is_empty());
        assert!(
            run(
                &svg,
                &format!("Here is my picture:\n{doc}\nI hope you like it.")
            )
            .is_empty()
        );
        assert!(run(&svg, &format!("```svg\n{doc}\n```")).is_empty());
        assert_eq!(
            run(&svg, "<html><body/></html>"),
            ["the output's root element is <html>, not <svg>"]
        );
        assert!(run(&svg, "<svg><rect></svg>")[0].contains("not well-formed SVG"));
        assert!(run(&svg, "a lighthouse")[0].contains("not well-formed SVG"));
        let nothing_drawn = r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 300 100 100"><path d="l" fill="red"/></svg>"#;
        assert!(run(&svg, nothing_drawn)[0].starts_with("the picture is blank"));
    }

    #[test]
    fn regex_must_match() {
        let regex = check(OutputCheckType::Regex, Some(r"^\d+$"));
        assert!(run(&regex, "42").is_empty());
        assert_eq!(
            run(&regex, "forty-two"),
            [r"the output does not match the pattern ^\d+$"]
        );
    }

    #[test]
    fn a_bad_pattern_is_an_error_naming_the_field() {
        let err = compile(&[
            OutputCheck {
                type_: OutputCheckType::Json,
                pattern: None,
                tests: None,
            },
            OutputCheck {
                type_: OutputCheckType::Regex,
                pattern: Some("(".into()),
                tests: None,
            },
        ])
        .unwrap_err();
        assert!(
            err.starts_with(
                "spec.verification.checks[1].pattern is not a valid regular expression"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_tests_check_wraps_the_outputs_code_and_no_other_check_runs_it() {
        let checks = compile(&[OutputCheck {
            type_: OutputCheckType::Tests,
            pattern: None,
            tests: Some(crate::api::TestsCheck {
                source: "assert add(2, 3) == 5".into(),
                prelude: Some("import math".into()),
                timeout_seconds: 4,
            }),
        }])
        .unwrap();
        let output =
            "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nUse it as add(1, 2).";
        assert!(run(&checks, output).is_empty());
        let [program] = programs(&checks, output).try_into().unwrap();
        assert_eq!(program.timeout, Duration::from_secs(4));
        assert!(program.marker.starts_with("kubeswarm-tests-finished-"));
        assert_eq!(
            program.source,
            format!(
                "__name__ = \"kubeswarm_tests\"\nimport math\n\ndef add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n\nimport os as _kubeswarm_os\n_kubeswarm_os.write(1, b\"\\n{}\\n\")\n",
                program.marker
            )
        );
        assert_eq!(code("  x = 1\n"), "x = 1");
        // An output indented as a whole keeps its shape; a future import opens the file.
        assert_eq!(
            code("\n    def f():\n        return 1\n"),
            "def f():\n    return 1"
        );
        let output = "```python\nfrom __future__ import annotations\ndef add(a: int, b: int) -> int:\n    return a + b\n```";
        let [program] = programs(&checks, output).try_into().unwrap();
        assert!(
            program
                .source
                .starts_with("from __future__ import annotations\n__name__ = "),
            "{}",
            program.source
        );
        assert!(programs(&check(OutputCheckType::Json, None), output).is_empty());
    }
}
