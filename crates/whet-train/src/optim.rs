//! AdamW (Loshchilov & Hutter, 2019) with its state in plain tensors, so a checkpoint can hold
//! it exactly and a resumed run continues bit for bit. Matches `torch.optim.AdamW`.

use candle_core::{Result, Tensor, Var};

/// AdamW hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// The optimizer: one first and second moment per variable, and the step count.
pub struct AdamW {
    params: AdamWParams,
    /// `(var, m, v)` in the model's variable order.
    pub state: Vec<(Var, Tensor, Tensor)>,
    /// Steps taken.
    pub t: usize,
}

impl AdamW {
    /// Fresh state (zero moments) for `vars`.
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let state = vars
            .into_iter()
            .map(|v| {
                let z = v.zeros_like()?;
                Ok((v, z.clone(), z))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, state, t: 0 })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `state[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        for ((var, m, v), g) in self.state.iter_mut().zip(grads) {
            *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&*m / bc1)?;
            let v_hat = (&*v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}
