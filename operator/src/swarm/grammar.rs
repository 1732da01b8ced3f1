//! Constrained decoding for the formats a job checks. The inference worker (mistral.rs with
//! llguidance) takes a `grammar` on a chat completion and samples only tokens the grammar
//! allows, so a model of any size emits output that parses; whether it is any good is
//! still the gate's call.

use serde::Serialize;
use serde_json::json;

use crate::api::{OutputCheck, OutputCheckType};

/// The worker's `grammar` request field.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Grammar {
    /// llguidance's dialect of Lark.
    Lark(String),
    /// Any JSON value the schema accepts.
    JsonSchema(serde_json::Value),
}

/// A well-formed SVG drawing: shapes, paths, text, one level of groups and gradients, with
/// `xmlns` and a `viewBox` so browsers render it as a file. Each element takes its
/// attributes once, in a fixed order, with typed values, and counts and lengths are bounded:
/// given free attributes, nesting or repetition, small models repeat attributes (not
/// well-formed XML) or elements until they run out of tokens. A grammar cannot make a
/// document close within `maxTokens`; the bounds make it likely. Nothing may follow
/// `</svg>`, so the worker stops there.
const SVG: &str = r#"start: svg
svg: "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"" NUM " " NUM " " NUM " " NUM "\"" size? ">" body "</svg>"
size: " width=\"" NUM "\" height=\"" NUM "\""
body: (WS? (leaf | group | gradient)){0,12} WS?
group: "<g" (" transform=\"" TRANSFORM "\"")? paint ">" (WS? leaf){0,8} WS? "</g>"
leaf: rect | circle | ellipse | line | polyline | polygon | path | text | title
rect: "<rect x=\"" NUM "\" y=\"" NUM "\" width=\"" NUM "\" height=\"" NUM "\"" (" rx=\"" NUM "\"")? paint "/>"
circle: "<circle cx=\"" NUM "\" cy=\"" NUM "\" r=\"" NUM "\"" paint "/>"
ellipse: "<ellipse cx=\"" NUM "\" cy=\"" NUM "\" rx=\"" NUM "\" ry=\"" NUM "\"" paint "/>"
line: "<line x1=\"" NUM "\" y1=\"" NUM "\" x2=\"" NUM "\" y2=\"" NUM "\"" paint "/>"
polyline: "<polyline points=\"" POINTS "\"" paint "/>"
polygon: "<polygon points=\"" POINTS "\"" paint "/>"
path: "<path d=\"" PATH "\"" paint "/>"
text: "<text x=\"" NUM "\" y=\"" NUM "\"" (" font-size=\"" NUM "\"")? paint ">" TEXT "</text>"
title: "<title>" TEXT "</title>"
gradient: "<linearGradient id=\"" ID "\">" stop{1,4} WS? "</linearGradient>" | "<radialGradient id=\"" ID "\">" stop{1,4} WS? "</radialGradient>"
stop: WS? "<stop offset=\"" NUM "%\" stop-color=\"" COLOR "\"/>"
paint: (" fill=\"" COLOR "\"")? (" stroke=\"" COLOR "\"")? (" stroke-width=\"" NUM "\"")? (" opacity=\"" NUM "\"")?
NUM: /-?[0-9]{1,4}(\.[0-9]{1,2})?/
COLOR: /#[0-9a-fA-F]{6}|#[0-9a-fA-F]{3}|none|[a-z]{3,20}|url\(#[a-zA-Z][-a-zA-Z0-9_]{0,30}\)/
ID: /[a-zA-Z][-a-zA-Z0-9_]{0,30}/
POINTS: /-?[0-9]{1,4}(\.[0-9])?,-?[0-9]{1,4}(\.[0-9])?( -?[0-9]{1,4}(\.[0-9])?,-?[0-9]{1,4}(\.[0-9])?){1,12}/
PATH: /[MmLlHhVvCcSsQqTtAaZz][MmLlHhVvCcSsQqTtAaZz0-9., -]{0,80}/
TRANSFORM: /(translate|rotate|scale)\(-?[0-9]{1,4}(\.[0-9]{1,2})?([ ,]-?[0-9]{1,4}(\.[0-9]{1,2})?){0,2}\)/
TEXT: /[^<&]{1,120}/
WS: /[ \t\r\n]{1,8}/
"#;

/// The grammar under which every output passes `checks`' format, if there is one: for
/// `svg` and `json`. An `xml` check allows any element names, which no grammar can pair
/// with their closing tags, and a `regex` check searches the output rather than matching
/// all of it; those are left to the checks, as is a `tests` check, which runs code.
pub fn for_checks(checks: &[OutputCheck]) -> Option<Grammar> {
    let mut formats = checks
        .iter()
        .map(|check| check.type_)
        .filter(|t| matches!(t, OutputCheckType::Svg | OutputCheckType::Json));
    let format = formats.next()?;
    // An output cannot be both; the checks will say so.
    if formats.any(|other| other != format) {
        return None;
    }
    Some(match format {
        OutputCheckType::Svg => Grammar::Lark(SVG.to_owned()),
        _ => Grammar::JsonSchema(json!({})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(type_: OutputCheckType) -> OutputCheck {
        OutputCheck {
            type_,
            pattern: (type_ == OutputCheckType::Regex).then(|| "x".to_owned()),
            tests: None,
        }
    }

    #[test]
    fn svg_and_json_checks_choose_their_grammar() {
        use OutputCheckType::*;
        assert_eq!(for_checks(&[]), None);
        assert_eq!(for_checks(&[check(Xml), check(Regex)]), None);
        assert!(
            matches!(for_checks(&[check(Regex), check(Svg)]), Some(Grammar::Lark(g)) if g.starts_with("start: svg"))
        );
        assert_eq!(
            for_checks(&[check(Json), check(Json)]),
            Some(Grammar::JsonSchema(json!({})))
        );
        assert_eq!(for_checks(&[check(Svg), check(Json)]), None);
    }

    #[test]
    fn serializes_as_the_worker_expects() {
        assert_eq!(
            serde_json::to_value(Grammar::JsonSchema(json!({}))).unwrap(),
            json!({"type": "json_schema", "value": {}})
        );
        assert_eq!(
            serde_json::to_value(Grammar::Lark("start: \"a\"".into())).unwrap(),
            json!({"type": "lark", "value": "start: \"a\""})
        );
    }
}
