//! The votes: outputs grouped by the answer found in them, the heaviest group winning.

use super::aggregate::Candidate;
use super::answer::Extractor;
use crate::api::{Decision, Tally};

/// Longest answer a tally reports (the status field's bound).
const ANSWER_CHARS: usize = 256;

/// The winning answer of a vote and the subagent whose output reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Won {
    pub index: usize,
    pub tally: Tally,
}

/// One answer and the outputs that gave it.
struct Group {
    answer: String,
    /// The output that reports the answer: the best-scored, then the first given.
    index: usize,
    best: u8,
    votes: usize,
    score: u32,
    /// The outputs' confidences added up, in millionths, so the keys stay integers.
    confidence: u64,
}

/// Groups the candidates by the answer `extract` finds in them and picks the winner: by
/// votes, then total gate score (`weighted` puts the score first), then the model's total
/// confidence in the outputs that gave it, then the first given, so the result does not
/// depend on timing. `None` when no candidate has an answer.
///
/// Confidence only breaks ties: when every sample gives a different answer (a small model
/// sampled warm), the model's own certainty is the signal left, as in confidence-based
/// selection (self-certainty, arXiv 2502.18581; DeepConf, arXiv 2508.15260); it never
/// outvotes a majority. Outputs without one (other servers, records written before it was
/// kept) count as 0.
pub fn vote(candidates: &[Candidate], extract: &Extractor, weighted: bool) -> Option<Won> {
    let mut sorted = candidates.to_vec();
    sorted.sort_by_key(|c| c.index);
    let mut groups: Vec<Group> = Vec::new();
    let mut unanswered = 0;
    for candidate in &sorted {
        let Some(answer) = extract.extract(candidate.output) else {
            unanswered += 1;
            continue;
        };
        let score = candidate.score.unwrap_or(0);
        let confidence = candidate.confidence_ppm();
        match groups.iter_mut().find(|g| g.answer == answer) {
            Some(group) => {
                group.votes += 1;
                group.score += u32::from(score);
                group.confidence += confidence;
                if score > group.best {
                    (group.index, group.best) = (candidate.index, score);
                }
            }
            None => groups.push(Group {
                answer,
                index: candidate.index,
                best: score,
                votes: 1,
                score: u32::from(score),
                confidence,
            }),
        }
    }
    let of = groups.iter().map(|g| g.votes).sum::<usize>();
    // The ranking key, and what each of its parts stands for, in order.
    let key = |g: &Group| -> [u64; 3] {
        let (votes, score) = (g.votes as u64, u64::from(g.score));
        if weighted {
            [score, votes, g.confidence]
        } else {
            [votes, score, g.confidence]
        }
    };
    let decisions = if weighted {
        [
            Decision::GateScore,
            Decision::Majority,
            Decision::Confidence,
        ]
    } else {
        [
            Decision::Majority,
            Decision::GateScore,
            Decision::Confidence,
        ]
    };
    // Groups are in first-given order, so on equal keys the earliest stays ahead.
    let mut ranked: Vec<&Group> = groups.iter().collect();
    ranked.sort_by_key(|g| std::cmp::Reverse(key(g)));
    let winner = *ranked.first()?;
    let decided_by = match ranked.get(1) {
        None => Decision::Majority,
        Some(second) => {
            let (a, b) = (key(winner), key(second));
            // The first part of the key that differs decided.
            a.iter()
                .zip(b)
                .position(|(a, b)| *a != b)
                .map_or(Decision::FirstGiven, |i| decisions[i])
        }
    };
    Some(Won {
        index: winner.index,
        tally: Tally {
            answer: winner.answer.chars().take(ANSWER_CHARS).collect(),
            votes: winner.votes as i32,
            of: of as i32,
            unanswered,
            decided_by,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AnswerSpec, AnswerType};
    use crate::swarm::aggregate::tests::c;

    fn last_number() -> Extractor {
        Extractor::compile(Some(&AnswerSpec {
            type_: AnswerType::LastNumber,
            pattern: None,
            field: None,
        }))
        .unwrap()
    }

    fn tally(won: Option<Won>) -> (usize, String, i32, i32, i32, Decision) {
        let won = won.unwrap();
        let t = won.tally;
        (
            won.index,
            t.answer,
            t.votes,
            t.of,
            t.unanswered,
            t.decided_by,
        )
    }

    #[test]
    fn the_majority_of_whole_answers_wins() {
        let votes = [
            c(0, "Lyon", None),
            c(1, "paris", None),
            c(2, "Paris.", None),
            c(3, "Nice", None),
        ];
        assert_eq!(
            tally(vote(&votes, &Extractor::Whole, false)),
            (1, "paris".into(), 2, 4, 0, Decision::Majority)
        );
    }

    #[test]
    fn reasoned_outputs_vote_with_the_answer_they_end_on() {
        let votes = [
            c(0, "3 boxes of 4 is 12, minus 2 eaten: 10", None),
            c(1, "She has 3 * 4 = 12 pens.\nThe answer is 12.", None),
            c(2, "4 + 4 + 4 = 12, so 12", None),
            c(3, "I cannot tell.", None),
        ];
        assert_eq!(
            tally(vote(&votes, &last_number(), false)),
            (1, "12".into(), 2, 3, 1, Decision::Majority)
        );
        let nothing = [c(0, "no idea", None)];
        assert_eq!(vote(&nothing, &last_number(), false), None);
    }

    #[test]
    fn ties_go_to_the_higher_score_then_the_first_answer() {
        let by_score = [c(0, "a", Some(50)), c(1, "b", Some(90))];
        assert_eq!(
            tally(vote(&by_score, &Extractor::Whole, false)),
            (1, "b".into(), 1, 2, 0, Decision::GateScore)
        );
        let by_order = [c(3, "b", None), c(2, "a", None)];
        assert_eq!(
            tally(vote(&by_order, &Extractor::Whole, false)),
            (2, "a".into(), 1, 2, 0, Decision::FirstGiven)
        );
        assert_eq!(vote(&[], &Extractor::Whole, false), None);
    }

    #[test]
    fn a_weighted_vote_lets_confident_verdicts_outvote_a_weak_majority() {
        let votes = [
            c(0, "7", Some(55)),
            c(1, "7", Some(52)),
            c(2, "9", Some(95)),
            c(3, "9", Some(90)),
            c(4, "7", Some(51)),
        ];
        assert_eq!(
            tally(vote(&votes, &Extractor::Whole, true)),
            (2, "9".into(), 2, 5, 0, Decision::GateScore)
        );
        assert_eq!(
            tally(vote(&votes, &Extractor::Whole, false)),
            (0, "7".into(), 3, 5, 0, Decision::Majority)
        );
        // Equal weight: the votes decide.
        let even = [
            c(0, "7", Some(50)),
            c(1, "7", Some(50)),
            c(2, "9", Some(100)),
        ];
        assert_eq!(
            tally(vote(&even, &Extractor::Whole, true)),
            (0, "7".into(), 2, 3, 0, Decision::Majority)
        );
    }

    /// A candidate the model was `confidence` sure of.
    fn sure(index: usize, output: &str, confidence: f64) -> Candidate<'_> {
        Candidate {
            confidence: Some(confidence),
            ..c(index, output, None)
        }
    }

    #[test]
    fn a_tie_goes_to_the_answer_the_model_was_surest_of_and_never_outvotes() {
        // Every sample a different answer: the surest wins, not the first.
        let apart = [
            sure(0, "so 41", 0.62),
            sure(1, "so 42", 0.91),
            sure(2, "43", 0.7),
        ];
        assert_eq!(
            tally(vote(&apart, &last_number(), false)),
            (1, "42".into(), 1, 3, 0, Decision::Confidence)
        );
        // Two against two: the pair the model was surer of in all.
        let pairs = [
            sure(0, "7", 0.9),
            sure(1, "9", 0.8),
            sure(2, "7", 0.5),
            sure(3, "9", 0.8),
        ];
        assert_eq!(
            tally(vote(&pairs, &Extractor::Whole, false)),
            (1, "9".into(), 2, 4, 0, Decision::Confidence)
        );
        // Two unsure votes still beat one sure one, and the gate's score comes first.
        let majority = [sure(0, "7", 0.2), sure(1, "9", 0.99), sure(2, "7", 0.3)];
        assert_eq!(
            tally(vote(&majority, &Extractor::Whole, false)),
            (0, "7".into(), 2, 3, 0, Decision::Majority)
        );
        let scored = [
            Candidate {
                score: Some(90),
                ..sure(0, "7", 0.2)
            },
            Candidate {
                score: Some(60),
                ..sure(1, "9", 0.99)
            },
        ];
        assert_eq!(
            tally(vote(&scored, &Extractor::Whole, true)),
            (0, "7".into(), 1, 2, 0, Decision::GateScore)
        );
        // A server with no log-probabilities: the first given, as before.
        let unknown = [c(0, "7", None), sure(1, "9", 0.0)];
        assert_eq!(
            tally(vote(&unknown, &Extractor::Whole, false)),
            (0, "7".into(), 1, 2, 0, Decision::FirstGiven)
        );
    }

    #[test]
    fn the_best_scored_output_reports_its_group() {
        let votes = [c(0, "x: 4", Some(60)), c(1, "so 4", Some(80))];
        assert_eq!(vote(&votes, &last_number(), false).unwrap().index, 1);
    }
}
