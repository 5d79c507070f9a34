//! Data parallelism across processes, on the design Horovod made standard: MPI (OpenMPI,
//! started by `mpirun` or Slurm's `srun`) starts the ranks and tells each its place; the
//! trainer splits every micro-batch's rows across them by a pure function of the rank, and
//! sums the LoRA gradients, losses and token counts with one all-reduce per step. whet writes
//! no networking of its own.
//!
//! A [`World`] of size 1 is the plain single process and never touches MPI; the `mpi` cargo
//! feature (rsmpi, against the system's OpenMPI) adds the real one, and `nccl` sums gradients
//! that live on CUDA devices with NCCL (through candle's cudarc) instead of through the host.

use crate::error::TrainError;
use candle_core::{Device, Tensor};
use std::ops::Range;
use std::time::Duration;

/// Where this process stands in a job, as the launcher's environment says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank.
    pub rank: usize,
    /// Ranks in all.
    pub size: usize,
    /// Rank among the processes on this machine (which GPU it takes).
    pub local_rank: usize,
    /// Processes on this machine (they share its cores).
    pub local_size: usize,
}

impl Launch {
    /// The launch `mpirun` (OpenMPI's `OMPI_COMM_WORLD_*`), a PMI launcher (`PMI_*`, MPICH and
    /// Hydra) or Slurm's `srun` (`SLURM_PROCID`, `SLURM_STEP_*`) describes; `None` when none of them started this
    /// process.
    pub fn from_env() -> Option<Self> {
        // Slurm writes tasks per node as `2(x3)`: the leading number is this node's.
        let var = |name: &str| {
            let v = std::env::var(name).ok()?;
            let digits: String = v.trim().chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let schemes = [
            (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
            // The step's own counts, which `srun` sets: an sbatch script's SLURM_NTASKS is the
            // allocation's, also where a plain `whet train` runs once.
            ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
        ];
        schemes.iter().find_map(|(rank, size, local, local_size)| {
            let (rank, size) = (var(rank)?, var(size)?);
            let local_rank = var(local).unwrap_or(0);
            Some(Launch { rank, size, local_rank, local_size: var(local_size).unwrap_or(1) })
        })
    }
}

/// The processes training together: one, or the ranks of an MPI job.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    /// How long a rank waits for the others at a step before it calls the job dead.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    timeout: Duration,
    /// The step the loop is at and what a failure leaves (the intact checkpoint), for the
    /// error of a collective that never returns: it names them as the check-in's error does.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    progress: std::sync::Arc<std::sync::Mutex<(usize, String)>>,
    #[cfg(feature = "mpi")]
    mpi: Option<mpi_world::MpiWorld>,
    #[cfg(feature = "nccl")]
    nccl: Option<nccl_world::Nccl>,
}

/// Default of [`World::timeout`]; `WHET_DIST_TIMEOUT` (seconds) overrides it.
const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// `WHET_DIST_TIMEOUT`, or the default.
fn timeout_from_env() -> Result<Duration, TrainError> {
    match std::env::var("WHET_DIST_TIMEOUT") {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => Err(TrainError::Run(format!(
                "WHET_DIST_TIMEOUT=`{v}`: expected a positive number of seconds"
            ))),
        },
        Err(_) => Ok(Duration::from_secs(DEFAULT_TIMEOUT_SECS)),
    }
}

/// Called by a rank that leaves the report of a shared failure to rank 0, before it exits:
/// wait for the launcher to end this process once rank 0 has exited. `mpirun` aborts the
/// whole job at the first non-zero exit, so a rank that exited at once could have rank 0
/// killed before it printed the one error the user should see. Rank 0 meets the same
/// failure, so the wait is short; it is bounded (by `WHET_DIST_TIMEOUT`, at most a minute)
/// in case the launcher does not end the job.
pub fn linger_for_rank_zero() {
    let wait = timeout_from_env()
        .unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT_SECS))
        .min(Duration::from_secs(60));
    std::thread::sleep(wait);
}

impl World {
    /// A single process: every collective is the identity.
    pub fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            progress: Default::default(),
            #[cfg(feature = "mpi")]
            mpi: None,
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    /// The world this process was started in: MPI's when a launcher started several ranks (or
    /// `force`, `--distributed`, asks for MPI with one), else [`World::single`]. A launch of
    /// several ranks by a whet built without the `mpi` feature is an error, not N copies of
    /// the same single-process run.
    pub fn from_launch(force: bool) -> Result<Self, TrainError> {
        let launch = Launch::from_env();
        let several = launch.is_some_and(|l| l.size > 1);
        if !several && !force {
            return Ok(Self::single());
        }
        Self::init_mpi(launch, timeout_from_env()?)
    }

    #[cfg(feature = "mpi")]
    fn init_mpi(_launch: Option<Launch>, timeout: Duration) -> Result<Self, TrainError> {
        let mpi = mpi_world::MpiWorld::init()?;
        let (rank, size, local_rank) = (mpi.rank(), mpi.size(), mpi.local_rank());
        Ok(World {
            rank,
            size,
            local_rank,
            timeout,
            progress: Default::default(),
            mpi: Some(mpi),
            #[cfg(feature = "nccl")]
            nccl: None,
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn init_mpi(launch: Option<Launch>, _timeout: Duration) -> Result<Self, TrainError> {
        let rank = launch.map_or(0, |l| l.rank);
        let msg = match launch {
            Some(l) => format!(
                "started as rank {} of {}, but this whet was built without MPI support; hint: build it with `cargo build --release --features mpi` (needs OpenMPI: apt install libopenmpi-dev libclang-dev)",
                l.rank, l.size
            ),
            None => "--distributed: this whet was built without MPI support; hint: build it with `cargo build --release --features mpi`".into(),
        };
        Err(TrainError::OnRank { rank, msg })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in all.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank among this machine's processes.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Whether this rank writes the run directory (rank 0 does, alone).
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// End a run that succeeded on this rank: MPI is finalized (a collective: it waits for
    /// every rank). A world dropped without this — an error on the way — leaves MPI
    /// unfinalized, so that this process exits at once and the launcher ends the job, instead
    /// of waiting for ranks that may never come.
    pub fn finish(self) {
        #[cfg(feature = "mpi")]
        if let Some(mut m) = self.mpi {
            m.finalize = true;
        }
    }

    /// `--distributed` runs and launches of several ranks: whether MPI is in use.
    pub fn is_distributed(&self) -> bool {
        #[cfg(feature = "mpi")]
        return self.mpi.is_some();
        #[cfg(not(feature = "mpi"))]
        false
    }

    /// This rank's rows of a batch of `n`: consecutive, as even as can be (sizes differ by at
    /// most one), a pure function of `(n, rank, size)`.
    pub fn rows(&self, n: usize) -> Range<usize> {
        split(n, self.rank, self.size)
    }

    /// The device this rank trains on: in a job of several ranks, a CUDA device given without
    /// an ordinal (`cuda`, `auto`) becomes the GPU of this rank's local rank.
    pub fn rank_device(
        &self,
        device: Device,
        spec: whet_model::DeviceSpec,
    ) -> Result<Device, TrainError> {
        if self.size > 1
            && device.is_cuda()
            && !matches!(spec, whet_model::DeviceSpec::Cuda(Some(_)))
        {
            return Ok(Device::new_cuda(self.local_rank)?);
        }
        Ok(device)
    }

    /// Train on `device`: with the `nccl` feature and a CUDA device, the ranks open an NCCL
    /// communicator (rank 0's id broadcast over MPI) for [`World::sum_tensor`].
    pub fn attach_device(&mut self, _device: &Device) -> Result<(), TrainError> {
        #[cfg(feature = "nccl")]
        if let (Some(m), Device::Cuda(d)) = (&self.mpi, _device) {
            self.nccl = Some(nccl_world::Nccl::open(m, d)?);
        }
        Ok(())
    }

    /// What sums device tensors: `NCCL` or `MPI (through the host)`; `none` in one process.
    pub fn reducer(&self) -> &'static str {
        #[cfg(feature = "nccl")]
        if self.nccl.is_some() {
            return "NCCL";
        }
        if self.is_distributed() {
            "MPI (through the host)"
        } else {
            "none"
        }
    }

    /// `t`'s element-wise sum over all ranks (f32): on CUDA devices with NCCL where it is
    /// open, else through the host with MPI.
    pub fn sum_tensor(&self, t: &Tensor) -> Result<Tensor, TrainError> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        #[cfg(feature = "nccl")]
        if let (Some(n), true) = (&self.nccl, t.device().is_cuda()) {
            return self.watched("an NCCL all-reduce", || n.sum(t));
        }
        let t32 = t.to_dtype(candle_core::DType::F32)?;
        let mut buf = t32.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        self.sum_f32(&mut buf)?;
        Ok(Tensor::from_vec(buf, t.shape(), &Device::Cpu)?.to_device(t.device())?)
    }

    /// Element-wise sums over all ranks, in place.
    pub fn sum_f32(&self, _buf: &mut [f32]) -> Result<(), TrainError> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return self.watched("an all-reduce", || m.sum_f32(_buf));
        }
        Ok(())
    }

    /// As [`World::sum_f32`], in f64 (losses, counts).
    pub fn sum_f64(&self, _buf: &mut [f64]) -> Result<(), TrainError> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return self.watched("an all-reduce", || m.sum_f64(_buf));
        }
        Ok(())
    }

    /// Rank 0's values of `buf` on every rank.
    pub fn broadcast_f32(&self, _buf: &mut [f32]) -> Result<(), TrainError> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return self.watched("a broadcast", || m.broadcast_f32(_buf));
        }
        Ok(())
    }

    /// Rank 0's bytes on every rank (the same length on all).
    pub fn broadcast_bytes(&self, _buf: &mut [u8]) -> Result<(), TrainError> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return self.watched("a broadcast", || m.broadcast_bytes(_buf));
        }
        Ok(())
    }

    /// Every rank reports reaching `step` to rank 0, which waits at most the timeout for each
    /// and names the ranks that did not come: a dead or hung rank fails the job within a
    /// bounded time instead of hanging it.
    pub fn check_in(&self, _step: usize) -> Result<(), TrainError> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            let missing = m.check_in(_step as u64, self.timeout);
            if !missing.is_empty() {
                let list = missing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
                return Err(TrainError::Dist(format!(
                    "rank {list} did not reach step {} within {:.0} s: dead or hung (WHET_DIST_TIMEOUT sets the wait)",
                    _step + 1,
                    self.timeout.as_secs_f64()
                )));
            }
        }
        Ok(())
    }

    /// Record that the loop works on `step` (0-based) and what a failure leaves: `after`,
    /// e.g. "the last checkpoint (step 40) is intact; hint: ...".
    pub fn at_step(&self, step: usize, after: Option<String>) {
        let mut p = self.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        p.0 = step;
        if let Some(after) = after {
            p.1 = after;
        }
    }

    /// Run collective `f`; if it has not returned within the timeout, the other ranks are gone
    /// (or hung): say so, in the words of [`World::check_in`]'s error (which ranks, which
    /// step, the intact checkpoint), and end this process, which makes the launcher end the
    /// job (an MPI collective cannot be cancelled). Which of the other ranks hangs a
    /// collective cannot be told from inside it, so they are all named.
    #[cfg(feature = "mpi")]
    fn watched<R>(&self, what: &str, f: impl FnOnce() -> R) -> R {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (rank, timeout, what) = (self.rank, self.timeout, what.to_string());
        let others: Vec<String> =
            (0..self.size).filter(|r| *r != rank).map(|r| r.to_string()).collect();
        let others = match others.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        let progress = self.progress.clone();
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                let p = progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let after = if p.1.is_empty() { String::new() } else { format!("; {}", p.1) };
                let who = if rank == 0 { String::new() } else { format!("rank {rank}: ") };
                eprintln!(
                    "error: {who}rank {others} did not reach step {} (no answer in {what} within {:.0} s): dead or hung (WHET_DIST_TIMEOUT sets the wait){after}",
                    p.0 + 1,
                    timeout.as_secs_f64()
                );
                std::process::exit(1);
            }
        });
        let r = f();
        let _ = done_tx.send(());
        let _ = watchdog.join();
        r
    }
}

/// Rows `rank` of `size` takes of `n`: `[rank * n / size, (rank + 1) * n / size)`.
pub fn split(n: usize, rank: usize, size: usize) -> Range<usize> {
    (rank * n / size)..((rank + 1) * n / size)
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use crate::error::TrainError;
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;
    use std::time::{Duration, Instant};

    /// Tag of the per-step check-in messages.
    const CHECK_IN: mpi::Tag = 17;

    pub(super) struct MpiWorld {
        world: SimpleCommunicator,
        local_rank: usize,
        /// Dropping it finalizes MPI; see [`super::World::finish`].
        universe: Option<mpi::environment::Universe>,
        pub(super) finalize: bool,
    }

    impl Drop for MpiWorld {
        fn drop(&mut self) {
            if let Some(u) = self.universe.take() {
                if self.finalize {
                    drop(u);
                } else {
                    std::mem::forget(u);
                }
            }
        }
    }

    impl MpiWorld {
        pub(super) fn init() -> Result<Self, TrainError> {
            // Funneled: only the main thread calls MPI (the trainer's pools never do).
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or_else(|| TrainError::Dist("MPI was initialized twice".into()))?;
            let world = universe.world();
            let local_rank = world.split_shared(world.rank()).rank() as usize;
            Ok(MpiWorld { world, local_rank, universe: Some(universe), finalize: false })
        }

        pub(super) fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        pub(super) fn size(&self) -> usize {
            self.world.size() as usize
        }

        pub(super) fn local_rank(&self) -> usize {
            self.local_rank
        }

        pub(super) fn sum_f32(&self, buf: &mut [f32]) -> Result<(), TrainError> {
            let send = buf.to_vec();
            self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }

        pub(super) fn sum_f64(&self, buf: &mut [f64]) -> Result<(), TrainError> {
            let send = buf.to_vec();
            self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }

        pub(super) fn broadcast_f32(&self, buf: &mut [f32]) -> Result<(), TrainError> {
            self.world.process_at_rank(0).broadcast_into(buf);
            Ok(())
        }

        pub(super) fn broadcast_bytes(&self, buf: &mut [u8]) -> Result<(), TrainError> {
            self.world.process_at_rank(0).broadcast_into(buf);
            Ok(())
        }

        /// The ranks that did not check in at `step` within `timeout` (rank 0 only waits).
        pub(super) fn check_in(&self, step: u64, timeout: Duration) -> Vec<usize> {
            if self.world.rank() != 0 {
                self.world.process_at_rank(0).send_with_tag(&step, CHECK_IN);
                return vec![];
            }
            let deadline = Instant::now() + timeout;
            let mut missing = vec![];
            for r in 1..self.world.size() {
                let mut pending =
                    self.world.process_at_rank(r).immediate_receive_with_tag::<u64>(CHECK_IN);
                loop {
                    match pending.r#try() {
                        Ok(_) => break,
                        Err(p) if Instant::now() >= deadline => {
                            missing.push(r as usize);
                            // The receive cannot be cancelled through rsmpi; the job ends.
                            std::mem::forget(p);
                            break;
                        }
                        Err(p) => {
                            pending = p;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            }
            missing
        }
    }
}

#[cfg(feature = "nccl")]
mod nccl_world {
    use crate::error::TrainError;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, Layout, Shape, Tensor};

    /// An NCCL communicator over the ranks' GPUs, one per rank.
    pub(super) struct Nccl {
        comm: std::sync::Arc<Comm>,
    }

    fn err(e: impl std::fmt::Debug) -> TrainError {
        TrainError::Dist(format!("NCCL: {e:?}"))
    }

    impl Nccl {
        /// Rank 0 makes the communicator's id and MPI hands it to the others (NCCL's own
        /// bootstrap needs that one exchange).
        pub(super) fn open(
            mpi: &super::mpi_world::MpiWorld,
            device: &CudaDevice,
        ) -> Result<Self, TrainError> {
            let id = if mpi.rank() == 0 { Id::new().map_err(err)? } else { Id::uninit([0; 128]) };
            let mut bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            mpi.broadcast_bytes(&mut bytes)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, b) in internal.iter_mut().zip(&bytes) {
                *d = *b as std::ffi::c_char;
            }
            let comm =
                Comm::from_rank(device.cuda_stream(), mpi.rank(), mpi.size(), Id::uninit(internal))
                    .map_err(err)?;
            Ok(Nccl { comm: std::sync::Arc::new(comm) })
        }

        /// The sum over ranks of `t` (f32, on this rank's GPU), on the GPU.
        pub(super) fn sum(&self, t: &Tensor) -> Result<Tensor, TrainError> {
            let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
            Ok(t.apply_op1_no_bwd(&AllReduce { comm: self.comm.clone() })?)
        }
    }

    /// NCCL's in-order sum as a candle op, so that it runs on the tensor's own stream.
    struct AllReduce {
        comm: std::sync::Arc<Comm>,
    }

    // SAFETY: the communicator is only used from the thread that trains (collectives are
    // called from the main thread only); candle requires ops to be Send + Sync.
    unsafe impl Send for AllReduce {}
    unsafe impl Sync for AllReduce {}

    impl CustomOp1 for AllReduce {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce runs on CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = l.shape().elem_count();
            let src = s.as_cuda_slice::<f32>()?.slice(l.start_offset()..l.start_offset() + n);
            let dev = s.device().clone();
            // SAFETY: NCCL writes every element before anything reads them.
            let mut dst = unsafe { dev.alloc::<f32>(n) }?;
            self.comm
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_split_a_batch_into_consecutive_near_equal_parts() {
        for (n, size) in [(4, 2), (4, 3), (5, 2), (7, 4), (3, 3)] {
            let parts: Vec<_> = (0..size).map(|r| split(n, r, size)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[size - 1].end, n);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
            assert!(hi - lo <= 1 && *lo >= 1, "{n} rows over {size}: {lens:?}");
        }
    }

    #[test]
    fn launch_is_read_from_the_launchers_environment() {
        // One test sets and clears the variables, so no other test sees them half-set.
        let set = |vars: &[(&str, &str)]| {
            for (k, v) in vars {
                std::env::set_var(k, v);
            }
        };
        set(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        let ompi = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"];
        set(&[(ompi[0], "1"), (ompi[1], "4"), (ompi[2], "1"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]);
        let want = Launch { rank: 1, size: 4, local_rank: 1, local_size: 2 };
        assert_eq!(Launch::from_env(), Some(want));
        for k in ompi.into_iter().chain(["OMPI_COMM_WORLD_LOCAL_SIZE"]) {
            std::env::remove_var(k);
        }
        let slurm =
            ["SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"];
        set(&[(slurm[0], "3"), (slurm[1], "8"), (slurm[2], "3"), (slurm[3], "4(x2)")]);
        let want = Launch { rank: 3, size: 8, local_rank: 3, local_size: 4 };
        assert_eq!(Launch::from_env(), Some(want));
        for k in slurm {
            std::env::remove_var(k);
        }
    }
}
