//! BPE training, pure Rust: count regex chunks, then merge the most frequent adjacent pair
//! again and again, keeping pair counts up to date incrementally.
//!
//! The result must be the exact greedy BPE: at every step the pair with the largest count over
//! the whole corpus, ties broken by the smaller pair `(a, b)`. That is what makes our merges
//! identical to PyPI rustbpe 0.1.0 and to the plain Python reference in tests/test_rustbpe.py.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::AHashMap;
use rayon::prelude::*;

use crate::split::Splitter;

/// Two adjacent token ids.
pub type Pair = (u32, u32);

/// Splits every text with `pattern` and counts how often each chunk occurs, in parallel.
/// The keys borrow from `texts`, so nothing is copied until the caller keeps a chunk.
pub fn count_chunks<'t>(
    splitter: &Splitter,
    texts: &'t [String],
) -> Result<AHashMap<&'t str, i64>, fancy_regex::Error> {
    texts
        .par_iter()
        .try_fold(AHashMap::new, |mut counts, text| {
            splitter.for_each_chunk(text, |chunk| *counts.entry(chunk).or_insert(0) += 1)?;
            Ok(counts)
        })
        .try_reduce(AHashMap::new, |a, b| Ok(add_counts(a, b)))
}

/// Adds the smaller map into the larger one (fewer hash operations than a fixed direction).
fn add_counts<K: std::hash::Hash + Eq>(
    a: AHashMap<K, i64>,
    b: AHashMap<K, i64>,
) -> AHashMap<K, i64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (key, count) in small {
        *big.entry(key).or_insert(0) += count;
    }
    big
}

/// A candidate merge in the max-heap. `count` may be stale (it only ever goes down after the
/// entry is pushed); the merge loop re-checks it against the live count before using it.
struct MergeJob {
    pair: Pair,
    count: i64,
    /// Indices of the words where `pair` occurs (a superset after earlier merges).
    words: Vec<u32>,
}

impl Ord for MergeJob {
    fn cmp(&self, other: &Self) -> Ordering {
        // Larger count first; on a tie the smaller pair wins (reversed so the max-heap pops it).
        self.count
            .cmp(&other.count)
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for MergeJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for MergeJob {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for MergeJob {}

/// Replaces every non-overlapping occurrence of `pair` in `ids` (left to right) by `new_id`, in
/// place, and reports each adjacent pair that disappears (-1) or appears (+1). The reported
/// deltas sum to the exact change of the word's pair counts, also for runs like `a a a a`.
pub fn merge_pair_in_word(
    ids: &mut Vec<u32>,
    pair: Pair,
    new_id: u32,
    mut on_change: impl FnMut(Pair, i64),
) {
    let (a, b) = pair;
    let n = ids.len();
    let (mut read, mut write) = (0, 0);
    while read < n {
        if read + 1 < n && ids[read] == a && ids[read + 1] == b {
            // The left neighbour is the already rewritten token (possibly `new_id` itself).
            if write > 0 {
                let left = ids[write - 1];
                on_change((left, a), -1);
                on_change((left, new_id), 1);
            }
            on_change(pair, -1);
            if read + 2 < n {
                let right = ids[read + 2];
                on_change((b, right), -1);
                on_change((new_id, right), 1);
            }
            ids[write] = new_id;
            read += 2;
        } else {
            ids[write] = ids[read];
            read += 1;
        }
        write += 1;
    }
    ids.truncate(write);
}

type PairCounts = AHashMap<Pair, i64>;
type PairWords = AHashMap<Pair, Vec<u32>>;

/// Queues one merge job for every pair that still occurs.
fn push_jobs(heap: &mut BinaryHeap<MergeJob>, pair_counts: &PairCounts, pair_words: PairWords) {
    for (pair, found_in) in pair_words {
        let count = pair_counts[&pair];
        if count > 0 {
            heap.push(MergeJob {
                pair,
                count,
                words: found_in,
            });
        }
    }
}

/// Counts every adjacent pair (weighted by word count) and where it occurs, in parallel.
fn count_pairs(words: &[Vec<u32>], counts: &[i64]) -> (PairCounts, PairWords) {
    words
        .par_iter()
        .zip(counts.par_iter())
        .enumerate()
        .fold(
            || (PairCounts::new(), PairWords::new()),
            |(mut pair_counts, mut pair_words), (index, (word, &count))| {
                let index = index as u32;
                for window in word.windows(2) {
                    let pair = (window[0], window[1]);
                    *pair_counts.entry(pair).or_insert(0) += count;
                    let found_in = pair_words.entry(pair).or_default();
                    // One word is handled at a time, so a repeat can only be the last entry.
                    if found_in.last() != Some(&index) {
                        found_in.push(index);
                    }
                }
                (pair_counts, pair_words)
            },
        )
        .reduce(
            || (PairCounts::new(), PairWords::new()),
            |(counts_a, mut words_a), (counts_b, words_b)| {
                for (pair, found_in) in words_b {
                    words_a.entry(pair).or_default().extend(found_in);
                }
                (add_counts(counts_a, counts_b), words_a)
            },
        )
}

/// Learns up to `num_merges` merges from `words` (token ids of each unique chunk) seen
/// `counts[i]` times each. Merge `i` creates token id `256 + i`. Stops early when no pair is
/// left. `progress(done, total)` is called about every 1% of the merges; an error from it
/// aborts training (used for Ctrl-C).
pub fn learn_merges<E>(
    mut words: Vec<Vec<u32>>,
    counts: Vec<i64>,
    num_merges: u32,
    progress: &mut dyn FnMut(u32, u32) -> Result<(), E>,
) -> Result<Vec<Pair>, E> {
    assert_eq!(words.len(), counts.len());
    assert!(
        words.len() <= u32::MAX as usize,
        "word indices are stored as u32"
    );
    let (mut pair_counts, pair_words) = count_pairs(&words, &counts);

    let mut heap = BinaryHeap::with_capacity(pair_words.len());
    push_jobs(&mut heap, &pair_counts, pair_words);

    let mut merges: Vec<Pair> = Vec::with_capacity(num_merges as usize);
    // Report every 1% (for fewer than 100 merges, only at the end).
    let report_every = if num_merges >= 100 {
        num_merges / 100
    } else {
        num_merges.max(1)
    };
    while merges.len() < num_merges as usize {
        let mut job = match heap.pop() {
            Some(job) => job,
            None => break,
        };
        // Lazy refresh: counts only decrease after an entry is pushed, so a stale entry goes
        // back with its live count and the first fresh entry popped is the true maximum.
        let live = pair_counts.get(&job.pair).copied().unwrap_or(0);
        if job.count != live {
            if live > 0 {
                job.count = live;
                heap.push(job);
            }
            continue;
        }

        let new_id = 256 + merges.len() as u32;
        merges.push(job.pair);
        // Every pair created here contains `new_id`, which did not exist before, so each
        // pair gets exactly one heap entry over the whole run.
        let mut created: PairWords = AHashMap::new();
        for &index in &job.words {
            let count = counts[index as usize];
            merge_pair_in_word(
                &mut words[index as usize],
                job.pair,
                new_id,
                |pair, delta| {
                    *pair_counts.entry(pair).or_insert(0) += delta * count;
                    if delta > 0 {
                        let found_in = created.entry(pair).or_default();
                        if found_in.last() != Some(&index) {
                            found_in.push(index);
                        }
                    }
                },
            );
        }
        push_jobs(&mut heap, &pair_counts, created);

        let done = merges.len() as u32;
        if done % report_every == 0 || done == num_merges {
            progress(done, num_merges)?;
        }
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(ids: &[u32], pair: Pair, new_id: u32) -> (Vec<u32>, AHashMap<Pair, i64>) {
        let mut ids = ids.to_vec();
        let mut deltas = AHashMap::new();
        merge_pair_in_word(&mut ids, pair, new_id, |p, d| {
            *deltas.entry(p).or_insert(0) += d
        });
        deltas.retain(|_, d| *d != 0);
        (ids, deltas)
    }

    fn pair_histogram(ids: &[u32]) -> AHashMap<Pair, i64> {
        let mut h = AHashMap::new();
        for w in ids.windows(2) {
            *h.entry((w[0], w[1])).or_insert(0) += 1;
        }
        h
    }

    #[test]
    fn deltas_equal_the_change_of_pair_counts() {
        let cases: &[(&[u32], Pair)] = &[
            (&[1, 1, 1, 1], (1, 1)),
            (&[1, 1, 1], (1, 1)),
            (&[1, 2, 1, 2, 1], (1, 2)),
            (&[2, 1, 2, 3], (1, 2)),
            (&[1, 2], (1, 2)),
            (&[3], (1, 2)),
        ];
        for &(ids, pair) in cases {
            let (after, deltas) = merged(ids, pair, 9);
            let mut expected = pair_histogram(&after);
            for (p, c) in pair_histogram(ids) {
                *expected.entry(p).or_insert(0) -= c;
            }
            expected.retain(|_, d| *d != 0);
            assert_eq!(deltas, expected, "ids {:?} pair {:?}", ids, pair);
        }
        assert_eq!(merged(&[1, 1, 1, 1, 1], (1, 1), 9).0, vec![9, 9, 1]);
    }

    #[test]
    fn ties_go_to_the_smaller_pair() {
        // "ab" and "cd" both occur twice; (97, 98) < (99, 100) wins.
        let words = vec![vec![99, 100], vec![97, 98]];
        let merges = learn_merges::<()>(words, vec![2, 2], 5, &mut |_, _| Ok(())).unwrap();
        assert_eq!(merges, vec![(97, 98), (99, 100)]);
    }
}
