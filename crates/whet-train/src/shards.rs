//! Data parallelism inside a micro-batch on the CPU: the rows are split into shards that run
//! side by side, each in a rayon pool of its own. A small model's ops are short, and splitting
//! every op across all cores makes the cores meet after each of them (a few thousand times a
//! step); whole shards keep every core on work of its own instead. On a GPU, which
//! parallelizes inside each op, a micro-batch is one shard.

use crate::error::TrainError;
use candle_core::Device;

/// The pools the shards of a micro-batch run in.
pub(crate) struct Shards {
    pools: Vec<rayon::ThreadPool>,
}

impl Shards {
    /// Shards for micro-batches of `batch_size` rows on `device`: on the CPU one per thread of
    /// rayon's global pool, at most one per row, each pool with an equal share of the threads.
    pub fn new(device: &Device, batch_size: usize) -> Result<Self, TrainError> {
        let threads = rayon::current_num_threads();
        let n = if device.is_cpu() { threads.min(batch_size) } else { 1 };
        if n <= 1 {
            return Ok(Self { pools: vec![] });
        }
        let pools = (0..n)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads / n + usize::from(i < threads % n))
                    .thread_name(move |t| format!("whet-shard-{i}-{t}"))
                    .build()
                    .map_err(|e| TrainError::Run(format!("cannot start training threads: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { pools })
    }

    /// `f(shard, first_row)` for consecutive shards of `rows`, side by side, results in shard
    /// order.
    pub fn run<T: Sync, R: Send>(
        &self,
        rows: &[T],
        f: impl Fn(&[T], usize) -> Result<R, TrainError> + Sync,
    ) -> Result<Vec<R>, TrainError> {
        if self.pools.is_empty() || rows.len() <= 1 {
            return Ok(vec![f(rows, 0)?]);
        }
        let per = rows.len().div_ceil(self.pools.len());
        std::thread::scope(|s| {
            let running: Vec<_> = rows
                .chunks(per)
                .zip(&self.pools)
                .enumerate()
                .map(|(i, (shard, pool))| {
                    let f = &f;
                    s.spawn(move || pool.install(|| f(shard, i * per)))
                })
                .collect();
            running
                .into_iter()
                .map(|r| {
                    r.join().unwrap_or_else(|_| {
                        Err(TrainError::Run("internal error: a training thread panicked".into()))
                    })
                })
                .collect()
        })
    }
}
