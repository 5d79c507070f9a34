//! Preference objectives: from pairs of a better (chosen) and a worse (rejected) answer to one
//! prompt, as TRL defines each (`DPOTrainer` for DPO and IPO, `CPOTrainer` with
//! `loss_type="simpo"` and `cpo_alpha=0` for SimPO, `ORPOTrainer` for ORPO); golden-tested
//! against TRL (`scripts/reference_preference.py`).
//!
//! The policy's log-probability of each answer (the sum over its trained tokens, or the mean for
//! SimPO and ORPO) is taken through the model's fused head-and-loss per sequence, so no `[T, V]`
//! log-softmax is held. The pair-level formula is then evaluated on the host in f64 together
//! with its derivative in each answer's log-probability, and the loss tensor is that derivative
//! times the log-probabilities plus a constant: its value is the formula's, its gradient the
//! formula's chain rule, on every backend (Metal has no f64) and without candle ops that lack a
//! backward.

use super::{Loss, Objective, Row};
use crate::error::TrainError;
use candle_core::{DType, Device, Tensor};
use whet_data::Tokenized;
use whet_model::{Llama, TrainPass};

/// Which preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferenceLoss {
    /// DPO's `-log sigmoid(beta * margin)`; with `label_smoothing` > 0, Robust DPO.
    Dpo,
    /// IPO's squared loss on the per-token log-ratio margin, `(margin - 1/(2 beta))^2`.
    Ipo,
    /// SimPO: no reference; mean log-probabilities, a target margin `gamma`.
    Simpo,
    /// ORPO: no reference; the chosen answer's cross-entropy plus `beta` times the log odds
    /// ratio's `-log sigmoid`.
    Orpo,
}

impl PreferenceLoss {
    /// Whether the loss compares against the reference model (the base, adapters off).
    pub fn uses_reference(self) -> bool {
        matches!(self, Self::Dpo | Self::Ipo)
    }
}

/// A preference objective and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preference {
    /// The loss.
    pub loss: PreferenceLoss,
    /// TRL's `beta` (ORPO's lambda).
    pub beta: f64,
    /// Robust DPO's flip probability; SimPO's label smoothing.
    pub label_smoothing: f64,
    /// SimPO's target reward margin.
    pub gamma: f64,
    /// Reference log-probabilities computed once before training ([`Objective::prepare`]).
    pub precompute_ref: bool,
    /// DPO: the weight of the chosen answers' cross-entropy added to the loss (RPO; TRL's
    /// `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, rpo_alpha]`); 0 for none.
    pub rpo_alpha: f64,
}

/// One pair's answers: log-probability sums, trained-token counts, and the reference's sums.
struct Pair {
    c: f64,
    r: f64,
    nc: f64,
    nr: f64,
    ref_c: f64,
    ref_r: f64,
}

/// What a pair contributes: its loss, the loss's derivative in `c` and `r` (the log-probability
/// sums), the chosen and rejected rewards, and the logged log-probabilities.
struct Terms {
    loss: f64,
    d_c: f64,
    d_r: f64,
    reward_c: f64,
    reward_r: f64,
    logp_c: f64,
    logp_r: f64,
    extra: Vec<(&'static str, f64)>,
}

pub(super) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// `ln(1 - e^x)` for `x < 0`, stable at both ends.
fn log1mexp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}

impl Preference {
    fn terms(&self, p: &Pair) -> Terms {
        let (b, eps) = (self.beta, self.label_smoothing);
        match self.loss {
            PreferenceLoss::Dpo => {
                let d = (p.c - p.ref_c) - (p.r - p.ref_r);
                let z = b * d;
                // TRL's "sigmoid", and "robust" when smoothed.
                let (loss, dz) = if eps == 0.0 {
                    (-log_sigmoid(z), -sigmoid(-z))
                } else {
                    let k = 1.0 / (1.0 - 2.0 * eps);
                    (
                        k * (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)),
                        k * (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)),
                    )
                };
                Terms {
                    loss,
                    d_c: dz * b,
                    d_r: -dz * b,
                    reward_c: b * (p.c - p.ref_c),
                    reward_r: b * (p.r - p.ref_r),
                    logp_c: p.c,
                    logp_r: p.r,
                    extra: vec![],
                }
            }
            PreferenceLoss::Ipo => {
                let u = (p.c - p.ref_c) / p.nc - (p.r - p.ref_r) / p.nr - 1.0 / (2.0 * b);
                Terms {
                    loss: u * u,
                    d_c: 2.0 * u / p.nc,
                    d_r: -2.0 * u / p.nr,
                    reward_c: b * (p.c - p.ref_c),
                    reward_r: b * (p.r - p.ref_r),
                    logp_c: p.c,
                    logp_r: p.r,
                    extra: vec![],
                }
            }
            PreferenceLoss::Simpo => {
                let (ac, ar) = (p.c / p.nc, p.r / p.nr);
                let z = b * (ac - ar) - self.gamma;
                let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
                let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
                Terms {
                    loss,
                    d_c: dz * b / p.nc,
                    d_r: -dz * b / p.nr,
                    reward_c: b * ac,
                    reward_r: b * ar,
                    logp_c: ac,
                    logp_r: ar,
                    extra: vec![],
                }
            }
            PreferenceLoss::Orpo => {
                // The odds-ratio term only; the chosen cross-entropy is a mean over the whole
                // batch's chosen tokens, added in `loss`.
                let (ac, ar) = (p.c / p.nc, p.r / p.nr);
                let log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
                let ratio = log_sigmoid(log_odds);
                let d_odds = -b * sigmoid(-log_odds);
                Terms {
                    loss: -b * ratio,
                    d_c: d_odds / (-ac.exp_m1()) / p.nc,
                    d_r: -d_odds / (-ar.exp_m1()) / p.nr,
                    reward_c: b * ac,
                    reward_r: b * ar,
                    logp_c: ac,
                    logp_r: ar,
                    extra: vec![("log_odds_ratio", ratio), ("log_odds_chosen", log_odds)],
                }
            }
        }
    }
}

/// The log-probability sum of each sequence's trained tokens (`[n]`, in the graph when `pass`
/// is given), and each one's count of trained tokens: a batch of the sequences right-padded, in
/// their order.
/// With `reference`, the reference model's (trained adapter left out, no graph).
pub(super) fn sequence_logps(
    model: &Llama,
    seqs: &[(&[u32], &[u8])],
    pass: Option<&TrainPass>,
    reference: bool,
    device: &Device,
) -> Result<(Tensor, Vec<usize>, Option<whet_model::GradCollector>), TrainError> {
    let t = seqs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let b = seqs.len();
    let mut ids = vec![0u32; b * t];
    for (i, (s, _)) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.len()].copy_from_slice(s);
    }
    let ids_t = Tensor::from_vec(ids, (b, t), device)?;
    let (h, collector) = match (pass, reference) {
        (_, true) => (model.hidden_reference(&ids_t, None)?, None),
        (Some(pass), false) => {
            let (h, c) = model.hidden_train(&ids_t, None, pass)?;
            (h, Some(c))
        }
        (None, false) => (model.hidden(&ids_t, None)?, None),
    };
    let h = h.reshape((b * t, h.dim(2)?))?;
    let (mut logps, mut counts) = (vec![], vec![]);
    for (i, (s, mask)) in seqs.iter().enumerate() {
        let (mut at, mut targets) = (vec![], vec![]);
        for k in 1..s.len() {
            if mask[k] == 1 {
                at.push((i * t + k - 1) as u32);
                targets.push(s[k]);
            }
        }
        let n = at.len();
        if n == 0 {
            return Err(TrainError::Run("a preference answer without trained tokens".into()));
        }
        let hi = h.index_select(&Tensor::from_vec(at, n, device)?, 0)?;
        let nll = model.loss(&hi, &Tensor::from_vec(targets, n, device)?)?;
        logps.push((nll * -(n as f64))?);
        counts.push(n);
    }
    Ok((Tensor::stack(&logps, 0)?, counts, collector))
}

/// Each pair's log-probabilities of its chosen and rejected answers (the sums over their
/// trained tokens, as the objectives define them) under `model` as it stands, named adapters
/// at their weights and no graph, `batch` pairs at a time: what `whet eval` scores preference
/// data by.
pub fn pair_logps(
    model: &Llama,
    pairs: &[Tokenized],
    batch: usize,
    device: &Device,
) -> Result<Vec<(f64, f64)>, TrainError> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        let mut seqs = vec![];
        for p in chunk {
            let r = p.rejected.as_deref().ok_or_else(|| {
                TrainError::Run("an answer without a rejected side is not a preference pair".into())
            })?;
            seqs.push((p.ids.as_slice(), p.mask.as_slice()));
            seqs.push((r.ids.as_slice(), r.mask.as_slice()));
        }
        let (logps, _, _) = sequence_logps(model, &seqs, None, false, device)?;
        out.extend(host(&logps)?.chunks(2).map(|c| (c[0], c[1])));
    }
    Ok(out)
}

/// A `[n]` tensor's values on the host (through f32: Metal cannot cast to f64).
pub(super) fn host(t: &Tensor) -> Result<Vec<f64>, TrainError> {
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

/// The loss tensor of a formula evaluated on the host: `weights . logps + c`, whose value is
/// `value` (with `values` the host copy of `logps`) and whose gradient in each log-probability
/// is its weight, the formula's derivative.
pub(super) fn surrogate(
    logps: &Tensor,
    values: &[f64],
    weights: &[f64],
    value: f64,
    device: &Device,
) -> Result<Tensor, TrainError> {
    let w = Tensor::from_vec(weights.to_vec(), weights.len(), device)?.to_dtype(logps.dtype())?;
    let linear = (logps * &w)?.sum_all()?;
    let offset = value - values.iter().zip(weights).map(|(v, w)| v * w).sum::<f64>();
    Ok((linear + offset)?)
}

/// The sides of `rows`, pair by pair: chosen then rejected, so that sequence `2k + side` of a
/// batch is always the same answer and its adapter dropout (seeded by the row's place in the
/// batch) does not depend on how the batch is split into shards or ranks.
fn sides<'a>(rows: &[&'a Row]) -> Result<Vec<(&'a [u32], &'a [u8])>, TrainError> {
    let mut out = Vec::with_capacity(2 * rows.len());
    for r in rows {
        let (ids, mask) = r.rejected.as_ref().ok_or_else(|| {
            TrainError::Run("a preference objective got a row without a rejected answer".into())
        })?;
        out.push((r.ids.as_slice(), r.mask.as_slice()));
        out.push((ids.as_slice(), mask.as_slice()));
    }
    Ok(out)
}

/// Trained tokens of a sequence (its first token is never predicted).
fn trained(mask: &[u8]) -> usize {
    mask.iter().skip(1).filter(|&&m| m == 1).count()
}

impl Objective for Preference {
    /// Pairs.
    fn units(&self, rows: &[&Row]) -> usize {
        rows.len()
    }

    fn metric_names(&self) -> Vec<&'static str> {
        let mut names = vec![
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ];
        if self.loss == PreferenceLoss::Orpo {
            names.extend(["log_odds_ratio", "log_odds_chosen", "nll_loss"]);
        }
        names
    }

    /// The reference model's log-probabilities of every pair, once: what
    /// `--precompute-ref` trades a pass over the data for a forward per step.
    fn prepare(
        &self,
        model: &Llama,
        rows: &mut [Row],
        batch: usize,
        device: &Device,
    ) -> Result<(), TrainError> {
        if !(self.precompute_ref && self.loss.uses_reference()) {
            return Ok(());
        }
        for chunk in rows.chunks_mut(batch.max(1)) {
            let refs: Vec<&Row> = chunk.iter().collect();
            let (logps, _, _) = sequence_logps(model, &sides(&refs)?, None, true, device)?;
            let v = host(&logps)?;
            for (i, row) in chunk.iter_mut().enumerate() {
                row.reference = Some([v[2 * i], v[2 * i + 1]]);
            }
        }
        Ok(())
    }

    fn loss(
        &self,
        model: &Llama,
        part: &[&Row],
        whole: &[&Row],
        _sums: &[f64],
        pass: Option<&TrainPass>,
        device: &Device,
    ) -> Result<Loss, TrainError> {
        let seqs = sides(part)?;
        // Two sequences a pair: the dropout rows of pair k are 2k and 2k + 1 of the batch.
        let pass = pass.map(|p| TrainPass { first_row: 2 * p.first_row, ..*p });
        let (logps, counts, collector) =
            sequence_logps(model, &seqs, pass.as_ref(), false, device)?;
        let values = host(&logps)?;
        let n = part.len();
        let reference: Vec<[f64; 2]> = if !self.loss.uses_reference() {
            vec![[0.0; 2]; n]
        } else if part.iter().all(|r| r.reference.is_some()) {
            part.iter().map(|r| r.reference.unwrap_or_default()).collect()
        } else {
            let (ref_logps, _, _) = sequence_logps(model, &seqs, None, true, device)?;
            let v = host(&ref_logps)?;
            (0..n).map(|i| [v[2 * i], v[2 * i + 1]]).collect()
        };
        let pairs = whole.len() as f64;
        let mut weights = vec![0.0; 2 * n];
        let mut value = 0.0;
        let mut sums: Vec<(&'static str, f64)> =
            self.metric_names().into_iter().map(|name| (name, 0.0)).collect();
        for i in 0..n {
            let p = Pair {
                c: values[2 * i],
                r: values[2 * i + 1],
                nc: counts[2 * i] as f64,
                nr: counts[2 * i + 1] as f64,
                ref_c: reference[i][0],
                ref_r: reference[i][1],
            };
            let t = self.terms(&p);
            value += t.loss / pairs;
            weights[2 * i] += t.d_c / pairs;
            weights[2 * i + 1] += t.d_r / pairs;
            let logged = [
                t.reward_c,
                t.reward_r,
                f64::from(u8::from(t.reward_c > t.reward_r)),
                t.reward_c - t.reward_r,
                t.logp_c,
                t.logp_r,
            ];
            for (s, v) in sums.iter_mut().zip(logged) {
                s.1 += v / pairs;
            }
            for (name, v) in t.extra {
                if let Some(s) = sums.iter_mut().find(|(k, _)| *k == name) {
                    s.1 += v / pairs;
                }
            }
        }
        // ORPO's chosen cross-entropy, and RPO's on top of DPO: TRL's `nll_loss` (its "sft"
        // loss), a mean over every chosen token of the batch (this part's share of it).
        let nll_weight = if self.loss == PreferenceLoss::Orpo { 1.0 } else { self.rpo_alpha };
        if nll_weight > 0.0 {
            let tokens: usize = whole.iter().map(|r| trained(&r.mask)).sum();
            let nll: f64 = -values.iter().step_by(2).sum::<f64>() / tokens as f64;
            value += nll_weight * nll;
            for w in weights.iter_mut().step_by(2) {
                *w -= nll_weight / tokens as f64;
            }
            if let Some(s) = sums.iter_mut().find(|(k, _)| *k == "nll_loss") {
                s.1 = nll;
            }
        }
        Ok(Loss {
            loss: surrogate(&logps, &values, &weights, value, device)?,
            collector,
            metrics: sums,
            tokens: seqs.iter().map(|(ids, _)| ids.len()).sum(),
        })
    }
}
