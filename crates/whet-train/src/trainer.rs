//! The training loop, readable top to bottom in [`train`]: batch -> forward -> the objective's
//! loss -> backward -> clip -> AdamW step -> periodic validation and checkpoint (nanoGPT's
//! `train.py`). What the loss is lives in [`crate::objective`].

use crate::checkpoint::{self, TrainState};
use crate::config::{learning_rate, ObjectiveKind, TrainConfig};
use crate::dist::World;
use crate::error::TrainError;
use crate::events::{Event, Stopped, Summary};
use crate::objective::{Kto, Loss, Objective, Preference, PreferenceLoss, Row, Sft};
use crate::optim::{AdamW, AdamWParams};
use crate::shards::Shards;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use whet_data::Tokenized;
use whet_model::{Llama, TrainPass};

/// Training and validation examples, already tokenized and masked.
#[derive(Debug, Clone, Default)]
pub struct TrainData {
    /// Training examples.
    pub train: Vec<Tokenized>,
    /// Validation examples (may be empty).
    pub valid: Vec<Tokenized>,
    /// Where each split came from (`train` -> `data/x/train.jsonl`), for messages.
    pub sources: BTreeMap<String, String>,
}

impl TrainData {
    /// sha256 of each split's tokens and masks: a checkpoint records them, and a resume with
    /// other data is refused (the data order, and so every later step, would differ).
    pub fn fingerprints(&self) -> BTreeMap<String, String> {
        [("train", &self.train), ("valid", &self.valid)]
            .into_iter()
            .map(|(name, examples)| {
                let mut bytes = vec![];
                for e in examples {
                    for e in std::iter::once(e).chain(e.rejected.as_deref()) {
                        bytes.extend((e.ids.len() as u64).to_le_bytes());
                        bytes.extend(e.ids.iter().flat_map(|i| i.to_le_bytes()));
                        bytes.extend(&e.mask);
                    }
                    // KTO's labels (absent from other data, whose fingerprints stay as they were).
                    if let Some(d) = e.desirable {
                        bytes.push(2 + u8::from(d));
                    }
                }
                (name.to_string(), whet_data::cache::sha256_hex(&bytes))
            })
            .collect()
    }
}

/// The fingerprint key of `--init-adapter`'s tensors, beside the data splits'.
const INIT_ADAPTER: &str = "init-adapter";

/// How many rows the training split makes with `cfg` (packed rows with `pack`): what one epoch
/// of micro-batches covers.
pub fn training_rows(data: &TrainData, cfg: &TrainConfig) -> usize {
    rows(&data.train, cfg).len()
}

fn rows(examples: &[Tokenized], cfg: &TrainConfig) -> Vec<Row> {
    if cfg.pack {
        whet_data::pack::pack(examples, cfg.max_seq_len)
            .into_iter()
            .map(|r| Row {
                ids: r.ids,
                mask: r.mask,
                packed: Some((r.positions, r.segments)),
                rejected: None,
                desirable: None,
                reference: None,
            })
            .collect()
    } else {
        examples
            .iter()
            .map(|e| {
                let n = e.ids.len().min(cfg.max_seq_len);
                let rejected = e.rejected.as_ref().map(|r| {
                    let n = r.ids.len().min(cfg.max_seq_len);
                    (r.ids[..n].to_vec(), r.mask[..n].to_vec())
                });
                Row {
                    ids: e.ids[..n].to_vec(),
                    mask: e.mask[..n].to_vec(),
                    packed: None,
                    rejected,
                    desirable: e.desirable,
                    reference: None,
                }
            })
            .collect()
    }
}

/// One row of a micro-batch as the loop runs it: token ids, the loss mask (1 where the token
/// is trained) and each token's position within its own example (packed rows restart at 0).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BatchRow {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 where the loss applies.
    pub mask: Vec<u8>,
    /// Position of each token in its example.
    pub positions: Vec<u32>,
}

/// The rows of every micro-batch that [`train`] runs with `cfg` on `data` (single process), in
/// the order it runs them: `steps x grad_accum` batches, packed when `cfg.pack`. Benchmarks
/// hand them to a peer so that both sides train on the same tokens.
pub fn micro_batches(data: &TrainData, cfg: &TrainConfig) -> Vec<Vec<BatchRow>> {
    let rows = rows(&data.train, cfg);
    if rows.is_empty() {
        return vec![];
    }
    let mut order = (0, vec![]);
    (0..cfg.steps * cfg.grad_accum)
        .map(|g| {
            micro_batch(&rows, cfg.batch_size, cfg.seed, g, &mut order)
                .into_iter()
                .map(|r| BatchRow {
                    ids: r.ids.clone(),
                    mask: r.mask.clone(),
                    positions: match &r.packed {
                        Some((p, _)) => p.clone(),
                        None => (0..r.ids.len() as u32).collect(),
                    },
                })
                .collect()
        })
        .collect()
}

/// A scalar tensor's value on the host. Reduced on the device in its own dtype (f32 for
/// losses and adapter gradients) and converted here: Metal cannot cast to f64 on the device.
fn host_scalar(t: &Tensor) -> candle_core::Result<f64> {
    if t.dtype() == candle_core::DType::F64 {
        return t.to_scalar::<f64>();
    }
    Ok(f64::from(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?))
}

/// Scale `grads` so that their global L2 norm is at most `max` (0 = no clipping), as
/// `torch.nn.utils.clip_grad_norm_` does; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max: f64) -> candle_core::Result<f64> {
    let norm_sq: f64 = grads
        .iter()
        .map(|g| host_scalar(&g.sqr()?.sum_all()?))
        .sum::<candle_core::Result<f64>>()?;
    let norm = norm_sq.sqrt();
    if max > 0.0 && norm > max {
        let scale = max / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// This rank's part of the loss (the objective's mean over the units of all `rows`) and of the
/// adapter gradients of `weight * loss` for one micro-batch, and the number of tokens it ran.
/// The rank takes its consecutive rows of the batch ([`World::rows`]); shards of those run
/// side by side (see [`Shards`]), each shard's loss its share of the whole batch's and the
/// gradients summed in shard order, so that a run repeats bit for bit on the same machine, and
/// the ranks' parts sum to the single-process step.
#[allow(clippy::too_many_arguments)]
fn forward_backward(
    objective: &dyn Objective,
    model: &Llama,
    rows: &[&Row],
    dropout_seed: u64,
    grad_checkpoint: bool,
    weight: f64,
    vars: &[candle_core::Var],
    shards: &Shards,
    world: &World,
    device: &Device,
) -> Result<Part, TrainError> {
    let total = objective.units(rows);
    if total == 0 {
        return Err(TrainError::Run("a batch without trained tokens".into()));
    }
    let mine = world.rows(rows.len());
    let offset = mine.start;
    let sums = batch_sums(objective, model, rows, &rows[mine.clone()], shards, world, device)?;
    let parts = shards.run(&rows[mine], |shard, first_row| {
        let first_row = offset + first_row;
        if objective.units(shard) == 0 {
            return Ok(None);
        }
        let pass = TrainPass { dropout_seed, first_row, grad_checkpoint };
        let Loss { loss, collector, metrics, tokens } =
            objective.loss(model, shard, rows, &sums, Some(&pass), device)?;
        let collector =
            collector.ok_or_else(|| TrainError::Run("internal error: no gradients".into()))?;
        let store = collector.backward(&(&loss * weight)?)?;
        let grads = vars
            .iter()
            .map(|var| {
                // Every adapter must receive a gradient: a missing one means the graph was cut.
                store.get(var).cloned().ok_or_else(|| {
                    TrainError::Run("internal error: an adapter got no gradient".into())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((host_scalar(&loss)?, tokens, grads, metrics)))
    })?;
    let (mut loss, mut tokens, mut grads) = (0.0, 0, None::<Vec<Tensor>>);
    let mut metrics: Vec<(&'static str, f64)> = vec![];
    for (l, t, g, m) in parts.into_iter().flatten() {
        loss += l;
        tokens += t;
        add_metrics(&mut metrics, &m, 1.0);
        grads = Some(match grads {
            Some(sum) => sum.iter().zip(&g).map(|(a, b)| a + b).collect::<Result<_, _>>()?,
            None => g,
        });
    }
    // A rank whose rows train nothing (or that has none) adds zeros.
    let grads = match grads {
        Some(g) => g,
        None => vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_, _>>()?,
    };
    Ok(Part { loss, tokens, grads, metrics })
}

/// The objective's batch-wide sums over `whole`, of which this rank has the rows `mine`: the
/// shares of its shards added, then of every rank.
#[allow(clippy::too_many_arguments)]
fn batch_sums(
    objective: &dyn Objective,
    model: &Llama,
    whole: &[&Row],
    mine: &[&Row],
    shards: &Shards,
    world: &World,
    device: &Device,
) -> Result<Vec<f64>, TrainError> {
    let count = objective.batch_sum_count();
    if count == 0 {
        return Ok(vec![]);
    }
    // A rank (or shard) without rows of this batch adds zeros, and runs no empty forward.
    let parts = shards.run(mine, |shard, _| {
        if shard.is_empty() {
            return Ok(vec![0.0; count]);
        }
        objective.batch_sums(model, shard, whole, device)
    })?;
    let mut sums = vec![0.0; count];
    for part in parts {
        for (s, v) in sums.iter_mut().zip(part) {
            *s += v;
        }
    }
    world.sum_f64(&mut sums)?;
    Ok(sums)
}

/// A rank's part of one micro-batch: the loss and metrics weighted by the part's share of the
/// batch, the tokens it ran, and its adapter gradients.
struct Part {
    loss: f64,
    tokens: usize,
    grads: Vec<Tensor>,
    metrics: Vec<(&'static str, f64)>,
}

/// `sum[k] += weight * add[k]`, by name, keeping the objective's order.
fn add_metrics(sum: &mut Vec<(&'static str, f64)>, add: &[(&'static str, f64)], weight: f64) {
    for &(name, v) in add {
        match sum.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s += weight * v,
            None => sum.push((name, weight * v)),
        }
    }
}

/// What a failed distributed step leaves: the intact checkpoint and how to continue from it.
fn recovery(run: &Path) -> String {
    format!(
        "the last checkpoint ({}) is intact; hint: `whet train --out {} --resume` continues from it, with any number of ranks",
        checkpoint::describe(run),
        run.display()
    )
}

/// Sum this rank's `grads` and `[loss, tokens]` over all ranks: one f32 buffer holding
/// every LoRA gradient end to end, and one small f64 one; returns the seconds the sums took
/// (after every rank has checked in).
fn all_reduce(
    world: &World,
    step: usize,
    grads: &mut [Tensor],
    scalars: &mut [f64],
) -> Result<f64, TrainError> {
    if world.size() == 1 {
        return Ok(0.0);
    }
    // A dead or hung rank fails the job here, named, within the timeout. Once rank 0 has heard
    // from every rank, what it times is the sum itself, not the wait for a slower rank.
    world.check_in(step)?;
    let start = Instant::now();
    let flat: Vec<Tensor> = grads
        .iter()
        .map(|g| g.flatten_all()?.to_dtype(candle_core::DType::F32))
        .collect::<Result<_, _>>()?;
    // One buffer, one all-reduce: NCCL on CUDA devices where built in, else MPI on the host.
    let summed = world.sum_tensor(&Tensor::cat(&flat, 0)?)?;
    world.sum_f64(scalars)?;
    let mut at = 0;
    for g in grads.iter_mut() {
        let n = g.elem_count();
        *g = summed.narrow(0, at, n)?.reshape(g.shape())?.to_dtype(g.dtype())?;
        at += n;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Rank 0's adapter values on every rank (their seeded initialisations already agree; this
/// makes it so whatever the ranks' RNGs or files did).
fn broadcast_adapter(world: &World, vars: &[candle_core::Var]) -> Result<(), TrainError> {
    if world.size() == 1 {
        return Ok(());
    }
    for v in vars {
        let mut host = v.as_tensor().flatten_all()?.to_dtype(candle_core::DType::F32)?;
        let mut buf = host.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        world.broadcast_f32(&mut buf)?;
        host = Tensor::from_vec(buf, v.shape(), &Device::Cpu)?;
        v.set(&host.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    Ok(())
}

/// Refuse a job whose ranks would not train the same thing: rank 0's digest of the resolved
/// settings and data, and of the whet binary, against each rank's; and more ranks than rows.
fn check_ranks_agree(
    world: &World,
    cfg: &TrainConfig,
    fingerprints: &BTreeMap<String, String>,
) -> Result<(), TrainError> {
    if world.size() == 1 {
        return Ok(());
    }
    let rank = world.rank();
    if world.size() > cfg.batch_size {
        return Err(TrainError::OnRank {
            rank,
            msg: format!(
                "{} ranks but `batch_size` = {}: every rank needs at least one row of each micro-batch; hint: raise --batch-size to at least {} (the global batch) or start fewer ranks",
                world.size(),
                cfg.batch_size,
                world.size()
            ),
        });
    }
    let settings = format!("{}{fingerprints:?}", cfg.to_toml());
    let exe = std::env::current_exe().and_then(std::fs::read).unwrap_or_default();
    let digests = [settings.as_bytes(), &exe].map(|b| whet_data::cache::sha256_hex(b).into_bytes());
    let mut flags = vec![0.0; 2 * world.size()];
    for (k, mine) in digests.iter().enumerate() {
        let mut root = mine.clone();
        world.broadcast_bytes(&mut root)?;
        if &root != mine {
            flags[2 * rank + k] = 1.0;
        }
    }
    world.sum_f64(&mut flags)?;
    let differing: Vec<String> = (0..world.size())
        .filter_map(|r| {
            let what = match (flags[2 * r] > 0.0, flags[2 * r + 1] > 0.0) {
                (false, false) => return None,
                (true, false) => "its settings or data",
                (false, true) => "its whet binary",
                (true, true) => "its settings or data, and its whet binary",
            };
            Some(format!("rank {r}: {what}"))
        })
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    let msg = format!(
        "the ranks disagree with rank 0 ({}); hint: start every rank with the same command, data and whet build",
        differing.join("; ")
    );
    Err(if world.is_root() { TrainError::Dist(msg) } else { TrainError::OnRank { rank, msg } })
}

/// The rows of micro-batch `g`: epochs are seeded shuffles of all rows, so the data order is a
/// function of `(seed, g)` alone and a resumed run sees exactly what an uninterrupted one would.
/// `order` caches the current epoch's permutation.
fn micro_batch<'a>(
    rows: &'a [Row],
    batch: usize,
    seed: u64,
    g: usize,
    order: &mut (usize, Vec<usize>),
) -> Vec<&'a Row> {
    let per_epoch = rows.len().div_ceil(batch);
    let (epoch, i) = (g / per_epoch, g % per_epoch);
    if order.1.len() != rows.len() || order.0 != epoch {
        let mut perm: Vec<usize> = (0..rows.len()).collect();
        perm.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
            seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
        *order = (epoch, perm);
    }
    order.1[i * batch..((i + 1) * batch).min(rows.len())].iter().map(|&k| &rows[k]).collect()
}

/// Mean validation loss (and the objective's metrics) over all validation rows, in inference
/// mode (no adapter dropout, no activations kept for a backward pass); batches are split
/// across ranks and into shards like training's, each batch weighted by its units, and the
/// sums reduced.
fn evaluate(
    objective: &dyn Objective,
    model: &Llama,
    rows: &[Row],
    batch: usize,
    shards: &Shards,
    world: &World,
    device: &Device,
) -> Result<(f64, Vec<(&'static str, f64)>), TrainError> {
    let names = objective.metric_names();
    // Per metric, the weighted sum and the units of the batches that had it (a KTO batch
    // without undesirable answers has no `rewards/rejected`: NaN, left out of its mean).
    let (mut sums, mut n) = (vec![0.0; 1 + 2 * names.len()], 0usize);
    for chunk in rows.chunks(batch) {
        let whole: Vec<&Row> = chunk.iter().collect();
        let k = objective.units(&whole);
        if k == 0 {
            continue;
        }
        n += k;
        let refs: Vec<&Row> = chunk[world.rows(chunk.len())].iter().collect();
        let batch_sums = batch_sums(objective, model, &whole, &refs, shards, world, device)?;
        let parts = shards.run(&refs, |shard, _| {
            if objective.units(shard) == 0 {
                return Ok(None);
            }
            let l = objective.loss(model, shard, &whole, &batch_sums, None, device)?;
            Ok(Some((host_scalar(&l.loss)?, l.metrics)))
        })?;
        let mut batch = vec![0.0; names.len()];
        for (loss, metrics) in parts.into_iter().flatten() {
            sums[0] += loss * k as f64;
            for (name, v) in metrics {
                if let Some(at) = names.iter().position(|x| *x == name) {
                    batch[at] += v;
                }
            }
        }
        // A metric the batch has no value for is NaN in every share of it (the objective
        // decides from the whole batch); each rank adds its rows' part of the batch's weight,
        // so the weights add up to the batch's units once over the ranks.
        let part = refs.len() as f64 / chunk.len() as f64;
        for (at, v) in batch.into_iter().enumerate() {
            if v.is_finite() {
                sums[1 + at] += v * k as f64;
                sums[1 + names.len() + at] += k as f64 * part;
            }
        }
    }
    // Every rank reduces the objective's metric names in the same order.
    world.sum_f64(&mut sums)?;
    if n == 0 {
        return Ok((f64::NAN, vec![]));
    }
    let m = names.len();
    let metrics = names
        .into_iter()
        .enumerate()
        .map(|(at, name)| (name, sums[1 + at] / sums[1 + m + at]))
        .collect();
    Ok((sums[0] / n as f64, metrics))
}

/// Train LoRA adapters on `model` into `run`; with `resume`, continue from `run`'s checkpoint.
/// `stop` (set by Ctrl-C) ends the run after the current step with a checkpoint. In a `world`
/// of several ranks each runs its rows of every batch, the gradients are summed across them,
/// and rank 0 alone writes `run`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &mut Llama,
    data: &TrainData,
    cfg: &TrainConfig,
    run: &Path,
    resume: bool,
    stop: &AtomicBool,
    world: &World,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary, TrainError> {
    if data.train.is_empty() {
        return Err(TrainError::Run("the training set is empty".into()));
    }
    let mut train_rows = rows(&data.train, cfg);
    let mut valid_rows = rows(&data.valid, cfg);
    let mut resolved = cfg.clone();
    resolved.resolve_steps(train_rows.len());
    let cfg = &resolved;
    let (lora, schedule) = cfg.validate()?;
    let device = model.device().clone();
    // Hashed once: the ranks compare them, the checkpoint records them.
    let mut fingerprints = data.fingerprints();
    match &cfg.init_adapter {
        None => model.add_lora(&lora, cfg.seed)?,
        Some(dir) => {
            let dir = Path::new(dir);
            whet_model::adapter::train_on_from(model, dir, &lora)?;
            // A resume must start from the same adapter: the reference model is a copy of it.
            let file = dir.join("adapter_model.safetensors");
            let bytes = std::fs::read(&file)
                .map_err(|e| TrainError::Run(format!("{}: {e}", file.display())))?;
            fingerprints.insert(INIT_ADAPTER.into(), whet_data::cache::sha256_hex(&bytes));
        }
    }
    check_ranks_agree(world, cfg, &fingerprints)?;
    prepare_run_dir(world, run, cfg, resume)?;
    let vars: Vec<candle_core::Var> = model.lora_vars().into_iter().map(|(_, v)| v).collect();
    let shards = Shards::new(&device, cfg.batch_size)?;
    let params = AdamWParams {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(vars.clone(), params)?;
    let mut state = TrainState::default();
    if resume {
        // Every rank reads the checkpoint rank 0 wrote.
        state = checkpoint::load(run, model, &mut opt)?;
        for (split, was) in &state.data_sha256 {
            if split == INIT_ADAPTER && fingerprints.get(split) != Some(was) {
                return Err(TrainError::Run(format!(
                    "cannot resume {}: the --init-adapter {} is not the adapter the run started from; hint: resume with the adapter the run started with, or start a new run",
                    run.display(),
                    cfg.init_adapter.as_deref().unwrap_or("(none)")
                )));
            }
            if fingerprints.get(split) != Some(was) {
                let source = data.sources.get(split).map(|s| format!(" ({s})")).unwrap_or_default();
                return Err(TrainError::Run(format!(
                    "cannot resume {}: the {split} data{source} changed since the checkpoint; hint: resume with the data the run started with, or start a new run",
                    run.display()
                )));
            }
        }
    }
    broadcast_adapter(world, &vars)?;
    state.data_sha256 = fingerprints;
    let root = world.is_root();
    let mut metrics = if root { Some(checkpoint::Metrics::open(run, state.step)?) } else { None };
    let mut last_loss = None;
    let mut stopped = None;
    let mut order = (0, vec![]);
    let preference = |loss| Preference {
        loss,
        beta: cfg.beta,
        label_smoothing: cfg.label_smoothing,
        gamma: cfg.simpo_gamma,
        precompute_ref: cfg.precompute_ref,
        rpo_alpha: cfg.rpo_alpha,
    };
    let objective: Box<dyn Objective> = match cfg.objective {
        ObjectiveKind::Sft => Box::new(Sft),
        ObjectiveKind::Dpo => Box::new(preference(PreferenceLoss::Dpo)),
        ObjectiveKind::Ipo => Box::new(preference(PreferenceLoss::Ipo)),
        ObjectiveKind::Simpo => Box::new(preference(PreferenceLoss::Simpo)),
        ObjectiveKind::Orpo => Box::new(preference(PreferenceLoss::Orpo)),
        ObjectiveKind::Kto => Box::new(Kto {
            beta: cfg.beta,
            desirable_weight: cfg.desirable_weight,
            undesirable_weight: cfg.undesirable_weight,
            precompute_ref: cfg.precompute_ref,
            max_len: cfg.max_seq_len,
        }),
    };
    let objective = objective.as_ref();
    // Each objective's kind of row, every row of that kind (the CLI names the file and line
    // of the first that is not; this guards the library's other callers).
    let all = train_rows.iter().chain(&valid_rows);
    let pairs = all.clone().filter(|r| r.rejected.is_some()).count();
    let unpaired = all.filter(|r| r.desirable.is_some()).count();
    let rows_n = train_rows.len() + valid_rows.len();
    let o = cfg.objective.name();
    if cfg.objective.is_paired() && pairs < rows_n {
        return Err(TrainError::Run(format!(
            "--objective {o} trains on preference pairs, but the data holds examples without a rejected answer; hint: records with `prompt`, `chosen` and `rejected`"
        )));
    }
    if cfg.objective == ObjectiveKind::Kto && unpaired < rows_n {
        return Err(TrainError::Run(
            "--objective kto trains on answers marked desirable or not, but the data holds examples without a label; hint: records with `prompt`, `completion` and `label`".into(),
        ));
    }
    if !cfg.objective.is_preference() && pairs + unpaired > 0 {
        return Err(TrainError::Run(
            "the data holds preference records, which --objective sft does not train on; hint: --objective dpo (or ipo, simpo, orpo) for pairs, kto for labelled answers".into(),
        ));
    }
    // The reference pass leaves the trained adapter out, so it may run once it is attached.
    objective.prepare(model, &mut train_rows, cfg.batch_size, &device)?;
    objective.prepare(model, &mut valid_rows, cfg.batch_size, &device)?;

    world.at_step(state.step, Some(recovery(run)));
    for step in state.step..cfg.steps {
        world.at_step(step, None);
        let start = Instant::now();
        let lr = learning_rate(schedule, cfg.learning_rate, cfg.warmup_steps, cfg.steps, step);
        // Forward and backward over grad_accum micro-batches, summing gradients.
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.state.len()];
        let (mut loss_sum, mut tokens) = (0.0, 0usize);
        let mut metrics_sum: Vec<(&'static str, f64)> =
            objective.metric_names().into_iter().map(|name| (name, 0.0)).collect();
        for a in 0..cfg.grad_accum {
            let g = step * cfg.grad_accum + a;
            let seed = cfg.seed.wrapping_mul(31).wrapping_add(g as u64);
            let batch = micro_batch(&train_rows, cfg.batch_size, cfg.seed, g, &mut order);
            let weight = 1.0 / cfg.grad_accum as f64;
            let part = forward_backward(
                objective,
                model,
                &batch,
                seed,
                cfg.grad_checkpoint,
                weight,
                &vars,
                &shards,
                world,
                &device,
            )?;
            loss_sum += part.loss;
            tokens += part.tokens;
            add_metrics(&mut metrics_sum, &part.metrics, 1.0 / cfg.grad_accum as f64);
            for (acc, g) in grads.iter_mut().zip(part.grads) {
                *acc = Some(match acc.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        let mut grads: Vec<Tensor> = grads.into_iter().flatten().collect();
        // The ranks' parts of the loss, the token count and each metric add up to the step's.
        let mut scalars = vec![loss_sum, tokens as f64];
        scalars.extend(metrics_sum.iter().map(|(_, v)| v));
        let allreduce_secs =
            all_reduce(world, step, &mut grads, &mut scalars).map_err(|e| match e {
                TrainError::Dist(msg) => TrainError::Dist(format!("{msg}; {}", recovery(run))),
                e => e,
            })?;
        let (loss_sum, tokens) = (scalars[0], scalars[1] as usize);
        let step_metrics =
            metrics_sum.iter().zip(&scalars[2..]).map(|((k, _), v)| (k.to_string(), *v)).collect();
        let loss = loss_sum / cfg.grad_accum as f64;
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                loss,
                step: step + 1,
                checkpoint: checkpoint::describe(run),
            });
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        opt.step(&grads, lr)?;
        last_loss = Some(loss);
        state.step = step + 1;
        let secs = start.elapsed().as_secs_f64();
        let event = Event::Step {
            step: state.step,
            loss,
            lr,
            grad_norm,
            tokens,
            secs,
            tokens_per_sec: tokens as f64 / secs,
            allreduce_secs,
            peak_mb: peak_rss_mb(),
            metrics: step_metrics,
        };
        if let Some(m) = &mut metrics {
            m.write(&event)?;
        }
        on_event(&event);

        let last = state.step == cfg.steps;
        if !valid_rows.is_empty()
            && ((cfg.eval_every > 0 && state.step % cfg.eval_every == 0) || last)
        {
            let (val_loss, val_metrics) =
                evaluate(objective, model, &valid_rows, cfg.batch_size, &shards, world, &device)?;
            let best = state.best_val.is_none_or(|b| val_loss < b);
            if best {
                state.best_val = Some(val_loss);
                state.bad_evals = 0;
                if root {
                    checkpoint::save_adapter_atomically(model, &run.join("best"), &cfg.model)?;
                }
            } else {
                state.bad_evals += 1;
            }
            let metrics_out = val_metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            let event = Event::Eval { step: state.step, val_loss, best, metrics: metrics_out };
            if let Some(m) = &mut metrics {
                m.write(&event)?;
                m.plot();
            }
            on_event(&event);
            if cfg.patience > 0 && state.bad_evals >= cfg.patience {
                stopped = Some(Stopped::EarlyStop { patience: cfg.patience });
            }
        }
        // Ctrl-C reaches the ranks at different moments; they stop at the same step.
        let mut interrupted = [f64::from(u8::from(stop.load(Ordering::SeqCst)))];
        world.sum_f64(&mut interrupted)?;
        if interrupted[0] > 0.0 && stopped.is_none() {
            stopped = Some(Stopped::Interrupted);
        }
        if root
            && ((cfg.save_every > 0 && state.step % cfg.save_every == 0)
                || last
                || stopped.is_some())
        {
            checkpoint::save(run, model, &opt, &state)?;
            world.at_step(step, Some(recovery(run)));
            on_event(&Event::Checkpoint { step: state.step });
        }
        if stopped.is_some() {
            break;
        }
    }
    if let Some(m) = &metrics {
        checkpoint::save_adapter_atomically(model, &run.join("adapter"), &cfg.model)?;
        m.plot();
    }
    Ok(Summary { steps: state.step, final_loss: last_loss, best_val_loss: state.best_val, stopped })
}

/// Rank 0 checks and creates the run directory; the others wait for its word, so that none
/// reads a checkpoint before rank 0 has vouched for it, and all stop if it refused.
fn prepare_run_dir(
    world: &World,
    run: &Path,
    cfg: &TrainConfig,
    resume: bool,
) -> Result<(), TrainError> {
    let result =
        if world.is_root() { checkpoint::prepare_run_dir(run, cfg, resume) } else { Ok(()) };
    let mut ok = [u8::from(result.is_ok())];
    world.broadcast_bytes(&mut ok)?;
    match (result, ok[0]) {
        (Err(e), _) => Err(e),
        (Ok(()), 0) => Err(TrainError::OnRank {
            rank: world.rank(),
            msg: format!("rank 0 refused the run directory {}", run.display()),
        }),
        (Ok(()), _) => Ok(()),
    }
}

/// Peak resident memory of this process in MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
