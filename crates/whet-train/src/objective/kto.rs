//! KTO (Kahneman-Tversky optimisation, Ethayarajh et al. 2024) as TRL's `KTOTrainer` defines
//! it, on single answers to a prompt marked desirable or not: a desirable answer's loss is
//! `1 - sigmoid(beta * (logratio - kl))`, an undesirable one's `1 - sigmoid(beta * (kl -
//! logratio))`, weighted by `--desirable-weight` / `--undesirable-weight` and averaged over the
//! batch, where `logratio` is the policy's log-probability of the answer less the reference's
//! and `kl`, detached, is the batch's estimate of the KL divergence between policy and
//! reference: the mean log-ratio of mismatched answers (each prompt with the previous row's
//! answer of the same batch), clamped at zero. Golden-tested against TRL
//! (`scripts/reference_preference.py`).
//!
//! The estimate needs every row of a batch before any row's loss, so it is a batch sum
//! ([`Objective::batch_sums`]) that the loop adds over shards and ranks first. Two choices
//! differ from TRL and make ranks equal one process: answers are rotated within the batch as it
//! is drawn (TRL rotates within each device's slice of the unshuffled data), and the policy's
//! pass over the mismatched answers runs without adapter dropout (TRL's runs in training mode,
//! under `no_grad`).

use super::preference::{host, sequence_logps, sigmoid, surrogate};
use super::{Loss, Objective, Row};
use crate::error::TrainError;
use candle_core::Device;
use whet_model::{Llama, TrainPass};

/// KTO and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kto {
    /// TRL's `beta`.
    pub beta: f64,
    /// The weight of desirable answers' losses.
    pub desirable_weight: f64,
    /// The weight of undesirable answers' losses.
    pub undesirable_weight: f64,
    /// Reference log-probabilities of the answers computed once before training.
    pub precompute_ref: bool,
    /// Longest sequence: a mismatched prompt and answer are cut to it (keeping the start).
    pub max_len: usize,
}

/// Where a row's answer starts (its first trained token).
fn answer_start(row: &Row) -> usize {
    row.mask.iter().position(|&m| m == 1).unwrap_or(row.ids.len())
}

/// Whether `row` is desirable.
fn desirable(row: &Row) -> Result<bool, TrainError> {
    row.desirable.ok_or_else(|| {
        TrainError::Run("--objective kto got a row without a desirable/undesirable label".into())
    })
}

impl Kto {
    /// The mismatched sequences of `part`'s rows: row k of `whole` is its prompt followed by
    /// the answer of row k - 1 (the last row's for the first), trained on that answer.
    pub(crate) fn mismatched(
        &self,
        part: &[&Row],
        whole: &[&Row],
    ) -> Result<Vec<(Vec<u32>, Vec<u8>)>, TrainError> {
        let n = whole.len();
        part.iter()
            .map(|row| {
                let k = whole.iter().position(|w| std::ptr::eq(*w, *row)).ok_or_else(|| {
                    TrainError::Run("internal error: a row outside its batch".into())
                })?;
                let other = whole[(k + n - 1) % n];
                let (p, a) = (answer_start(row), answer_start(other));
                let mut ids = row.ids[..p].to_vec();
                ids.extend_from_slice(&other.ids[a..]);
                let mut mask = vec![0u8; p];
                mask.resize(ids.len(), 1);
                ids.truncate(self.max_len);
                mask.truncate(self.max_len);
                Ok((ids, mask))
            })
            .collect()
    }
}

impl Objective for Kto {
    /// Answers.
    fn units(&self, rows: &[&Row]) -> usize {
        rows.len()
    }

    fn metric_names(&self) -> Vec<&'static str> {
        vec![
            "kl",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ]
    }

    /// The reference model's log-probability of every answer, once.
    fn prepare(
        &self,
        model: &Llama,
        rows: &mut [Row],
        batch: usize,
        device: &Device,
    ) -> Result<(), TrainError> {
        if !self.precompute_ref {
            return Ok(());
        }
        for chunk in rows.chunks_mut(batch.max(1)) {
            let seqs: Vec<_> =
                chunk.iter().map(|r| (r.ids.as_slice(), r.mask.as_slice())).collect();
            let (logps, _, _) = sequence_logps(model, &seqs, None, true, device)?;
            for (row, v) in chunk.iter_mut().zip(host(&logps)?) {
                row.reference = Some([v, 0.0]);
            }
        }
        Ok(())
    }

    fn batch_sum_count(&self) -> usize {
        1
    }

    /// This part's share of the batch's mean log-ratio of mismatched answers.
    fn batch_sums(
        &self,
        model: &Llama,
        part: &[&Row],
        whole: &[&Row],
        device: &Device,
    ) -> Result<Vec<f64>, TrainError> {
        let seqs = self.mismatched(part, whole)?;
        let seqs: Vec<_> = seqs.iter().map(|(i, m)| (i.as_slice(), m.as_slice())).collect();
        let (policy, _, _) = sequence_logps(model, &seqs, None, false, device)?;
        let (reference, _, _) = sequence_logps(model, &seqs, None, true, device)?;
        let sum: f64 = host(&policy)?.iter().zip(host(&reference)?).map(|(p, r)| p - r).sum();
        Ok(vec![sum / whole.len() as f64])
    }

    fn loss(
        &self,
        model: &Llama,
        part: &[&Row],
        whole: &[&Row],
        sums: &[f64],
        pass: Option<&TrainPass>,
        device: &Device,
    ) -> Result<Loss, TrainError> {
        let kl = sums.first().copied().unwrap_or(0.0).max(0.0);
        let seqs: Vec<_> = part.iter().map(|r| (r.ids.as_slice(), r.mask.as_slice())).collect();
        let (logps, _, collector) = sequence_logps(model, &seqs, pass, false, device)?;
        let values = host(&logps)?;
        let reference: Vec<f64> = if part.iter().all(|r| r.reference.is_some()) {
            part.iter().map(|r| r.reference.unwrap_or_default()[0]).collect()
        } else {
            host(&sequence_logps(model, &seqs, None, true, device)?.0)?
        };
        // Means over the whole batch's answers, and over its desirable and undesirable ones.
        let n = whole.len() as f64;
        let good = whole.iter().map(|r| desirable(r)).collect::<Result<Vec<_>, _>>()?;
        let n_good = good.iter().filter(|&&g| g).count() as f64;
        let n_bad = n - n_good;
        let (b, mut value) = (self.beta, 0.0);
        let mut weights = vec![0.0; part.len()];
        let (mut reward, mut logp) = ([0.0f64; 2], [0.0f64; 2]);
        for (i, row) in part.iter().enumerate() {
            let ratio = values[i] - reference[i];
            let (z, w, sign, side) = if desirable(row)? {
                (b * (ratio - kl), self.desirable_weight, 1.0, 0)
            } else {
                (b * (kl - ratio), self.undesirable_weight, -1.0, 1)
            };
            // d(1 - sigmoid(z))/dz = -sigmoid(z) sigmoid(-z); dz/dlogp = sign * beta.
            value += w * (1.0 - sigmoid(z)) / n;
            weights[i] = -w * sigmoid(z) * sigmoid(-z) * sign * b / n;
            let count = if side == 0 { n_good } else { n_bad };
            reward[side] += b * ratio / count;
            logp[side] += values[i] / count;
        }
        // A batch without desirable (or undesirable) answers has no value for that side: NaN,
        // which the loop logs as null and leaves out of validation's means (TRL omits it).
        for (side, count) in [n_good, n_bad].into_iter().enumerate() {
            if count == 0.0 {
                (reward[side], logp[side]) = (f64::NAN, f64::NAN);
            }
        }
        let margin = reward[0] - reward[1];
        let metrics = vec![
            ("kl", kl * part.len() as f64 / n),
            ("rewards/chosen", reward[0]),
            ("rewards/rejected", reward[1]),
            ("rewards/margins", margin),
            ("logps/chosen", logp[0]),
            ("logps/rejected", logp[1]),
        ];
        Ok(Loss {
            loss: surrogate(&logps, &values, &weights, value, device)?,
            collector,
            metrics,
            tokens: seqs.iter().map(|(ids, _)| ids.len()).sum(),
        })
    }
}
