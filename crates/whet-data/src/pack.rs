//! Sequence packing: several examples per row, best-fit-decreasing, so short examples stop
//! wasting padded compute. Each example keeps its own positions (restarting at 0) and a segment
//! id; attention is block-diagonal over segments, so no example sees another.

use crate::tokenize::Tokenized;
use std::collections::BTreeMap;

/// One packed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRow {
    /// Token ids of all examples in the row, one after another.
    pub ids: Vec<u32>,
    /// Loss mask, as in [`Tokenized::mask`], except that each example's first token is never
    /// trained: it would be predicted from the previous example's last token.
    pub mask: Vec<u8>,
    /// Position of each token within its own example.
    pub positions: Vec<u32>,
    /// Which example of the row each token belongs to (0, 1, ...).
    pub segments: Vec<u32>,
    /// Indices of the packed examples in the input.
    pub examples: Vec<usize>,
}

/// Pack `examples` into rows of at most `max_len` tokens: longest first, each into the row
/// with the least room that still fits it (best-fit-decreasing, within 11/9 of optimal).
pub fn pack(examples: &[Tokenized], max_len: usize) -> Vec<PackedRow> {
    let mut order: Vec<usize> =
        (0..examples.len()).filter(|&i| !examples[i].ids.is_empty()).collect();
    // Stable: equal lengths keep input order, so packing is deterministic.
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    let mut rows: Vec<Vec<usize>> = vec![];
    let mut room: BTreeMap<(usize, usize), ()> = BTreeMap::new(); // (free tokens, row) of open rows
    for i in order {
        let len = examples[i].ids.len().min(max_len);
        let fit = room.range((len, 0)..).next().map(|(k, _)| *k);
        match fit {
            Some((free, row)) => {
                room.remove(&(free, row));
                rows[row].push(i);
                if free > len {
                    room.insert((free - len, row), ());
                }
            }
            None => {
                rows.push(vec![i]);
                if max_len > len {
                    room.insert((max_len - len, rows.len() - 1), ());
                }
            }
        }
    }
    rows.into_iter()
        .map(|members| {
            let mut row = PackedRow {
                ids: vec![],
                mask: vec![],
                positions: vec![],
                segments: vec![],
                examples: members.clone(),
            };
            for (seg, &i) in members.iter().enumerate() {
                let n = examples[i].ids.len().min(max_len);
                row.ids.extend_from_slice(&examples[i].ids[..n]);
                // The target at a segment start belongs to no prediction within its example.
                row.mask.extend((0..n).map(|k| if k == 0 { 0 } else { examples[i].mask[k] }));
                row.positions.extend(0..n as u32);
                row.segments.extend(std::iter::repeat_n(seg as u32, n));
            }
            row
        })
        .collect()
}

/// Share of row slots holding real tokens (1.0 = no padding).
pub fn efficiency(rows: &[PackedRow], max_len: usize) -> f64 {
    if rows.is_empty() {
        return 0.0;
    }
    let used: usize = rows.iter().map(|r| r.ids.len()).sum();
    used as f64 / (rows.len() * max_len) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, tag: u32) -> Tokenized {
        Tokenized { ids: vec![tag; n], mask: vec![1; n], ..Tokenized::default() }
    }

    #[test]
    fn best_fit_decreasing_fills_rows_and_keeps_examples_whole() {
        let examples = vec![ex(6, 1), ex(3, 2), ex(4, 3), ex(2, 4), ex(5, 5)];
        let rows = pack(&examples, 8);
        // 6+2, 5+3, 4: three rows, 20 tokens of 24 slots.
        assert_eq!(
            rows.iter().map(|r| r.examples.clone()).collect::<Vec<_>>(),
            vec![vec![0, 3], vec![4, 1], vec![2]]
        );
        assert_eq!(rows[0].positions, vec![0, 1, 2, 3, 4, 5, 0, 1]);
        assert_eq!(rows[0].segments, vec![0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(rows[0].ids, vec![1, 1, 1, 1, 1, 1, 4, 4]);
        assert!((efficiency(&rows, 8) - 20.0 / 24.0).abs() < 1e-12);
        assert_eq!(rows[0].mask.len(), 8);
        let mut all: Vec<usize> = rows.iter().flat_map(|r| r.examples.clone()).collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
    }

    /// Regression: a packed row trained each example's first token from the previous example's
    /// last one (text data and `--train-on inputs`, where every token is trained).
    #[test]
    fn no_target_at_a_segment_start() {
        let rows = pack(&[ex(3, 1), ex(2, 2), ex(3, 3)], 8);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].segments, vec![0, 0, 0, 1, 1, 1, 2, 2]);
        assert_eq!(rows[0].mask, vec![0, 1, 1, 0, 1, 1, 0, 1]);
        // As many trained targets as the examples alone give (a row's first is never predicted).
        let trained: usize = rows[0].mask.iter().skip(1).map(|&m| m as usize).sum();
        assert_eq!(trained, 2 + 2 + 1);
    }
}
