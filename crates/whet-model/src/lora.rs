//! LoRA: low-rank adapters on frozen linear layers (Hu et al., "LoRA: Low-Rank Adaptation of
//! Large Language Models", 2021; reference: Hugging Face PEFT `tuners/lora/layer.py`).
//!
//! `y = W x + scale * B (A x)` with `A` `[r, in]` Kaiming-uniform, `B` `[out, r]` zero (so a
//! fresh adapter changes nothing) and `scale = alpha / r`, or `alpha / sqrt(r)` for rsLoRA.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

/// The linear layers LoRA can wrap, by their Hugging Face names.
pub const TARGETS: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Adapter settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Wrapped layers, names from [`TARGETS`].
    pub targets: Vec<String>,
    /// rsLoRA scaling (`alpha / sqrt(r)`).
    pub rslora: bool,
}

impl LoraConfig {
    /// Validate; `targets` is a comma list of [`TARGETS`] names or `all-linear`.
    pub fn new(rank: usize, alpha: f64, dropout: f64, targets: &str, rslora: bool) -> Result<Self> {
        // Fields by PEFT's names, which whet.toml and adapter_config.json share; callers say
        // which file or flag the value came from.
        let bad = Error::Lora;
        if rank == 0 {
            return Err(bad("`r` (rank) must be at least 1, got `0`".into()));
        }
        if alpha.is_nan() || alpha <= 0.0 {
            return Err(bad(format!("`lora_alpha` must be positive, got `{alpha}`")));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(bad(format!("`lora_dropout` must be in [0, 1), got `{dropout}`")));
        }
        let targets: Vec<String> = if targets.trim() == "all-linear" {
            TARGETS.iter().map(|t| t.to_string()).collect()
        } else {
            targets.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
        };
        if targets.is_empty() {
            return Err(bad("`target_modules` is empty".into()));
        }
        for t in &targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(bad(format!(
                    "`target_modules`: unknown target module `{t}`; expected `all-linear` or some of {}",
                    TARGETS.join(", ")
                )));
            }
        }
        Ok(Self { rank, alpha, dropout, targets, rslora })
    }

    /// The factor on `B A x`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// One adapter: the trainable pair `A`, `B`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// `alpha / r` (or `/ sqrt(r)`).
    pub scale: f64,
    /// Input dropout during training.
    pub dropout: f64,
}

impl Lora {
    /// A fresh adapter for a `[out, in]` layer, `A` drawn from `rng` (candle's CPU generator
    /// cannot be seeded), as PEFT does: Kaiming-uniform with `a = sqrt(5)`, bound `1/sqrt(in)`.
    /// Adapters are f32 over f32/f16/bf16 bases (f64 over f64 ones, for gradient checks).
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        cfg: &LoraConfig,
        rng: &mut rand_chacha::ChaCha8Rng,
        device: &Device,
        base: DType,
    ) -> Result<Self> {
        let dtype = if base == DType::F64 { DType::F64 } else { DType::F32 };
        if cfg.rank > in_dim.min(out_dim) {
            return Err(Error::Lora(format!(
                "`r` (rank) `{}` is larger than a {out_dim}x{in_dim} layer allows (at most {})",
                cfg.rank,
                in_dim.min(out_dim)
            )));
        }
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..cfg.rank * in_dim).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Tensor::from_vec(a, (cfg.rank, in_dim), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let a = Var::from_tensor(&a)?;
        let b = Var::zeros((out_dim, cfg.rank), dtype, device)?;
        Ok(Self { a, b, scale: cfg.scale(), dropout: cfg.dropout })
    }

    /// An adapter read from a file: `a` `[r, in]` and `b` `[out, r]`, in f32 (f64 over an f64
    /// base) on `device`.
    pub fn from_tensors(
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        device: &Device,
        base: DType,
    ) -> candle_core::Result<Self> {
        let dtype = if base == DType::F64 { DType::F64 } else { DType::F32 };
        let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?);
        Ok(Self { a: var(a)?, b: var(b)?, scale, dropout: 0.0 })
    }

    /// `scale * B (A x)` for `x` `[.., in]`, and what [`Lora::backward`] needs; `dropout_mask`,
    /// when training with dropout, is a `{0, 1/(1-p)}` tensor shaped like `x`. The result is not
    /// part of candle's graph: [`Lora::backward`] gives the gradients.
    pub fn forward(
        &self,
        x: &Tensor,
        dropout_mask: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, LoraTape)> {
        let x = x.to_dtype(self.a.dtype())?; // adapters stay f32 whatever the base dtype
        let mask = match dropout_mask {
            Some(m) => Some(m.to_dtype(x.dtype())?.flatten_to(m.rank() - 2)?),
            None => None,
        };
        // 2-D matmuls over all tokens at once: batched ones would broadcast A and B per row.
        let dims = x.dims().to_vec();
        let x = x.flatten_to(dims.len() - 2)?; // [N, in]
        let x = match &mask {
            Some(m) => (x * m)?,
            None => x,
        };
        let h = x.matmul(&self.a.as_tensor().detach().t()?)?; // [N, r]

        // Scaling B ([out, r]) costs nothing; scaling the output would cost a pass over it.
        let y = h.matmul(&self.scaled_b()?.t()?)?; // [N, out]
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = y.dim(1)?;
        Ok((y.reshape(out)?, LoraTape { x, mask, h }))
    }

    /// For the gradient `g` `[.., out]` of [`Lora::forward`]'s output: the gradients of `A`
    /// and `B`, and the input's (`[.., in]`, in the adapter's dtype) when `input_grad`.
    /// With `h = A x`: `dB = scale g^T h`, `dh = scale g B`, `dA = dh^T x`, `dx = dh A`.
    pub fn backward(
        &self,
        tape: &LoraTape,
        g: &Tensor,
        input_grad: bool,
    ) -> candle_core::Result<LoraGrads> {
        let dims = g.dims().to_vec();
        let g = g.to_dtype(self.a.dtype())?.flatten_to(dims.len() - 2)?.contiguous()?; // [N, out]
        let b = (g.t()?.matmul(&tape.h)? * self.scale)?; // [out, r]
        let dh = g.matmul(&self.scaled_b()?)?; // [N, r]
        let a = dh.t()?.matmul(&tape.x)?; // [r, in]
        let x = if input_grad {
            let dx = dh.matmul(&self.a.as_tensor().detach())?; // [N, in]
            let dx = match &tape.mask {
                Some(m) => (dx * m)?,
                None => dx,
            };
            let mut shape = dims;
            let last = shape.len() - 1;
            shape[last] = dx.dim(1)?;
            Some(dx.reshape(shape)?)
        } else {
            None
        };
        Ok(LoraGrads { a, b, x })
    }

    fn scaled_b(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().detach() * self.scale
    }

    /// `scale * B A`, `[out, in]`: what merging adds to the base weight.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

/// What an adapter's backward pass keeps from its forward pass.
#[derive(Debug, Clone)]
pub struct LoraTape {
    /// The input after dropout, `[N, in]`.
    x: Tensor,
    /// The dropout mask, `[N, in]`.
    mask: Option<Tensor>,
    /// `A x`, `[N, r]`.
    h: Tensor,
}

/// Gradients from [`Lora::backward`].
#[derive(Debug)]
pub struct LoraGrads {
    /// Of `A`, `[r, in]`.
    pub a: Tensor,
    /// Of `B`, `[out, r]`.
    pub b: Tensor,
    /// Of the input, when asked for.
    pub x: Option<Tensor>,
}

/// A `{0, 1/(1-p)}` inverted-dropout mask of `shape` `[B, ..]`, from whet's seeded generator;
/// row `i` is drawn from `seed` and `first_row + i` alone.
pub fn dropout_mask(
    shape: &[usize],
    p: f64,
    seed: u64,
    first_row: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let per_row: usize = shape[1..].iter().product();
    let mut m = Vec::with_capacity(shape[0] * per_row);
    for row in first_row..first_row + shape[0] {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        m.extend((0..per_row).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }));
    }
    Tensor::from_vec(m, shape, &Device::Cpu)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validates_and_scales() {
        let c = LoraConfig::new(8, 16.0, 0.0, "q_proj, v_proj", false).unwrap();
        assert_eq!(c.targets, vec!["q_proj", "v_proj"]);
        assert_eq!(c.scale(), 2.0);
        assert_eq!(LoraConfig::new(16, 16.0, 0.0, "all-linear", true).unwrap().scale(), 4.0);
        assert_eq!(LoraConfig::new(8, 16.0, 0.0, "all-linear", false).unwrap().targets.len(), 7);
        let e = LoraConfig::new(8, 16.0, 0.0, "q_proj,qkv", false).unwrap_err().to_string();
        assert!(e.contains("unknown target module `qkv`"), "{e}");
        assert!(LoraConfig::new(0, 16.0, 0.0, "q_proj", false)
            .unwrap_err()
            .to_string()
            .contains("`r` (rank) must be at least 1"));
        let cfg = LoraConfig::new(64, 16.0, 0.0, "q_proj", false).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let e =
            Lora::new(32, 48, &cfg, &mut rng, &Device::Cpu, DType::F32).unwrap_err().to_string();
        assert!(e.contains("rank) `64` is larger than a 48x32 layer allows (at most 32)"), "{e}");
    }

    #[test]
    fn fresh_adapter_adds_nothing_and_a_is_kaiming_uniform() {
        let cfg = LoraConfig::new(4, 8.0, 0.0, "q_proj", false).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let l = Lora::new(64, 32, &cfg, &mut rng, &Device::Cpu, DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 64), &Device::Cpu).unwrap();
        let y = l.forward(&x, None).unwrap().0;
        assert_eq!(y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let a = l.a.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 1.0 / 8.0) && a.iter().any(|v| v.abs() > 0.1));
    }
}
