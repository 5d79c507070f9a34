//! Supervised fine-tuning: the next-token cross-entropy over the tokens the mask trains,
//! averaged over those tokens across the whole batch (as transformers' `Trainer` does with
//! `-100` labels).

use super::{Loss, Objective, Row};
use crate::error::TrainError;
use candle_core::{Device, Tensor};
use whet_model::{Llama, Packing, TrainPass};

/// Masked next-token cross-entropy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sft;

impl Objective for Sft {
    /// Trained tokens (the first token of a row is never predicted).
    fn units(&self, rows: &[&Row]) -> usize {
        rows.iter().map(|r| r.mask.iter().skip(1).filter(|&&m| m == 1).count()).sum()
    }

    /// Rows right-padded to the longest (padding is masked out); only positions whose next
    /// token is trained get logits.
    fn loss(
        &self,
        model: &Llama,
        rows: &[&Row],
        whole: &[&Row],
        _sums: &[f64],
        pass: Option<&TrainPass>,
        device: &Device,
    ) -> Result<Loss, TrainError> {
        if rows.iter().any(|r| r.rejected.is_some()) {
            return Err(TrainError::Run("supervised fine-tuning got a preference pair".into()));
        }
        let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let b = rows.len();
        let (mut ids, mut mask, mut pos, mut seg) =
            (vec![0u32; b * t], vec![0u8; b * t], vec![0u32; b * t], vec![u32::MAX; b * t]);
        for (i, r) in rows.iter().enumerate() {
            let n = r.ids.len();
            ids[i * t..i * t + n].copy_from_slice(&r.ids);
            mask[i * t..i * t + n].copy_from_slice(&r.mask);
            match &r.packed {
                Some((p, s)) => {
                    pos[i * t..i * t + n].copy_from_slice(p);
                    seg[i * t..i * t + n].copy_from_slice(s);
                }
                None => {
                    pos[i * t..i * t + n].iter_mut().enumerate().for_each(|(k, x)| *x = k as u32);
                    seg[i * t..i * t + n].fill(0);
                }
            }
        }
        let (mut at, mut targets) = (vec![], vec![]);
        for i in 0..b {
            for k in 1..t {
                if mask[i * t + k] == 1 {
                    at.push((i * t + k - 1) as u32);
                    targets.push(ids[i * t + k]);
                }
            }
        }
        if at.is_empty() {
            return Err(TrainError::Run("a batch without trained tokens".into()));
        }
        let ids_t = Tensor::from_vec(ids, (b, t), device)?;
        let packed = rows.iter().any(|r| r.packed.is_some());
        let pos = Tensor::from_vec(pos, (b, t), device)?;
        let seg = Tensor::from_vec(seg, (b, t), &Device::Cpu)?;
        let packing = packed.then_some(Packing { positions: &pos, segments: &seg });
        let (h, collector) = match (pass, packing) {
            (Some(pass), packing) => {
                let (h, collector) = model.hidden_train(&ids_t, packing, pass)?;
                (h, Some(collector))
            }
            (None, Some(packing)) => (model.hidden_packed(&ids_t, packing)?, None),
            (None, None) => (model.hidden(&ids_t, None)?, None),
        }; // [B, T, C]
        let n = at.len();
        let h =
            h.reshape((b * t, h.dim(2)?))?.index_select(&Tensor::from_vec(at, n, device)?, 0)?; // [N, C]
                                                                                                // The mean over this part's tokens, weighted by their share of the batch's.
        let share = n as f64 / self.units(whole) as f64;
        let loss = (model.loss(&h, &Tensor::from_vec(targets, n, device)?)? * share)?;
        Ok(Loss {
            loss,
            collector,
            metrics: vec![],
            tokens: rows.iter().map(|r| r.ids.len()).sum(),
        })
    }
}
