//! A trained vocabulary: the merges in id order, their lookup table, and each token's bytes.
//! Encoding follows tiktoken's rule, so a tiktoken `Encoding` built from the mergeable ranks
//! gives the same ids.

use ahash::AHashMap;

use crate::train::Pair;

pub struct Vocab {
    /// Merge `i` made token `256 + i` out of `merges[i]`.
    pub merges: Vec<Pair>,
    rank_of_pair: AHashMap<Pair, u32>,
    /// Raw bytes of every token id (256 single bytes, then the merges).
    token_bytes: Vec<Vec<u8>>,
}

impl Vocab {
    pub fn from_merges(merges: Vec<Pair>) -> Self {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut rank_of_pair = AHashMap::with_capacity(merges.len());
        for (i, &(a, b)) in merges.iter().enumerate() {
            let id = 256 + i as u32;
            let mut bytes = token_bytes[a as usize].clone();
            bytes.extend_from_slice(&token_bytes[b as usize]);
            token_bytes.push(bytes);
            rank_of_pair.insert((a, b), id);
        }
        Vocab {
            merges,
            rank_of_pair,
            token_bytes,
        }
    }

    pub fn size(&self) -> usize {
        256 + self.merges.len()
    }

    pub fn token_bytes(&self) -> &[Vec<u8>] {
        &self.token_bytes
    }

    /// Encodes one regex chunk: start from its bytes and keep merging the pair with the lowest
    /// merge id (all its non-overlapping occurrences, left to right) until none applies.
    pub fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = chunk.iter().map(|&b| u32::from(b)).collect();
        while ids.len() >= 2 {
            let best = ids
                .windows(2)
                .filter_map(|w| {
                    self.rank_of_pair
                        .get(&(w[0], w[1]))
                        .map(|&id| (id, (w[0], w[1])))
                })
                .min();
            let (new_id, pair) = match best {
                Some(best) => best,
                None => break,
            };
            // Pairs formed with `new_id` have larger ids, so merging every occurrence now is
            // the same as merging the first one and searching again.
            crate::train::merge_pair_in_word(&mut ids, pair, new_id, |_, _| {});
        }
        out.extend_from_slice(&ids);
    }

    /// Concatenated bytes of `ids`, or the first id that is not in the vocabulary.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, u32> {
        let mut bytes = Vec::new();
        for &id in ids {
            let token = self.token_bytes.get(id as usize).ok_or(id)?;
            bytes.extend_from_slice(token);
        }
        Ok(bytes)
    }
}
