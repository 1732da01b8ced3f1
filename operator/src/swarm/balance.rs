//! Which replica of a pool takes the next call.
//!
//! Two wishes pull apart: calls that share a prompt prefix should land on the same replica,
//! whose prefix cache then skips the shared part, and no replica should sit idle while
//! another queues. Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
//! 2018; what Envoy and HAProxy ship) reconciles them: a call goes to the first replica in
//! its key's rendezvous order whose outstanding calls stay within `LOAD_FACTOR` times the
//! average, so affinity holds until it would overload a replica, and then the overflow
//! spills to the next replica in the same order (which keeps a second warm cache).

use std::hash::{DefaultHasher, Hash, Hasher};

/// How far above the average load a replica may go before an affine call spills over.
/// 1.25 is the factor the bounded-loads paper and Envoy's default use.
const LOAD_FACTOR: f64 = 1.25;

/// What the balancer sees of one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Calls sent to it and not yet answered.
    pub outstanding: usize,
    /// Recently failed (refused connection, timeout, 5xx): skipped while others are fine.
    pub ejected: bool,
}

/// Index of the replica for the next call, or `None` when there are none. `key` is the
/// hash of the shared prompt prefix; `None` means no affinity (least outstanding wins),
/// `ids` name the replicas stably (their URLs) so the order survives replicas coming and
/// going. Ejected replicas are used only when every replica is ejected.
pub fn pick(ids: &[&str], loads: &[Load], key: Option<u64>, rotation: usize) -> Option<usize> {
    debug_assert_eq!(ids.len(), loads.len());
    if ids.is_empty() {
        return None;
    }
    let healthy: Vec<usize> = (0..ids.len()).filter(|&i| !loads[i].ejected).collect();
    let candidates = if healthy.is_empty() {
        (0..ids.len()).collect()
    } else {
        healthy
    };
    let Some(key) = key else {
        // Least outstanding; ties go round robin so equal replicas share the work.
        let n = candidates.len();
        return (0..n)
            .map(|k| candidates[(k + rotation) % n])
            .min_by_key(|&i| loads[i].outstanding);
    };
    let total: usize = candidates.iter().map(|&i| loads[i].outstanding).sum();
    let bound = (LOAD_FACTOR * (total + 1) as f64 / candidates.len() as f64).ceil() as usize;
    let mut order = candidates;
    order.sort_by_key(|&i| std::cmp::Reverse(rendezvous(key, ids[i])));
    order
        .iter()
        .copied()
        .find(|&i| loads[i].outstanding < bound)
        .or_else(|| order.iter().copied().min_by_key(|&i| loads[i].outstanding))
}

/// Highest-random-weight score of a replica for a key: each key ranks every replica, and
/// removing one replica moves only the keys that ranked it first.
fn rendezvous(key: u64, id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    id.hash(&mut hasher);
    hasher.finish()
}

/// The affinity key of a prompt prefix.
pub fn prefix_key(prefix: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    prefix.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(n: usize) -> Vec<Load> {
        vec![
            Load {
                outstanding: 0,
                ejected: false
            };
            n
        ]
    }

    const IDS: [&str; 3] = ["http://a:8080", "http://b:8080", "http://c:8080"];

    #[test]
    fn no_replicas_no_pick() {
        assert_eq!(pick(&[], &[], Some(1), 0), None);
        assert_eq!(pick(&[], &[], None, 0), None);
    }

    #[test]
    fn without_a_key_the_least_loaded_replica_wins_and_ties_rotate() {
        let mut loads = idle(3);
        loads[0].outstanding = 2;
        loads[1].outstanding = 1;
        loads[2].outstanding = 1;
        assert_eq!(pick(&IDS, &loads, None, 0), Some(1));
        assert_eq!(pick(&IDS, &loads, None, 1), Some(1));
        assert_eq!(pick(&IDS, &loads, None, 2), Some(2));
    }

    #[test]
    fn one_key_sticks_to_one_replica_while_loads_are_even() {
        let key = prefix_key("You review Go code.");
        let first = pick(&IDS, &idle(3), Some(key), 0).unwrap();
        for rotation in 0..10 {
            assert_eq!(pick(&IDS, &idle(3), Some(key), rotation), Some(first));
        }
    }

    #[test]
    fn different_keys_spread_over_replicas() {
        let used: std::collections::BTreeSet<usize> = (0..64)
            .map(|k| pick(&IDS, &idle(3), Some(prefix_key(&format!("task {k}"))), 0).unwrap())
            .collect();
        assert_eq!(used.len(), 3, "64 prefixes all hashed to {used:?}");
    }

    #[test]
    fn an_affine_replica_spills_over_once_above_the_bound() {
        // Ten calls of one job (one shared prefix) placed one after another, none finishing:
        // affinity must not pile all ten on one replica.
        let key = prefix_key("shared system prompt");
        let mut loads = idle(2);
        for _ in 0..10 {
            let i = pick(&IDS[..2], &loads, Some(key), 0).unwrap();
            loads[i].outstanding += 1;
        }
        let (a, b) = (loads[0].outstanding, loads[1].outstanding);
        assert_eq!(a + b, 10);
        // The bound: no replica above ceil(1.25 x the average of 5).
        assert!(a.max(b) <= 7, "affinity overloaded one replica: {a} vs {b}");
        assert!(
            a.max(b) > 5,
            "the affine replica takes more than an even share"
        );
    }

    #[test]
    fn ejected_replicas_are_skipped_unless_all_are() {
        let key = prefix_key("p");
        let mut loads = idle(3);
        let first = pick(&IDS, &loads, Some(key), 0).unwrap();
        loads[first].ejected = true;
        let second = pick(&IDS, &loads, Some(key), 0).unwrap();
        assert_ne!(second, first);
        assert_ne!(pick(&IDS, &loads, None, 0), Some(first));
        for load in &mut loads {
            load.ejected = true;
        }
        assert!(pick(&IDS, &loads, Some(key), 0).is_some());
    }

    #[test]
    fn removing_a_replica_moves_only_its_keys() {
        let keys: Vec<u64> = (0..100).map(|k| prefix_key(&format!("job {k}"))).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| pick(&IDS, &idle(3), Some(k), 0).unwrap())
            .collect();
        // Drop replica 2; keys that were on 0 or 1 stay there.
        let after: Vec<usize> = keys
            .iter()
            .map(|&k| pick(&IDS[..2], &idle(2), Some(k), 0).unwrap())
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 2 {
                assert_eq!(a, b);
            }
        }
    }
}
