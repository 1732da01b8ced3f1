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
}

/// Groups the candidates by the answer `extract` finds in them and picks the winner: by
/// votes, then total gate score (`weighted` puts the score first), then the first given,
/// so the result does not depend on timing. `None` when no candidate has an answer.
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
        match groups.iter_mut().find(|g| g.answer == answer) {
            Some(group) => {
                group.votes += 1;
                group.score += u32::from(score);
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
            }),
        }
    }
    let of = groups.iter().map(|g| g.votes).sum::<usize>();
    let key = |g: &Group| {
        if weighted {
            (g.score, g.votes as u32)
        } else {
            (g.votes as u32, g.score)
        }
    };
    // Groups are in first-given order, so on equal keys the earliest stays ahead.
    let mut ranked: Vec<&Group> = groups.iter().collect();
    ranked.sort_by_key(|g| std::cmp::Reverse(key(g)));
    let winner = *ranked.first()?;
    let decided_by = match ranked.get(1).map(|second| (key(winner), key(second))) {
        None => Decision::Majority,
        Some(((first, _), (second, _))) if first > second => {
            if weighted {
                Decision::GateScore
            } else {
                Decision::Majority
            }
        }
        Some((a, b)) if a > b => {
            if weighted {
                Decision::Majority
            } else {
                Decision::GateScore
            }
        }
        Some(_) => Decision::FirstGiven,
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

    #[test]
    fn the_best_scored_output_reports_its_group() {
        let votes = [c(0, "x: 4", Some(60)), c(1, "so 4", Some(80))];
        assert_eq!(vote(&votes, &last_number(), false).unwrap().index, 1);
    }
}
