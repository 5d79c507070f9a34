//! The one Llama implementation of whet: Llama 1-3, SmolLM and Qwen2 (q/k/v biases).
//!
//! Paper: Touvron et al., "LLaMA: Open and Efficient Foundation Language Models" (2023).
//! Reference: Hugging Face transformers `models/llama/modeling_llama.py`; candle-transformers
//! `models/llama.rs`. Tensor names follow Hugging Face and appear only in `vb.pp(...)`.
//!
//! Shapes: `B` batch, `T` new tokens, `S` tokens attended to (cache + new), `C` hidden size,
//! `H` query heads, `K` key/value heads, `D` head width, `M` MLP width, `V` vocabulary.

use crate::config::Config;
use crate::lora::{Lora, LoraConfig, LoraTape};
use candle_core::backprop::GradStore;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Var;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Embedding, VarBuilder};

/// RMSNorm with a learned gain (Zhang & Sennrich, 2019).
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps: eps as f32 })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if ctx.train {
            crate::ops::rms_norm(x, &self.weight, self.eps as f64)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
        }
    }
}

/// What a forward pass is for: inference uses candle's fused kernels; training keeps what the
/// hand-written backward passes need (see [`Block::backward`]) and applies adapter dropout.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    train: bool,
    dropout_seed: u64,
    /// Index of the first row in the whole batch (for per-row dropout masks).
    first_row: usize,
}

/// A linear layer with frozen weights: dense, or block-quantized for fast CPU decoding, where
/// f32 weights make every token read the whole model from memory.
#[derive(Debug, Clone)]
enum Linear {
    Dense(candle_nn::Linear),
    Quantized { weight: QMatMul, bias: Option<Tensor> },
}

impl Linear {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear::Dense(candle_nn::Linear::new(weight, bias))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => l.forward(x),
            Linear::Quantized { weight, bias } => {
                // Quantized matmul takes f32 activations.
                let y =
                    weight.forward(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }

    /// Forward whose backward yields the input's gradient only (the weight is frozen).
    fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => {
                let y = crate::ops::frozen_matmul(x, l.weight())?;
                match l.bias() {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Linear::Quantized { .. } => {
                candle_core::bail!("training through quantized weights is not supported; load the model without --quantize")
            }
        }
    }

    /// The input's gradient for output gradient `g` (the weight is frozen).
    fn backward(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => crate::ops::frozen_matmul_backward(g, l.weight()),
            Linear::Quantized { .. } => {
                candle_core::bail!("training through quantized weights is not supported")
            }
        }
    }

    fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        if let Linear::Dense(l) = self {
            let w = l.weight().to_dtype(DType::F32)?;
            let weight = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
            *self = Linear::Quantized { weight, bias: l.bias().cloned() };
        }
        Ok(())
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(Linear::new(weight, bias))
}

/// A projection inside a block: a frozen linear layer, optionally wrapped by a LoRA adapter.
#[derive(Debug, Clone)]
struct Proj {
    base: Linear,
    lora: Option<Lora>,
    /// Hugging Face module path (`model.layers.0.self_attn.q_proj`), for adapter tensor names.
    path: String,
    in_dim: usize,
    out_dim: usize,
}

impl Proj {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let path = vb.prefix();
        Ok(Self { base: linear(vb, in_dim, out_dim, bias)?, lora: None, path, in_dim, out_dim })
    }

    /// The module name as LoRA targets it (`q_proj`).
    fn name(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or("")
    }

    /// The output, and what [`Proj::backward`] needs (the adapter's tape; nothing without one).
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<(Tensor, Option<LoraTape>)> {
        let y = if ctx.train { self.base.forward_frozen(x)? } else { self.base.forward(x)? };
        let Some(lora) = &self.lora else { return Ok((y, None)) };
        let mask = if ctx.train && lora.dropout > 0.0 {
            // A different mask per layer and step, all from the step's seed.
            let salt =
                self.path.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            Some(crate::lora::dropout_mask(
                x.dims(),
                lora.dropout,
                ctx.dropout_seed ^ salt,
                ctx.first_row,
                x.device(),
            )?)
        } else {
            None
        };
        let (delta, tape) = lora.forward(x, mask.as_ref())?;
        let delta = delta.to_dtype(y.dtype())?;
        Ok(((y + delta)?, Some(tape)))
    }

    /// The input's gradient for output gradient `g`; the adapter's gradients go to `grads`.
    fn backward(&self, tape: &Option<LoraTape>, g: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let dx = self.base.backward(g)?;
        match self.adapter_backward(tape, g, true, grads)? {
            Some(d) => {
                let d = d.to_dtype(dx.dtype())?;
                dx + d
            }
            None => Ok(dx),
        }
    }

    /// The adapter's gradients, pushed to `grads`, and its part of the input's gradient when
    /// `input_grad`.
    fn adapter_backward(
        &self,
        tape: &Option<LoraTape>,
        g: &Tensor,
        input_grad: bool,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        let (Some(lora), Some(tape)) = (&self.lora, tape) else { return Ok(None) };
        let d = lora.backward(tape, g, input_grad)?;
        grads.push((lora.a.as_tensor().clone(), d.a));
        grads.push((lora.b.as_tensor().clone(), d.b));
        Ok(d.x)
    }
}

/// Adapter gradients: (variable, gradient).
type Grads = Vec<(Tensor, Tensor)>;

/// Rotary position embedding tables, `[max_positions, D/2]`.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = cfg.rope_inv_freq();
        let half = inv_freq.len();
        let n = cfg.max_position_embeddings;
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions =
            Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?; // [P, D/2]
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// The cosines and sines for `B` rows of `T` tokens at `pos`: `[T, D/2]` or, for
    /// per-token positions, `[B, T, D/2]`.
    fn tables(&self, pos: &Positions, b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        Ok(match pos {
            Positions::From(offset) => {
                (self.cos.narrow(0, *offset, t)?, self.sin.narrow(0, *offset, t)?)
            }
            Positions::Explicit(ids) => {
                // Packed rows restart positions at every example: gather per token, [B, T, D/2].
                let flat = ids.flatten_all()?;
                let half = self.cos.dim(1)?;
                (
                    self.cos.index_select(&flat, 0)?.reshape((b, t, half))?,
                    self.sin.index_select(&flat, 0)?.reshape((b, t, half))?,
                )
            }
        })
    }

    /// Rotate `x` `[B, heads, T, D]` (Hugging Face "half" layout) by [`Rope::tables`].
    fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        crate::ops::rope(&x.contiguous()?, cos, sin)
    }
}

/// Where the tokens of a forward pass sit in their sequences.
#[derive(Clone)]
enum Positions {
    /// `offset..offset+T` for every row (plain and cached decoding).
    From(usize),
    /// Per-token positions `[B, T]` (u32), for packed rows.
    Explicit(Tensor),
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (c, h, k, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        Ok(Self {
            q_proj: Proj::load(vb.pp("q_proj"), c, h * d, cfg.qkv_bias)?,
            k_proj: Proj::load(vb.pp("k_proj"), c, k * d, cfg.qkv_bias)?,
            v_proj: Proj::load(vb.pp("v_proj"), c, k * d, cfg.qkv_bias)?,
            o_proj: Proj::load(vb.pp("o_proj"), h * d, c, cfg.o_bias)?,
            num_heads: h,
            num_kv_heads: k,
            head_dim: d,
        })
    }

    /// The output, and the queries, keys, values and adapter tapes a backward pass needs.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: &Positions,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<(Tensor, AttentionTape)> {
        let (b, t, _) = x.dims3()?;
        let (h, k, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, tq) = self.q_proj.forward(x, ctx)?;
        let (kk, tk) = self.k_proj.forward(x, ctx)?;
        let (v, tv) = self.v_proj.forward(x, ctx)?;
        let (cos, sin) = rope.tables(pos, b, t)?;
        let q = Rope::apply(&q.reshape((b, t, h, d))?.transpose(1, 2)?, &cos, &sin)?; // [B, H, T, D]
        let kk = Rope::apply(&kk.reshape((b, t, k, d))?.transpose(1, 2)?, &cos, &sin)?; // [B, K, T, D]
        let v = v.reshape((b, t, k, d))?.transpose(1, 2)?.contiguous()?;
        let (kk, v) = match cache {
            Some(cache) => cache.append(&kk, &v)?, // [B, K, S, D]
            None => (kk, v),
        };
        let y = crate::ops::attention(&q, &kk, &v, mask, self.scale())?; // [B, H, T, D]
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?;
        let (out, to) = self.o_proj.forward(&y, ctx)?;
        let tape =
            AttentionTape { q, k: kk, v, cos, sin, mask: mask.cloned(), projs: [tq, tk, tv, to] };
        Ok((out, tape))
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// The gradient of the input `x` of [`Attention::forward`] for output gradient `g`
    /// `[B, T, C]`, or only the adapters' gradients when `input_grad` is false.
    fn backward(
        &self,
        tape: &AttentionTape,
        g: &Tensor,
        input_grad: bool,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        let (b, t, _) = g.dims3()?;
        let (h, k, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [tq, tk, tv, to] = &tape.projs;
        let dy = self.o_proj.backward(to, g, grads)?; // [B, T, H*D]
        let dy = dy.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
        let (dq, dk, dv) = crate::ops::attention_backward(
            &tape.q,
            &tape.k,
            &tape.v,
            &dy,
            tape.mask.as_ref(),
            self.scale(),
        )?;
        let unrotate = |x: &Tensor, heads: usize| {
            crate::ops::rope_backward(x, &tape.cos, &tape.sin)?.transpose(1, 2)?.reshape((
                b,
                t,
                heads * d,
            ))
        };
        let dq = unrotate(&dq, h)?;
        let dk = unrotate(&dk, k)?;
        let dv = dv.transpose(1, 2)?.reshape((b, t, k * d))?;
        if !input_grad {
            self.q_proj.adapter_backward(tq, &dq, false, grads)?;
            self.k_proj.adapter_backward(tk, &dk, false, grads)?;
            self.v_proj.adapter_backward(tv, &dv, false, grads)?;
            return Ok(None);
        }
        let dx = (self.q_proj.backward(tq, &dq, grads)? + self.k_proj.backward(tk, &dk, grads)?)?;
        Ok(Some((dx + self.v_proj.backward(tv, &dv, grads)?)?))
    }
}

/// What [`Attention::backward`] keeps from the forward pass.
struct AttentionTape {
    /// Rotated queries `[B, H, T, D]`, keys and values `[B, K, S, D]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The rotation's tables.
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    /// Adapter tapes of q, k, v and o.
    projs: [Option<LoraTape>; 4],
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (c, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Proj::load(vb.pp("gate_proj"), c, m, false)?,
            up_proj: Proj::load(vb.pp("up_proj"), c, m, false)?,
            down_proj: Proj::load(vb.pp("down_proj"), m, c, false)?,
        })
    }

    /// The output, and what [`Mlp::backward`] needs.
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<(Tensor, MlpTape)> {
        let (gate, tg) = self.gate_proj.forward(x, ctx)?; // [B, T, M]
        let (up, tu) = self.up_proj.forward(x, ctx)?;
        let (y, td) = self.down_proj.forward(&crate::ops::swiglu(&gate, &up)?, ctx)?;
        Ok((y, MlpTape { gate, up, projs: [tg, tu, td] }))
    }

    /// The input's gradient for output gradient `g`.
    fn backward(&self, tape: &MlpTape, g: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let [tg, tu, td] = &tape.projs;
        let da = self.down_proj.backward(td, g, grads)?;
        let (dgate, dup) = crate::ops::swiglu_backward(&tape.gate, &tape.up, &da)?;
        self.gate_proj.backward(tg, &dgate, grads)? + self.up_proj.backward(tu, &dup, grads)?
    }
}

/// What [`Mlp::backward`] keeps from the forward pass.
struct MlpTape {
    gate: Tensor,
    up: Tensor,
    /// Adapter tapes of gate, up and down.
    projs: [Option<LoraTape>; 3],
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    /// The output, and what [`Block::backward`] needs.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: &Positions,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<(Tensor, Tape)> {
        let normed = self.input_layernorm.forward(x, ctx)?;
        let (h, attention) = self.self_attn.forward(&normed, rope, pos, mask, cache, ctx)?;
        let mid = (x + h)?;
        let (h, mlp) = self.mlp.forward(&self.post_attention_layernorm.forward(&mid, ctx)?, ctx)?;
        let y = (&mid + h)?;
        Ok((y, Tape { x: x.clone(), mid, attention, mlp }))
    }

    /// Training forward: the block is one node of candle's graph, whose backward pass runs
    /// [`Block::backward`] from the activations this forward keeps, or, with `checkpoint`
    /// (Chen et al. 2016), from a recomputation of the block from its input: one extra forward
    /// per block buys the memory of all its activations. Backward passes of whole blocks keep
    /// candle's graph small: its backward zero-fills and adds every gradient it stores.
    /// The adapters' gradients are collected for [`Llama::backward`]; `input_grad` is
    /// false for the first block, whose input (the embeddings) needs none.
    #[allow(clippy::too_many_arguments)]
    fn forward_train(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: &Positions,
        mask: Option<&Tensor>,
        ctx: &Ctx,
        checkpoint: bool,
        input_grad: bool,
    ) -> Result<Tensor> {
        let xd = x.detach();
        let (y, tape) = self.forward(&xd, rope, pos, mask, None, ctx)?;
        let tape = if checkpoint { None } else { Some(tape) };
        let (block, rope, pos, mask, ctx) =
            (self.clone(), rope.clone(), pos.clone(), mask.cloned(), *ctx);
        crate::ops::attach(
            x,
            y,
            "block",
            Box::new(move |g, _| {
                let recomputed;
                let tape = match &tape {
                    Some(tape) => tape,
                    None => {
                        recomputed = block.forward(&xd, &rope, &pos, mask.as_ref(), None, &ctx)?.1;
                        &recomputed
                    }
                };
                let mut grads = vec![];
                let dx = block.backward(tape, g, input_grad, &mut grads)?;
                COLLECTED.with_borrow_mut(|c| c.extend(grads));
                match dx {
                    Some(dx) => Ok(dx),
                    None => xd.zeros_like(),
                }
            }),
        )
    }

    /// The gradient of the block's input for output gradient `g` (`None` when `input_grad` is
    /// false); the adapters' gradients go to `grads`.
    fn backward(
        &self,
        tape: &Tape,
        g: &Tensor,
        input_grad: bool,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        // y = mid + mlp(norm2(mid)), mid = x + attention(norm1(x))
        let norm2 = &self.post_attention_layernorm;
        let dn = self.mlp.backward(&tape.mlp, g, grads)?;
        let dmid =
            (g + crate::ops::rms_norm_backward(&tape.mid, &norm2.weight, norm2.eps as f64, &dn)?)?;
        let Some(dn) = self.self_attn.backward(&tape.attention, &dmid, input_grad, grads)? else {
            return Ok(None);
        };
        let norm1 = &self.input_layernorm;
        let dx = crate::ops::rms_norm_backward(&tape.x, &norm1.weight, norm1.eps as f64, &dn)?;
        Ok(Some((dmid + dx)?))
    }

    fn projs(&self) -> [&Proj; 7] {
        let (a, f) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &f.gate_proj, &f.up_proj, &f.down_proj]
    }
}

/// What [`Block::backward`] keeps from the forward pass.
struct Tape {
    /// The block's input.
    x: Tensor,
    /// The input plus the attention's output: the second norm's input.
    mid: Tensor,
    attention: AttentionTape,
    mlp: MlpTape,
}

thread_local! {
    /// Adapter gradients computed by the blocks' backward passes, outside candle's gradient
    /// store, for [`Llama::backward`] on this thread (training shards run side by side on
    /// threads of their own; candle runs a backward pass on the calling thread).
    static COLLECTED: std::cell::RefCell<Grads> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<KvCache>,
    len: usize,
}

impl Cache {
    /// An empty cache for `cfg`; it grows in chunks as tokens arrive.
    pub fn new(cfg: &Config) -> Self {
        // 512-token chunks: a chat turn rarely needs more, and growth is a cheap copy.
        let chunk = cfg.max_position_embeddings.min(512);
        Self { layers: (0..cfg.num_layers).map(|_| KvCache::new(2, chunk)).collect(), len: 0 }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget everything.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset);
        self.len = 0;
    }
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    cfg: Config,
    training: bool,
    dropout_seed: u64,
    first_row: usize,
    lora: Option<LoraConfig>,
    grad_checkpoint: bool,
}

impl Llama {
    /// Build the model from weights named as in Hugging Face checkpoints (`model.layers.0...`).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let embed_tokens = candle_nn::embedding(
            cfg.vocab_size,
            cfg.hidden_size,
            vb.pp("model").pp("embed_tokens"),
        )?;
        let layers = (0..cfg.num_layers)
            .map(|i| Block::load(vb.pp("model").pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(vb.pp("model").pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        let rope = Rope::new(cfg, vb.dtype(), vb.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
            training: false,
            dropout_seed: 0,
            first_row: 0,
            lora: None,
            grad_checkpoint: false,
        })
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    /// Quantize every linear layer (the tied head too; the embedding lookup stays dense) to
    /// `dtype`, for inference: decoding reads every weight once per token, so smaller weights
    /// decode faster. Block size 32 types (`Q8_0`, `Q4_0`) fit any width divisible by 32.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        let block = dtype.block_size();
        let (c, m) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        if c % block != 0 || m % block != 0 || (self.cfg.num_heads * self.cfg.head_dim) % block != 0
        {
            candle_core::bail!("cannot quantize to {dtype:?}: layer widths {c} and {m} are not multiples of its block size {block}")
        }
        for p in self.projs_mut() {
            p.base.quantize(dtype)?;
        }
        self.lm_head.quantize(dtype)
    }

    /// Final hidden states `[B, T, C]` for `ids` `[B, T]`, which continue `cache` when given.
    pub fn hidden(&self, ids: &Tensor, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        if offset + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's context of {} tokens",
                offset + t,
                self.cfg.max_position_embeddings
            )
        }
        let mask = if t > 1 { Some(causal_mask(t, offset, self.device())?) } else { None };
        let h = self.run(ids, &Positions::From(offset), mask.as_ref(), cache.as_deref_mut())?;
        if let Some(cache) = cache {
            cache.len += t;
        }
        Ok(h)
    }

    fn run(
        &self,
        ids: &Tensor,
        pos: &Positions,
        mask: Option<&Tensor>,
        mut cache: Option<&mut Cache>,
    ) -> Result<Tensor> {
        let ctx = Ctx {
            train: self.training,
            dropout_seed: self.dropout_seed,
            first_row: self.first_row,
        };
        let mut x = self.embed_tokens.forward(ids)?; // [B, T, C]
        let embeddings_grad = x.track_op();
        if ctx.train && !embeddings_grad {
            // A training block joins the graph through its input, so the frozen embeddings
            // must be part of it; their gradient is never computed (`input_grad` false).
            x = Var::from_tensor(&x)?.as_tensor().clone();
        }
        for (i, block) in self.layers.iter().enumerate() {
            x = if ctx.train {
                let input_grad = i > 0 || embeddings_grad;
                let ckpt = self.grad_checkpoint;
                block.forward_train(&x, &self.rope, pos, mask, &ctx, ckpt, input_grad)?
            } else {
                let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                block.forward(&x, &self.rope, pos, mask, layer_cache, &ctx)?.0
            };
        }
        self.norm.forward(&x, &ctx)
    }

    /// `[.., C]` -> logits `[.., V]`.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        if self.training {
            self.lm_head.forward_frozen(h)
        } else {
            self.lm_head.forward(h)
        }
    }

    fn projs_mut(&mut self) -> impl Iterator<Item = &mut Proj> {
        self.layers.iter_mut().flat_map(|b| {
            let a = &mut b.self_attn;
            let f = &mut b.mlp;
            [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut f.gate_proj,
                &mut f.up_proj,
                &mut f.down_proj,
            ]
        })
    }

    fn projs(&self) -> impl Iterator<Item = &Proj> {
        self.layers.iter().flat_map(Block::projs)
    }

    /// Training mode: differentiable ops, frozen weights without weight gradients, adapter
    /// dropout. Inference mode (the default) uses candle's fused kernels.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Gradient checkpointing per block in training: keep only each block's input and
    /// recompute the block in the backward pass. Use [`Llama::backward`] for the gradients.
    pub fn set_grad_checkpoint(&mut self, on: bool) {
        self.grad_checkpoint = on;
    }

    /// Gradients of `loss` for every variable, the adapters included: in training the blocks
    /// compute their adapters' gradients in their own backward passes (see
    /// [`Block::backward`]), out of sight of candle's `Tensor::backward`.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        COLLECTED.with_borrow_mut(Vec::clear);
        let grads = loss.backward();
        let collected = COLLECTED.take();
        let mut grads = grads?;
        for (var, grad) in collected {
            let sum = match grads.remove(&var) {
                Some(prev) => (prev + grad)?,
                None => grad,
            };
            grads.insert(&var, sum);
        }
        Ok(grads)
    }

    /// Seed of the next forward pass's dropout masks (the trainer sets one per step).
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = seed;
    }

    /// Where the next forward pass's rows sit in the whole batch: each row's dropout masks come
    /// from the seed and the row's index, so a batch split into shards draws the masks the
    /// whole batch would.
    pub fn set_first_row(&mut self, row: usize) {
        self.first_row = row;
    }

    /// Wrap the targeted linear layers of every block with fresh LoRA adapters (`A` from
    /// `seed`, `B` zero). Replaces adapters already there.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> crate::Result<()> {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let (device, dtype) = (self.device().clone(), self.dtype());
        for p in self.projs_mut() {
            p.lora = if cfg.targets.iter().any(|t| t == p.name()) {
                Some(Lora::new(p.in_dim, p.out_dim, cfg, &mut rng, &device, dtype)?)
            } else {
                None
            };
        }
        self.lora = Some(cfg.clone());
        Ok(())
    }

    /// The adapter settings, when adapters are attached.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The trainable variables under PEFT's names
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), in layer order.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        self.projs()
            .filter_map(|p| p.lora.as_ref().map(|l| (p, l)))
            .flat_map(|(p, l)| {
                [
                    (format!("base_model.model.{}.lora_A.weight", p.path), l.a.clone()),
                    (format!("base_model.model.{}.lora_B.weight", p.path), l.b.clone()),
                ]
            })
            .collect()
    }

    /// Fold every adapter into its base weight (`W + scale * B A`) and drop the adapters; the
    /// model then runs at base speed with the adapted behaviour.
    pub fn merge_lora(&mut self) -> Result<()> {
        for p in self.projs_mut() {
            let Some(lora) = p.lora.take() else { continue };
            let Linear::Dense(l) = &p.base else {
                candle_core::bail!("cannot merge an adapter into quantized weights")
            };
            let delta = lora.delta()?;
            let w = (l.weight().to_dtype(delta.dtype())? + delta)?.to_dtype(l.weight().dtype())?;
            p.base = Linear::new(w, l.bias().cloned());
        }
        self.lora = None;
        Ok(())
    }

    /// Logits `[B, T, V]` for packed rows: `positions` `[B, T]` restart at each example and
    /// `segments` `[B, T]` number the examples of a row; attention is causal and block-diagonal,
    /// so no token attends across examples.
    pub fn forward_packed(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
    ) -> Result<Tensor> {
        self.logits(&self.hidden_packed(ids, positions, segments)?)
    }

    /// Final hidden states `[B, T, C]` of packed rows (see [`Llama::forward_packed`]).
    pub fn hidden_packed(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let seg = segments.to_vec2::<u32>()?;
        let mask: Vec<f32> = seg
            .iter()
            .flat_map(|row| {
                (0..t).flat_map(move |i| {
                    (0..t).map(
                        move |j| if j > i || row[j] != row[i] { f32::NEG_INFINITY } else { 0.0 },
                    )
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, t), self.device())?;
        self.run(ids, &Positions::Explicit(positions.clone()), Some(&mask), None)
    }

    /// Logits `[.., V]` from final hidden states `[.., C]`. Training computes them only at the
    /// positions the loss uses: the `[T, V]` logits are the largest tensors of a step.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.head(h)
    }

    /// Logits `[B, T, V]` for every position.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.head(&self.hidden(ids, cache)?)
    }

    /// Logits `[B, V]` of the last position only: generation needs nothing else, and the
    /// `[T, V]` head matmul dominates prefill for small models.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let h = self.hidden(ids, cache)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?; // [B, C]
        self.head(&last)?.to_dtype(DType::F32)
    }
}

/// Additive causal mask `[T, S]` (0 where allowed, -inf where the key lies in the future)
/// for `T` new tokens after `offset` cached ones.
fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let s = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, s), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_lets_each_token_see_its_past_only() {
        let m = causal_mask(2, 1, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn q8_0_quantized_model_tracks_the_dense_one() {
        let cfg = crate::load::preset("tiny").unwrap();
        let w = crate::load::random_weights(&cfg, DType::F32, &Device::Cpu, 2).unwrap();
        let dense =
            Llama::load(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &cfg).unwrap();
        let mut quant = dense.clone();
        quant.quantize(GgmlDType::Q8_0).unwrap();
        assert!(matches!(quant.lm_head, Linear::Quantized { .. }));
        let ids = Tensor::new(&[[1u32, 50, 60, 70, 80]], &Device::Cpu).unwrap();
        let a = dense.forward(&ids, None).unwrap();
        let b = quant.forward(&ids, None).unwrap();
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 0.02 * scale, "max error {err} vs max logit {scale}");
        assert!(err > 0.0, "quantization changed nothing");
    }
}
