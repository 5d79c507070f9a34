//! The one Llama implementation of whet: Llama 1-3.x, TinyLlama, SmolLM, Mistral (sliding
//! window), Qwen2/2.5 (q/k/v biases) and Qwen3 (q/k norm).
//!
//! Paper: Touvron et al., "LLaMA: Open and Efficient Foundation Language Models" (2023).
//! Reference: Hugging Face transformers `models/llama/modeling_llama.py`; candle-transformers
//! `models/llama.rs`. Tensor names follow Hugging Face and appear only in `vb.pp(...)`.
//!
//! Shapes: `B` batch, `T` new tokens, `S` tokens attended to (cache + new), `C` hidden size,
//! `H` query heads, `K` key/value heads, `D` head width, `M` MLP width, `V` vocabulary.
//!
//! Gradient flow: [`Llama::hidden_train`] runs each block as one node of candle's graph whose
//! backward is [`Block::backward`]; the adapters' gradients land in the [`GradCollector`] the
//! pass returns, and [`GradCollector::backward`] is the only way to get them.

use crate::adapter::Registry;
use crate::config::Config;
use crate::layers::attention::{Attention, AttentionTape};
use crate::layers::embedding::TokenEmbedding;
use crate::layers::linear::{Linear, NamedLora, Proj};
use crate::layers::mlp::{Mlp, MlpTape};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::{Positions, Rope};
use crate::layers::{Ctx, GradCollector, Grads, RowSpan, TrainPass};
use crate::lora::{Lora, LoraConfig};
use candle_core::quantized::GgmlDType;
use candle_core::Var;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
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

impl Block {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), c, eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), c, eps)?,
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

    /// Ragged-batch forward (see [`Attention::forward_rows`]).
    fn forward_rows(&self, x: &Tensor, caches: &mut [&mut KvCache], ctx: &Ctx) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(x, ctx)?;
        let mid = (x + self.self_attn.forward_rows(&normed, caches, ctx)?)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&mid, ctx)?, ctx)?.0;
        &mid + h
    }

    /// Training forward: the block is one node of candle's graph, whose backward pass runs
    /// [`Block::backward`] from the activations this forward keeps, or, with gradient
    /// checkpointing (Chen et al. 2016), from a recomputation of the block from its input: one
    /// extra forward per block buys the memory of all its activations. Backward passes of whole
    /// blocks keep candle's graph small: its backward zero-fills and adds every gradient it
    /// stores. The adapters' gradients go to `collector`; `input_grad` is false for the first
    /// block, whose input (the embeddings) needs none.
    #[allow(clippy::too_many_arguments)]
    fn forward_train(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: &Positions,
        mask: Option<&Tensor>,
        ctx: &Ctx,
        input_grad: bool,
        collector: &GradCollector,
    ) -> Result<Tensor> {
        let checkpoint = ctx.train.is_some_and(|p| p.grad_checkpoint);
        let xd = x.detach();
        let (y, tape) = self.forward(&xd, rope, pos, mask, None, ctx)?;
        let tape = if checkpoint { None } else { Some(tape) };
        let (block, rope, pos, mask, train, collector) =
            (self.clone(), rope.clone(), pos.clone(), mask.cloned(), ctx.train, collector.clone());
        crate::ops::attach(
            x,
            y,
            "block",
            Box::new(move |g, _| {
                let recomputed;
                let tape = match &tape {
                    Some(tape) => tape,
                    None => {
                        let ctx = Ctx { train, ..Ctx::default() };
                        recomputed = block.forward(&xd, &rope, &pos, mask.as_ref(), None, &ctx)?.1;
                        &recomputed
                    }
                };
                let mut grads = vec![];
                let dx = block.backward(tape, g, input_grad, &mut grads)?;
                collector.extend(grads)?;
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
        let dn = self.mlp.backward(&tape.mlp, g, grads)?;
        let dmid = (g + self.post_attention_layernorm.backward(&tape.mid, &dn)?)?;
        let Some(dn) = self.self_attn.backward(&tape.attention, &dmid, input_grad, grads)? else {
            return Ok(None);
        };
        let dx = self.input_layernorm.backward(&tape.x, &dn)?;
        Ok(Some((dmid + dx)?))
    }

    fn projs(&self) -> impl Iterator<Item = &Proj> {
        self.self_attn.projs().into_iter().chain(self.mlp.projs())
    }

    fn projs_mut(&mut self) -> impl Iterator<Item = &mut Proj> {
        self.self_attn.projs_mut().into_iter().chain(self.mlp.projs_mut())
    }
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

    /// An independent copy, to continue one prompt several ways. (`clone` would not do:
    /// candle's cache writes new positions into its buffer in place, so clones would
    /// overwrite each other's.)
    pub fn fork(&self) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut copy = KvCache::new(2, l.k_cache().max_seq_len());
            if let (Some(k), Some(v)) = (l.k()?, l.v()?) {
                copy.append(&k.contiguous()?, &v.contiguous()?)?;
            }
            layers.push(copy);
        }
        Ok(Self { layers, len: self.len })
    }
}

/// Packed rows: several examples per row, each restarting its positions.
#[derive(Debug, Clone, Copy)]
pub struct Packing<'a> {
    /// Per-token positions `[B, T]` (u32), restarting at each example.
    pub positions: &'a Tensor,
    /// Per-token example numbers `[B, T]` (u32): no token attends across examples.
    pub segments: &'a Tensor,
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: TokenEmbedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    cfg: Config,
    lora: Option<LoraConfig>,
    /// The named inference-only adapters' names, ids and weights (see
    /// [`Llama::add_named_lora`]); their matrices are in the projections.
    adapters: Registry,
}

/// One sequence of a ragged batch step (see [`Llama::forward_rows`]).
#[derive(Debug)]
pub struct Row<'a> {
    /// The tokens to run: a whole prompt, or the one token sampled last.
    pub ids: &'a [u32],
    /// The sequence's own cache, continued by `ids`.
    pub cache: &'a mut Cache,
    /// Named adapters and their weights for this sequence (none: the base model).
    pub adapters: &'a [(String, f64)],
}

impl Llama {
    /// Build the model from weights named as in Hugging Face checkpoints (`model.layers.0...`).
    /// The initializers named here are what random presets draw (see [`crate::io::presets`]).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::load_quantized(vb, cfg, None)
    }

    /// As [`Llama::load`], with each block's linear layers quantized to `quantize` as soon as
    /// the block is built, so that the f32 weights of only one block are held at a time (what
    /// the backend keeps aside, the loader cannot free).
    pub fn load_quantized(
        vb: VarBuilder,
        cfg: &Config,
        quantize: Option<GgmlDType>,
    ) -> Result<Self> {
        if let Some(q) = quantize {
            check_quantizable(cfg, q)?;
        }
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        // Embedding and head rows get std 2/sqrt(C) rather than 0.02 in random presets: with
        // RMS-normalised hidden states, 0.02 caps every logit near 0.02 * C, and a random model
        // could then never become confident — not even the overfit test could drive its loss
        // down.
        let wide = 2.0 / (c as f64).sqrt();
        let vb_m = vb.pp("model");
        let mut embed_tokens = TokenEmbedding::load(vb_m.pp("embed_tokens"), v, c, wide)?;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let mut block = Block::load(vb_m.pp("layers").pp(i), cfg)?;
                if let Some(q) = quantize {
                    block.projs_mut().try_for_each(|p| p.base.quantize(q))?;
                }
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(vb_m.pp("norm"), c, cfg.rms_norm_eps)?;
        let mut lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.dense()?.clone(), None)
        } else {
            Linear::load(vb.pp("lm_head"), c, v, false, wide)?
        };
        if let Some(q) = quantize {
            lm_head.quantize(q)?;
            embed_tokens.quantize(q, cfg.tie_word_embeddings.then_some(&lm_head))?;
        }
        let rope = Rope::new(cfg, vb.dtype(), vb.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
            lora: None,
            adapters: Registry::default(),
        })
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Quantize every linear layer, the head and (on the CPU) the embedding table — one table
    /// when the head is tied to it — to `dtype`, for inference: decoding reads every weight
    /// once per token, so smaller weights decode faster. Block size 32 types (`Q8_0`, `Q4_0`)
    /// fit any width divisible by 32.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        check_quantizable(&self.cfg, dtype)?;
        for p in self.projs_mut() {
            p.base.quantize(dtype)?;
        }
        self.lm_head.quantize(dtype)?;
        let tied = self.cfg.tie_word_embeddings.then_some(&self.lm_head);
        self.embed_tokens.quantize(dtype, tied)
    }

    /// Bytes of frozen weights one decoding step reads: every linear layer and the head, as
    /// held (quantized or not); the embedding table gives one row, and norms are left out.
    /// Decoding on a CPU is bound by reading these from memory once per token.
    pub fn decode_weight_bytes(&self) -> usize {
        self.projs().map(|p| p.base.weight_bytes()).sum::<usize>() + self.lm_head.weight_bytes()
    }

    /// Final hidden states `[B, T, C]` for `ids` `[B, T]`, which continue `cache` when given.
    pub fn hidden(&self, ids: &Tensor, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        self.check_length(offset + t)?;
        let mask = self.causal_mask(t, offset)?;
        let pos = Positions::From(offset);
        let h = self.run(ids, &pos, mask.as_ref(), cache.as_deref_mut(), &Ctx::default(), None)?;
        if let Some(cache) = cache {
            cache.len += t;
        }
        Ok(h)
    }

    /// Final hidden states `[B, T, C]` of packed rows: attention is causal and block-diagonal,
    /// so no token attends across examples.
    pub fn hidden_packed(&self, ids: &Tensor, packing: Packing) -> Result<Tensor> {
        let (pos, mask) = self.packed_layout(ids, packing)?;
        self.run(ids, &pos, Some(&mask), None, &Ctx::default(), None)
    }

    /// Final hidden states `[B, T, C]` of the reference model: this one with its trained
    /// adapter left out (the base, with a frozen copy of the adapter training started from
    /// where it started from one, see [`Llama::train_from_attached`]). No weight is copied and nothing is kept for
    /// a backward pass; packed rows with `packing`.
    pub fn hidden_reference(&self, ids: &Tensor, packing: Option<Packing>) -> Result<Tensor> {
        let ctx = Ctx { reference: true, ..Ctx::default() };
        let h = match packing {
            Some(packing) => {
                let (pos, mask) = self.packed_layout(ids, packing)?;
                self.run(ids, &pos, Some(&mask), None, &ctx, None)?
            }
            None => {
                let t = ids.dim(1)?;
                self.check_length(t)?;
                let mask = self.causal_mask(t, 0)?;
                self.run(ids, &Positions::From(0), mask.as_ref(), None, &ctx, None)?
            }
        };
        Ok(h.detach())
    }

    /// Training forward: final hidden states `[B, T, C]` of `ids` `[B, T]` (packed rows with
    /// `packing`) as part of candle's graph, and the collector the blocks' backward passes
    /// fill with the adapters' gradients: take the loss's gradients with
    /// [`GradCollector::backward`]. Frozen weights get no gradient.
    pub fn hidden_train(
        &self,
        ids: &Tensor,
        packing: Option<Packing>,
        pass: &TrainPass,
    ) -> Result<(Tensor, GradCollector)> {
        let ctx = Ctx { train: Some(*pass), ..Ctx::default() };
        let collector = GradCollector::default();
        let h = match packing {
            Some(packing) => {
                let (pos, mask) = self.packed_layout(ids, packing)?;
                self.run(ids, &pos, Some(&mask), None, &ctx, Some(&collector))?
            }
            None => {
                let t = ids.dim(1)?;
                self.check_length(t)?;
                let mask = self.causal_mask(t, 0)?;
                self.run(ids, &Positions::From(0), mask.as_ref(), None, &ctx, Some(&collector))?
            }
        };
        Ok((h, collector))
    }

    /// Training forward to logits `[B, T, V]` at every position (see [`Llama::hidden_train`]).
    pub fn forward_train(&self, ids: &Tensor, pass: &TrainPass) -> Result<(Tensor, GradCollector)> {
        let (h, collector) = self.hidden_train(ids, None, pass)?;
        Ok((self.logits(&h)?, collector))
    }

    fn check_length(&self, len: usize) -> Result<()> {
        if len > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {len} tokens exceeds the model's context of {} tokens",
                self.cfg.max_position_embeddings
            )
        }
        Ok(())
    }

    /// The additive mask of `t` new tokens after `offset` cached ones, `None` where every key
    /// may be seen (one new token within the window).
    fn causal_mask(&self, t: usize, offset: usize) -> Result<Option<Tensor>> {
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        if t == 1 && offset < window {
            return Ok(None);
        }
        Ok(Some(causal_mask(t, offset, window, self.device())?))
    }

    /// Positions and the block-diagonal causal mask `[B, 1, T, T]` of packed rows (within the
    /// sliding window, when the model has one).
    fn packed_layout(&self, ids: &Tensor, packing: Packing) -> Result<(Positions, Tensor)> {
        let (b, t) = ids.dims2()?;
        let seg = packing.segments.to_vec2::<u32>()?;
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = seg
            .iter()
            .flat_map(|row| {
                (0..t).flat_map(move |i| {
                    (0..t).map(move |j| {
                        if j > i || row[j] != row[i] || i - j >= window {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, t), self.device())?;
        Ok((Positions::Explicit(packing.positions.clone()), mask))
    }

    fn run(
        &self,
        ids: &Tensor,
        pos: &Positions,
        mask: Option<&Tensor>,
        mut cache: Option<&mut Cache>,
        ctx: &Ctx,
        collector: Option<&GradCollector>,
    ) -> Result<Tensor> {
        let mut x = self.embed_tokens.forward(ids)?; // [B, T, C]
        let embeddings_grad = x.track_op();
        if let Some(collector) = collector {
            if !embeddings_grad {
                // A training block joins the graph through its input, so the frozen embeddings
                // must be part of it; their gradient is never computed (`input_grad` false).
                x = Var::from_tensor(&x)?.as_tensor().clone();
            }
            for (i, block) in self.layers.iter().enumerate() {
                let input_grad = i > 0 || embeddings_grad;
                x = block.forward_train(&x, &self.rope, pos, mask, ctx, input_grad, collector)?;
            }
        } else {
            for (i, block) in self.layers.iter().enumerate() {
                let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                x = block.forward(&x, &self.rope, pos, mask, layer_cache, ctx)?.0;
            }
        }
        self.norm.forward(&x, ctx)
    }

    fn projs_mut(&mut self) -> impl Iterator<Item = &mut Proj> {
        self.layers.iter_mut().flat_map(Block::projs_mut)
    }

    fn projs(&self) -> impl Iterator<Item = &Proj> {
        self.layers.iter().flat_map(Block::projs)
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
            p.reference = None;
        }
        self.lora = Some(cfg.clone());
        Ok(())
    }

    /// Train on from the adapters [`Llama::attach_lora`] attached (an SFT adapter a preference
    /// run continues): they become the trained adapter under `cfg`, whose targets, rank and
    /// scale they must have (`cfg`'s dropout applies), and a frozen copy of them the reference
    /// model's (see [`Llama::hidden_reference`]), so that the reference is the starting point
    /// rather than the bare base.
    pub fn train_from_attached(&mut self, cfg: &LoraConfig) -> crate::Result<()> {
        for p in self.projs_mut() {
            let wanted = cfg.targets.iter().any(|t| t == p.name());
            let path = p.path.clone();
            match (&mut p.lora, wanted) {
                (Some(lora), true) => {
                    let rank = lora.a.dim(0)?;
                    if rank != cfg.rank || (lora.scale - cfg.scale()).abs() > 1e-9 * cfg.scale() {
                        return Err(crate::Error::Lora(format!(
                            "`{path}` has an adapter of rank {rank} and scale {}, but training asks for rank {} and scale {}",
                            lora.scale,
                            cfg.rank,
                            cfg.scale()
                        )));
                    }
                    lora.dropout = cfg.dropout;
                    // Copied: the optimizer updates the trained adapter's storage in place.
                    let frozen = Lora::from_tensors(
                        &lora.a.as_tensor().copy()?,
                        &lora.b.as_tensor().copy()?,
                        lora.scale,
                        lora.a.device(),
                        lora.a.dtype(),
                    )?;
                    let weight =
                        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1f64.to_bits()));
                    p.reference = Some(NamedLora::new(usize::MAX, &frozen, weight)?);
                }
                (None, false) => p.reference = None,
                (Some(_), false) => {
                    return Err(crate::Error::Lora(format!(
                        "`{path}` has an adapter, but training's targets ({}) leave it out",
                        cfg.targets.join(",")
                    )))
                }
                (None, true) => {
                    return Err(crate::Error::Lora(format!(
                    "`{path}` has no adapter to train on, but training's targets ({}) include it",
                    cfg.targets.join(",")
                )))
                }
            }
        }
        self.lora = Some(cfg.clone());
        Ok(())
    }

    /// Every weight under its Hugging Face name, as the model holds it now (adapters merged
    /// with [`Llama::merge_lora`] included; unmerged adapters are not weights and are refused).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        if !self.adapters.is_empty() {
            candle_core::bail!(
                "the model has named adapters applied unmerged; merge one adapter instead"
            )
        }
        let mut out =
            vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.dense()?.clone())];
        for block in &self.layers {
            for norm in [&block.input_layernorm, &block.post_attention_layernorm]
                .into_iter()
                .chain(block.self_attn.norms())
            {
                out.push((norm.name.clone(), norm.weight.clone()));
            }
            for p in block.projs() {
                if p.lora.is_some() {
                    candle_core::bail!("`{}` has an unmerged adapter; merge it first", p.path)
                }
                let (w, b) = p.base.dense()?;
                out.push((format!("{}.weight", p.path), w.clone()));
                if let Some(b) = b {
                    out.push((format!("{}.bias", p.path), b.clone()));
                }
            }
        }
        out.push((self.norm.name.clone(), self.norm.weight.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.dense()?.0.clone()));
        }
        Ok(out)
    }

    /// Attach adapters read from a file: `adapter(path, in, out)` gives the adapter of the
    /// projection at `path` (`model.layers.0.self_attn.q_proj`), or `None` to leave it bare.
    /// Replaces adapters already there; the model then has no [`LoraConfig`] (ranks and
    /// scales may differ per layer).
    pub fn attach_lora(
        &mut self,
        mut adapter: impl FnMut(&str, usize, usize) -> crate::Result<Option<Lora>>,
    ) -> crate::Result<()> {
        for p in self.projs_mut() {
            p.lora = adapter(&p.path, p.in_dim, p.out_dim)?;
            p.reference = None;
        }
        self.lora = None;
        Ok(())
    }

    /// Add a named adapter for inference, applied unmerged beside the base (and beside any
    /// other named adapter) with `weight`: `adapter(path, in, out)` as for
    /// [`Llama::attach_lora`]. Training ignores named adapters. Clones share the weights.
    pub fn add_named_lora(
        &mut self,
        name: &str,
        weight: f64,
        mut adapter: impl FnMut(&str, usize, usize) -> crate::Result<Option<Lora>>,
    ) -> crate::Result<()> {
        // The name and weight are checked first, every projection's adapter is read and laid
        // out before any is attached: a failure leaves the model as it was.
        let (id, cell) = self.adapters.add(name, weight)?;
        let mut built = || -> crate::Result<Vec<(usize, NamedLora)>> {
            let mut out = vec![];
            for (i, p) in self.projs().enumerate() {
                if let Some(lora) = adapter(&p.path, p.in_dim, p.out_dim)? {
                    out.push((i, NamedLora::new(id, &lora, cell.clone())?));
                }
            }
            Ok(out)
        };
        let built = match built() {
            Ok(b) => b,
            Err(e) => {
                self.adapters.remove(name)?;
                return Err(e);
            }
        };
        let mut built = built.into_iter().peekable();
        for (i, p) in self.projs_mut().enumerate() {
            if let Some((_, named)) = built.next_if(|(j, _)| *j == i) {
                p.named.push(named);
            }
        }
        Ok(())
    }

    /// Remove the named adapter `name` (an unknown name is an error listing the known ones).
    pub fn remove_named_lora(&mut self, name: &str) -> crate::Result<()> {
        let id = self.adapters.remove(name)?;
        for p in self.projs_mut() {
            p.named.retain(|n| n.id != id);
        }
        Ok(())
    }

    /// The named adapters and their current weights, in the order they were added.
    pub fn adapter_weights(&self) -> Vec<(String, f64)> {
        self.adapters.weights()
    }

    /// The named adapters, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.names()
    }

    /// Set the weight of every named adapter: those in `weights` get theirs, the others 0
    /// (off). An unknown name is an error listing the known ones.
    pub fn set_adapter_weights(&self, weights: &[(&str, f64)]) -> crate::Result<()> {
        self.adapters.set_weights(weights)
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
            p.reference = None;
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

    /// Logits `[B, T, V]` for packed rows (see [`Llama::hidden_packed`]).
    pub fn forward_packed(&self, ids: &Tensor, packing: Packing) -> Result<Tensor> {
        self.logits(&self.hidden_packed(ids, packing)?)
    }

    /// Logits `[.., V]` from final hidden states `[.., C]`; differentiable (frozen head) when
    /// `h` comes from [`Llama::hidden_train`]. Training computes them only at the positions the
    /// loss uses: the `[T, V]` logits are the largest tensors of a step.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(h)
    }

    /// Mean cross-entropy of the logits of hidden states `h` `[N, C]` against `targets` `[N]`
    /// (u32), differentiable in `h`; on the CPU the `[N, V]` logits are never held whole (see
    /// `ops::linear_cross_entropy`).
    pub fn loss(&self, h: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.lm_head.cross_entropy(h, targets)
    }

    /// Logits `[B, T, V]` for every position.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.logits(&self.hidden(ids, cache)?)
    }

    /// Logits `[B, V]` of the last position only: generation needs nothing else, and the
    /// `[T, V]` head matmul dominates prefill for small models.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let h = self.hidden(ids, cache)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?; // [B, C]
        self.logits(&last)?.to_dtype(DType::F32)
    }
}

impl Llama {
    /// One step of a ragged batch: each row's tokens continue its own cache with its own
    /// adapters (the weights set by [`Llama::set_adapter_weights`] do not apply), and the
    /// result is the logits `[R, V]` (f32) of each row's last token. The rows are laid end to
    /// end, so a step costs the sum of the rows' lengths, not their number times the longest:
    /// the linear layers (most of the work) run once over all rows, and attention runs per
    /// row over its own cache. Rows that share adapters should be neighbours: they then share
    /// one LoRA matmul per projection.
    pub fn forward_rows(&self, rows: &mut [Row]) -> crate::Result<Tensor> {
        let mut spans = Vec::with_capacity(rows.len());
        let mut ids = Vec::new();
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        for row in rows.iter() {
            let (t, offset) = (row.ids.len(), row.cache.len);
            if t == 0 {
                return Err(candle_core::Error::msg("a batch row has no tokens").into());
            }
            self.check_length(offset + t)?;
            let adapters = self.adapters.resolve(row.adapters)?;
            let (cos, sin) = self.rope.tables(&Positions::From(offset), 1, t)?;
            let mask = if t == 1 && offset < window {
                None
            } else {
                Some(causal_mask(t, offset, window, self.device())?)
            };
            spans.push(RowSpan { start: ids.len(), len: t, adapters, cos, sin, mask });
            ids.extend_from_slice(row.ids);
        }
        let ctx = Ctx { rows: Some(&spans), ..Ctx::default() };
        let n = ids.len();
        let mut x = self.embed_tokens.forward(&Tensor::from_vec(ids, (1, n), self.device())?)?;
        for (i, block) in self.layers.iter().enumerate() {
            let mut caches: Vec<&mut KvCache> =
                rows.iter_mut().map(|r| &mut r.cache.layers[i]).collect();
            x = block.forward_rows(&x, &mut caches, &ctx)?;
        }
        for row in rows.iter_mut() {
            row.cache.len += row.ids.len();
        }
        let last: Vec<u32> = spans.iter().map(|s| (s.start + s.len - 1) as u32).collect();
        let last = Tensor::from_vec(last, spans.len(), self.device())?;
        let h = self.norm.forward(&x.squeeze(0)?.index_select(&last, 0)?, &Ctx::default())?;
        Ok(self.logits(&h)?.to_dtype(DType::F32)?)
    }
}

/// Additive causal mask `[T, S]` (0 where allowed, -inf where the key lies in the future or
/// `window` or more positions back, as transformers' sliding window) for `T` new tokens after
/// `offset` cached ones.
fn causal_mask(t: usize, offset: usize, window: usize, device: &Device) -> Result<Tensor> {
    let s = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let q = offset + i;
            (0..s).map(move |j| if j > q || q - j >= window { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (t, s), device)
}

/// Every linear layer's input width must be whole blocks of `dtype`.
fn check_quantizable(cfg: &Config, dtype: GgmlDType) -> Result<()> {
    let block = dtype.block_size();
    let (c, m) = (cfg.hidden_size, cfg.intermediate_size);
    if c % block != 0 || m % block != 0 || (cfg.num_heads * cfg.head_dim) % block != 0 {
        candle_core::bail!("cannot quantize to {dtype:?}: layer widths {c} and {m} are not multiples of its block size {block}")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_lets_each_token_see_its_past_only() {
        let m = causal_mask(2, 1, usize::MAX, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0]);
        // A window of 2: the token itself and the one before.
        let ninf = f32::NEG_INFINITY;
        let m = causal_mask(2, 2, 2, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![ninf, 0.0, 0.0, ninf]);
        assert_eq!(m[1], vec![ninf, ninf, 0.0, 0.0]);
    }

    #[test]
    fn q8_0_quantized_model_tracks_the_dense_one() {
        let cfg = crate::io::presets::preset("tiny").unwrap();
        let w = crate::io::presets::random_weights(&cfg, DType::F32, &Device::Cpu, 2).unwrap();
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
