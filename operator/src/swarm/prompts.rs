//! What the engine says to the models, and how it reads their structured answers.

use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const PLANNER: &str = "You split a task into independent subtasks for parallel workers. \
Each subtask must be self-contained, specific, and different from the others. \
Answer with JSON only.";

const GATE: &str = "You are an adversarial reviewer. Look for what is wrong with the answer: \
factual errors, missed requirements, broken format, unsupported claims. Do not reward length \
or confidence. Give a score from 0 (useless) to 100 (flawless), pass only if the answer fully \
does its part of the task, and list each issue in one sentence. Answer with JSON only.";

/// What introduces a subagent's own part after the task.
pub const SUBTASK: &str = "Your part of this task: ";

const SYNTHESIZER: &str = "You merge several verified answers to the same task into one final \
answer. Keep what they agree on and every correct detail only one of them found; drop \
repetition and anything contradicted. Answer the task directly.";

pub fn system(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestSystemMessage::from(text).into()
}

pub fn user(text: impl Into<String>) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessage::from(text.into()).into()
}

pub fn assistant(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestAssistantMessage {
        content: Some(text.into()),
        ..Default::default()
    }
    .into()
}

/// The planner's conversation and the schema its answer must follow.
pub fn plan(
    task: &str,
    custom: Option<&str>,
    n: usize,
) -> (Vec<ChatCompletionRequestMessage>, Value) {
    let instructions = custom.unwrap_or(PLANNER);
    let messages = vec![
        system(instructions),
        user(format!(
            "Task:\n{task}\n\nSplit it into exactly {n} subtasks. Answer as {{\"subtasks\": [\"...\"]}}."
        )),
    ];
    let schema = json!({
        "type": "object",
        "properties": {
            "subtasks": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": n,
                "maxItems": n
            }
        },
        "required": ["subtasks"],
        "additionalProperties": false
    });
    (messages, schema)
}

/// Reads the planner's answer: exactly `n` non-empty subtasks, or why not.
pub fn read_plan(answer: &str, n: usize) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Plan {
        subtasks: Vec<String>,
    }
    let plan: Plan = serde_json::from_str(json_text(answer))
        .map_err(|err| format!("the planner's answer is not the requested JSON: {err}"))?;
    if plan.subtasks.len() != n {
        return Err(format!(
            "the planner wrote {} subtasks, the job has {n} subagents",
            plan.subtasks.len()
        ));
    }
    if plan.subtasks.iter().any(|s| s.trim().is_empty()) {
        return Err("the planner wrote an empty subtask".to_owned());
    }
    Ok(plan
        .subtasks
        .into_iter()
        .map(|s| s.trim().to_owned())
        .collect())
}

/// A subagent's conversation: the task exactly as the user wrote it, in the user turn, as
/// a direct call of the model would send it, so going through kubeswarm never makes an
/// answer worse. A subtask follows the task in the same turn: every subagent of a job
/// then shares the task as its prompt prefix, which a replica's prefix cache serves.
///
/// No system message: put there, the task followed by a bare "do the task" turn reads
/// to small models as a yes/no question, and they answer "Yes."
pub fn subagent(task: &str, subtask: Option<&str>) -> Vec<ChatCompletionRequestMessage> {
    match subtask {
        None => vec![user(task)],
        Some(subtask) => vec![user(format!("{task}\n\n{SUBTASK}{subtask}"))],
    }
}

/// A subagent's conversation extended with its first answer and the critique of it.
pub fn repair(
    mut conversation: Vec<ChatCompletionRequestMessage>,
    previous: &str,
    issues: &[String],
) -> Vec<ChatCompletionRequestMessage> {
    let list: Vec<String> = issues.iter().map(|i| format!("- {i}")).collect();
    conversation.push(assistant(previous));
    conversation.push(user(format!(
        "A reviewer rejected this answer:\n{}\nWrite the complete answer again with these problems fixed.",
        list.join("\n")
    )));
    conversation
}

/// The gate's verdict on one output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub pass: bool,
    pub score: u8,
    pub issues: Vec<String>,
}

/// The gate's conversation about one output and the schema of its verdict.
pub fn critique(
    task: &str,
    subtask: Option<&str>,
    output: &str,
    answer: Option<Option<String>>,
) -> (Vec<ChatCompletionRequestMessage>, Value) {
    let part = subtask
        .map(|s| format!("\n\nThe answer's part of the task:\n{s}"))
        .unwrap_or_default();
    // Where the job says how to find the answer, the gate judges that answer, not the
    // prose around it.
    let found = match answer {
        None => String::new(),
        Some(Some(answer)) => format!("\n\nThe final answer it gives: {answer}"),
        Some(None) => "\n\nIt gives no final answer in the form the task asks for.".to_owned(),
    };
    let messages = vec![
        system(GATE),
        user(format!(
            "Task:\n{task}{part}\n\nAnswer to review:\n{output}{found}\n\nReply as {{\"issues\": [one sentence per problem], \"score\": 0-100, \"pass\": true|false}}."
        )),
    ];
    let schema = json!({
        "type": "object",
        // Issues first: a model that decodes its verdict in this order finds the problems
        // before it commits to a score and a pass.
        "properties": {
            // Bounded, so a verdict always fits its tokens (VERDICT_TOKENS) however much
            // the gate repeats itself.
            "issues": {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 5},
            "score": {"type": "integer", "minimum": 0, "maximum": 100},
            "pass": {"type": "boolean"}
        },
        "required": ["issues", "score", "pass"],
        "additionalProperties": false
    });
    (messages, schema)
}

/// Reads the gate's verdict, or says why it cannot.
pub fn read_verdict(answer: &str) -> Result<Verdict, String> {
    let verdict: Verdict = serde_json::from_str(json_text(answer))
        .map_err(|err| format!("the gate's verdict is not the requested JSON: {err}"))?;
    if verdict.score > 100 {
        return Err(format!("the gate's score {} is above 100", verdict.score));
    }
    Ok(verdict)
}

/// The synthesis conversation over the outputs that passed.
pub fn synthesize(
    task: &str,
    custom: Option<&str>,
    outputs: &[&str],
) -> Vec<ChatCompletionRequestMessage> {
    let numbered: Vec<String> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| format!("Answer {}:\n{o}", i + 1))
        .collect();
    vec![
        system(custom.unwrap_or(SYNTHESIZER)),
        user(format!("Task:\n{task}\n\n{}", numbered.join("\n\n"))),
    ]
}

/// The JSON object in an answer: constrained decoding gives bare JSON, but a server that
/// ignores `response_format` may wrap it in a fence or a sentence.
fn json_text(answer: &str) -> &str {
    let text = super::checks::document(answer, |t| t.starts_with('{'));
    match (text.find('{'), text.rfind('}')) {
        (Some(start), Some(end)) if start < end => &text[start..=end],
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_writes_its_issues_before_its_score_and_pass() {
        // The order reaches the grammar only as the serialized schema's key order.
        let (_, schema) = critique("t", None, "o", None);
        let text = schema.to_string();
        let at = |key: &str| text.find(&format!("\"{key}\":{{")).unwrap();
        assert!(
            at("issues") < at("score") && at("score") < at("pass"),
            "{text}"
        );
    }

    #[test]
    fn plans_are_read_strictly() {
        assert_eq!(
            read_plan(r#"{"subtasks": [" a ", "b"]}"#, 2).unwrap(),
            ["a", "b"]
        );
        assert!(
            read_plan(r#"{"subtasks": ["a"]}"#, 2)
                .unwrap_err()
                .contains("wrote 1 subtasks")
        );
        assert!(
            read_plan(r#"{"subtasks": ["a", " "]}"#, 2)
                .unwrap_err()
                .contains("empty subtask")
        );
        assert!(
            read_plan("Sure! Here are the subtasks: 1. a 2. b", 2)
                .unwrap_err()
                .contains("not the requested JSON")
        );
        assert_eq!(
            read_plan("```json\n{\"subtasks\": [\"x\"]}\n```", 1).unwrap(),
            ["x"]
        );
    }

    #[test]
    fn verdicts_are_read_strictly() {
        let v = read_verdict(r#"{"pass": false, "score": 35, "issues": ["wrong line"]}"#).unwrap();
        assert_eq!(
            v,
            Verdict {
                pass: false,
                score: 35,
                issues: vec!["wrong line".into()]
            }
        );
        assert!(read_verdict(r#"{"pass": "yes", "score": 3, "issues": []}"#).is_err());
        assert!(read_verdict(r#"{"pass": true, "score": 300, "issues": []}"#).is_err());
        assert!(read_verdict("Looks good to me.").is_err());
    }

    fn only_user_turn(conversation: &[ChatCompletionRequestMessage]) -> String {
        let [ChatCompletionRequestMessage::User(message)] = conversation else {
            panic!("one user turn, no system message: {conversation:?}");
        };
        serde_json::to_value(message).unwrap()["content"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn a_subagent_gets_the_task_as_the_user_wrote_it() {
        let task = "Solve the math word problem. Reply with the final number only.\nTom has 3 apples and buys 4 more. How many does he have?";
        assert_eq!(only_user_turn(&subagent(task, None)), task);
    }

    #[test]
    fn subagents_of_a_job_share_their_prefix() {
        let a = only_user_turn(&subagent("Draw a gallery.", Some("A fox.")));
        let b = only_user_turn(&subagent("Draw a gallery.", Some("A lighthouse.")));
        assert_eq!(a, "Draw a gallery.\n\nYour part of this task: A fox.");
        assert!(b.starts_with("Draw a gallery.\n\nYour part of this task: "));
    }
}
