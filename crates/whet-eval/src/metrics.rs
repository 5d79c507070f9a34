//! Scoring an output against its reference: exact match, label accuracy with per-label
//! precision/recall/F1 and a confusion matrix, chrF (Popović 2015) and ROUGE-L (Lin 2004) for
//! free text, JSON validity and field match, rule adherence (`rules.toml`), and seeded
//! bootstrap confidence intervals (Efron 1979) for every mean.

use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// A label or short answer compared loosely: trimmed, inner whitespace collapsed, lower case,
/// a trailing full stop dropped.
pub fn normalize(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    s.strip_suffix('.').unwrap_or(&s).to_string()
}

/// 1 when the output equals the reference (both trimmed), else 0.
pub fn exact_match(output: &str, reference: &str) -> f64 {
    f64::from(u8::from(output.trim() == reference.trim()))
}

/// 1 when the normalized output equals the normalized label.
pub fn label_match(output: &str, reference: &str) -> f64 {
    f64::from(u8::from(normalize(output) == normalize(reference)))
}

/// Per-label precision, recall and F1, with the confusion matrix (reference -> output ->
/// count; outputs that are no label count under their own text).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Classification {
    /// Label -> (precision, recall, F1, support).
    pub per_label: BTreeMap<String, LabelScore>,
    /// Mean F1 over the labels of the references.
    pub macro_f1: f64,
    /// reference label -> predicted -> count.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
}

/// One label's scores.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LabelScore {
    /// Of the outputs with this label, the fraction right.
    pub precision: f64,
    /// Of the references with this label, the fraction found.
    pub recall: f64,
    /// Their harmonic mean.
    pub f1: f64,
    /// References with this label.
    pub support: usize,
}

/// Classification scores of `outputs` against `references` (normalized).
pub fn classification(outputs: &[String], references: &[String]) -> Classification {
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (o, r) in outputs.iter().zip(references) {
        *confusion.entry(normalize(r)).or_default().entry(normalize(o)).or_default() += 1;
    }
    let labels: BTreeSet<String> = confusion.keys().cloned().collect();
    let mut per_label = BTreeMap::new();
    for l in &labels {
        let tp = confusion[l].get(l).copied().unwrap_or(0) as f64;
        let support: usize = confusion[l].values().sum();
        let predicted: usize = confusion.values().map(|row| row.get(l).copied().unwrap_or(0)).sum();
        let precision = if predicted == 0 { 0.0 } else { tp / predicted as f64 };
        let recall = if support == 0 { 0.0 } else { tp / support as f64 };
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        per_label.insert(l.clone(), LabelScore { precision, recall, f1, support });
    }
    let macro_f1 = if per_label.is_empty() {
        0.0
    } else {
        per_label.values().map(|s| s.f1).sum::<f64>() / per_label.len() as f64
    };
    Classification { per_label, macro_f1, confusion }
}

/// Sentence chrF (β = 2, character n-grams of 1 to 6, spaces removed), in 0..=100, as
/// sacrebleu's `sentence_chrf` with its defaults (word n-grams off): precision and recall are
/// averaged over the orders that occur, then combined.
pub fn chrf(output: &str, reference: &str) -> f64 {
    const BETA: f64 = 2.0;
    let hyp: Vec<char> = output.chars().filter(|c| !c.is_whitespace()).collect();
    let refc: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    fn grams(s: &[char], n: usize) -> BTreeMap<&[char], usize> {
        let mut m: BTreeMap<&[char], usize> = BTreeMap::new();
        if s.len() >= n {
            for w in s.windows(n) {
                *m.entry(w).or_default() += 1;
            }
        }
        m
    }
    let (mut p_sum, mut r_sum, mut orders) = (0.0, 0.0, 0usize);
    for n in 1..=6 {
        let (h, r) = (grams(&hyp, n), grams(&refc, n));
        let (h_total, r_total): (usize, usize) = (h.values().sum(), r.values().sum());
        if h_total == 0 || r_total == 0 {
            continue;
        }
        let matched: usize = h.iter().map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0))).sum();
        p_sum += matched as f64 / h_total as f64;
        r_sum += matched as f64 / r_total as f64;
        orders += 1;
    }
    if orders == 0 {
        return if hyp.is_empty() && refc.is_empty() { 100.0 } else { 0.0 };
    }
    let (p, r) = (p_sum / orders as f64, r_sum / orders as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + BETA * BETA) * p * r / (BETA * BETA * p + r)
}

/// ROUGE-L F1 (β = 1) over lower-cased whitespace tokens, in 0..=1: the longest common
/// subsequence against both lengths.
pub fn rouge_l(output: &str, reference: &str) -> f64 {
    let a: Vec<String> = output.split_whitespace().map(str::to_lowercase).collect();
    let b: Vec<String> = reference.split_whitespace().map(str::to_lowercase).collect();
    if a.is_empty() || b.is_empty() {
        return f64::from(u8::from(a.is_empty() && b.is_empty()));
    }
    let mut prev = vec![0usize; b.len() + 1];
    for x in &a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        prev = cur;
    }
    let lcs = prev[b.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, r) = (lcs / a.len() as f64, lcs / b.len() as f64);
    2.0 * p * r / (p + r)
}

/// The JSON value in `text`: the whole text, or the first `{...}` / `[...]` block inside a
/// code fence or prose.
pub fn parse_json(text: &str) -> Option<serde_json::Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Some(v);
    }
    let start = t.find(['{', '['])?;
    let end = t.rfind(['}', ']'])?;
    (end > start).then(|| serde_json::from_str(&t[start..=end]).ok()).flatten()
}

/// 1 when the output holds valid JSON.
pub fn json_valid(output: &str) -> f64 {
    f64::from(u8::from(parse_json(output).is_some()))
}

/// The fraction of the reference object's top-level fields that the output's object has with
/// equal values (1 or 0 for a reference that is not an object: equal or not).
pub fn json_field_match(output: &str, reference: &str) -> f64 {
    let (Some(o), Some(r)) = (parse_json(output), parse_json(reference)) else { return 0.0 };
    match (&o, &r) {
        (serde_json::Value::Object(o), serde_json::Value::Object(r)) if !r.is_empty() => {
            r.iter().filter(|(k, v)| o.get(*k) == Some(v)).count() as f64 / r.len() as f64
        }
        _ => f64::from(u8::from(o == r)),
    }
}

/// Mean and 95% confidence interval of `values`, by `resamples` bootstrap resamples drawn
/// with `seed` (percentile method). One value gives an interval of width 0.
pub fn bootstrap(values: &[f64], seed: u64, resamples: usize) -> Estimate {
    let n = values.len();
    if n == 0 {
        return Estimate { mean: f64::NAN, ci95: [f64::NAN, f64::NAN] };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * resamples as f64) as usize).min(resamples - 1)];
    Estimate { mean, ci95: [at(0.025), at(0.975)] }
}

/// The mean of `b - a` over examples scored by both, with its 95% interval by a paired
/// bootstrap (the same examples resampled for both): two arms on one test set differ with
/// more certainty than their separate intervals say, since the hard examples are hard for both.
pub fn paired_difference(a: &[f64], b: &[f64], seed: u64, resamples: usize) -> Estimate {
    let diffs: Vec<f64> = a.iter().zip(b).map(|(a, b)| b - a).collect();
    bootstrap(&diffs, seed, resamples)
}

/// A mean with its 95% interval.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Estimate {
    /// The mean over the examples.
    pub mean: f64,
    /// The bootstrap 95% interval.
    pub ci95: [f64; 2],
}

/// Agreement of several answers: the fraction of pairs that agree, where two answers agree
/// when `same` says so. `None` for fewer than two answers.
pub fn pairwise_agreement(answers: &[String], same: impl Fn(&str, &str) -> f64) -> Option<f64> {
    let n = answers.len();
    if n < 2 {
        return None;
    }
    let mut sum = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            sum += same(&answers[i], &answers[j]);
        }
    }
    Some(sum / (n * (n - 1) / 2) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn labels_compare_loosely_and_exact_match_does_not() {
        assert_eq!(label_match(" Refund.\n", "refund"), 1.0);
        assert_eq!(label_match("refund_status", "refund"), 0.0);
        assert_eq!(exact_match("refund ", "refund"), 1.0);
        assert_eq!(exact_match("Refund", "refund"), 0.0);
    }

    #[test]
    fn classification_by_hand() {
        // refs: a a b b ; outs: a b b c
        let o: Vec<String> = ["a", "b", "b", "c"].map(String::from).to_vec();
        let r: Vec<String> = ["a", "a", "b", "b"].map(String::from).to_vec();
        let c = classification(&o, &r);
        let a = c.per_label["a"];
        assert!(close(a.precision, 1.0) && close(a.recall, 0.5) && close(a.f1, 2.0 / 3.0));
        let b = c.per_label["b"];
        assert!(close(b.precision, 0.5) && close(b.recall, 0.5) && close(b.f1, 0.5));
        assert!(close(c.macro_f1, (2.0 / 3.0 + 0.5) / 2.0));
        assert_eq!(c.confusion["b"]["c"], 1);
        assert_eq!(c.confusion["a"]["b"], 1);
    }

    #[test]
    fn chrf_by_hand() {
        assert!(close(chrf("abc", "abc"), 100.0));
        assert_eq!(chrf("xyz", "abc"), 0.0);
        // "ab" vs "abc": n=1 P 1 R 2/3; n=2 P 1 R 1/2; n=3 only the reference has one: skipped.
        let (p, r) = (1.0, (2.0 / 3.0 + 0.5) / 2.0);
        let want = 100.0 * 5.0 * p * r / (4.0 * p + r);
        assert!(close(chrf("ab", "abc"), want), "{}", chrf("ab", "abc"));
        assert!(close(chrf("a b", "ab"), 100.0), "spaces are removed");
    }

    #[test]
    fn rouge_l_by_hand() {
        // LCS of "the cat sat" and "the cat was here" is "the cat": P 2/3, R 2/4.
        let (p, r) = (2.0 / 3.0, 0.5);
        assert!(close(rouge_l("The cat sat", "the cat was here"), 2.0 * p * r / (p + r)));
        assert_eq!(rouge_l("x", "y"), 0.0);
        assert_eq!(rouge_l("a b", "a b"), 1.0);
    }

    #[test]
    fn json_validity_and_fields() {
        assert_eq!(json_valid("```json\n{\"a\": 1}\n```"), 1.0);
        assert_eq!(json_valid("{\"a\": 1"), 0.0);
        assert!(close(json_field_match("{\"a\": 1, \"b\": 3}", "{\"a\": 1, \"b\": 2}"), 0.5));
        assert_eq!(json_field_match("nope", "{\"a\": 1}"), 0.0);
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_mean() {
        let v: Vec<f64> = (0..40).map(|i| f64::from(u8::from(i % 4 != 0))).collect();
        let a = bootstrap(&v, 7, 1000);
        assert_eq!(a, bootstrap(&v, 7, 1000), "same seed, same interval");
        assert!(close(a.mean, 0.75));
        assert!(a.ci95[0] < 0.75 && 0.75 < a.ci95[1], "{a:?}");
        // About ±1.96 * sqrt(0.75 * 0.25 / 40) = ±0.134.
        assert!((a.ci95[1] - a.ci95[0] - 0.27).abs() < 0.08, "{a:?}");
        let constant = bootstrap(&[1.0; 10], 1, 200);
        assert_eq!(constant.ci95, [1.0, 1.0]);
    }

    #[test]
    fn agreement_counts_pairs() {
        let same = |a: &str, b: &str| label_match(a, b);
        let v: Vec<String> = ["x", "x", "y"].map(String::from).to_vec();
        assert!(close(pairwise_agreement(&v, same).unwrap(), 1.0 / 3.0));
        assert_eq!(pairwise_agreement(&v[..1], same), None);
    }
}
