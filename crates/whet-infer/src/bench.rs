//! `whet bench generate`: prefill and decode speed, reported as medians with the load average
//! (machines here are shared; a number without the load beside it means little).

use crate::generate::{Error, GenerateConfig, Session};
use whet_model::{Llama, ModelTokenizer};

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub struct GenerateRun {
    /// Prompt tokens per second.
    pub prefill_tps: f64,
    /// Generated tokens per second, after the first.
    pub decode_tps: f64,
}

/// Run `runs` generations of `decode_tokens` tokens after a prompt of `prompt_tokens` tokens
/// (greedy, never stopping early), after one warm-up run.
pub fn bench_generate(
    model: &Llama,
    tokenizer: &ModelTokenizer,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
) -> Result<Vec<GenerateRun>, Error> {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(prompt_tokens);
    let mut prompt = tokenizer.encode(&text)?;
    prompt.truncate(prompt_tokens);
    let cfg =
        GenerateConfig { max_tokens: decode_tokens, stop_at_eos: false, ..Default::default() };
    let mut out = vec![];
    for i in 0..=runs {
        let mut session = Session::new(model, tokenizer);
        let g = session.generate(&prompt, &cfg, |_| {})?;
        if i > 0 {
            out.push(GenerateRun {
                prefill_tps: g.prefill_tokens as f64 / g.prefill_secs,
                // The first token comes from the prefill logits, so decode produced ids.len() - 1.
                decode_tps: (g.ids.len().saturating_sub(1)) as f64 / g.decode_secs.max(1e-9),
            });
        }
    }
    Ok(out)
}

/// Median of a non-empty list (0 for an empty one).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0-100) by nearest rank; 0 for no values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The 1-minute load average from `/proc/loadavg`, when the system has one.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// The closing line of every benchmark report: the 1-minute load average before and after.
pub fn load_line(before: Option<f64>) -> String {
    let fmt = |l: Option<f64>| l.map_or("n/a".to_string(), |l| format!("{l:.2}"));
    format!("load avg:   {} before, {} after (1 min)", fmt(before), fmt(load_average()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_lists() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert_eq!(percentile(&v, 100.0), 20.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
