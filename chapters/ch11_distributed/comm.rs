//! How the ranks talk. Data parallelism needs only a handful of collective operations, so the
//! training loop sees them through one small trait: MPI implements it here, a single process
//! implements it trivially, and another transport (Burn's own DDP, NCCL) could implement it
//! later without touching the loop.

use anyhow::{Result, bail};

// ANCHOR: collective
/// The collective operations of data-parallel training. Every rank must call each of them in
/// the same order with buffers of the same length: a collective is a meeting, and a rank that
/// does not come leaves the others waiting.
pub trait Collective {
    /// This process's number, `0..size`. Rank 0 writes the files.
    fn rank(&self) -> usize;
    /// How many processes train together.
    fn size(&self) -> usize;
    /// Every rank's `buf` becomes the element-wise sum of all ranks' `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// The same in f64 (loss sums, for the log).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Every rank's `buf` becomes rank `root`'s.
    fn broadcast(&self, buf: &mut [u8], root: usize);
    /// Every rank's `value`, in rank order, on every rank.
    fn all_gather_u64(&self, value: u64) -> Vec<u64>;
    /// Waits until every rank has come here.
    fn barrier(&self);
    /// One line for the log: the transport and where this rank runs.
    fn describe(&self) -> String;
    /// Ends every rank's process now, with exit code 1: after an error on one rank, the
    /// others may be waiting in a collective that will never complete.
    fn abort(&self) -> ! {
        std::process::exit(1)
    }
}
// ANCHOR_END: collective

/// One process alone: every collective is the identity. The baseline a multi-rank run must
/// equal, and what the chapter runs on a build without MPI.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _: &mut [f64]) {}
    fn broadcast(&self, _: &mut [u8], _: usize) {}
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        vec![value]
    }
    fn barrier(&self) {}
    fn describe(&self) -> String {
        "one process (no MPI)".into()
    }
}

/// Rank `root`'s bytes on every rank, whatever their length: the length travels first. On
/// `root`, `bytes` must be `Some`; elsewhere it is ignored.
pub fn broadcast_bytes(comm: &dyn Collective, bytes: Option<Vec<u8>>, root: usize) -> Vec<u8> {
    let mine = (comm.rank() == root).then(|| bytes.expect("the root's bytes"));
    let mut len = (mine.as_ref().map_or(0, Vec::len) as u64).to_le_bytes();
    comm.broadcast(&mut len, root);
    let mut buf = mine.unwrap_or_else(|| vec![0; u64::from_le_bytes(len) as usize]);
    comm.broadcast(&mut buf, root);
    buf
}

/// Rank 0's result on every rank: its value, or its error, so that an error rank 0 meets
/// (a missing checkpoint, say) stops every rank with the same message instead of leaving the
/// others waiting in the next collective.
pub fn broadcast_result(comm: &dyn Collective, result: Option<Result<Vec<u8>>>) -> Result<Vec<u8>> {
    let encoded = result.map(|r| match r {
        Ok(mut bytes) => {
            bytes.push(1);
            bytes
        }
        Err(e) => {
            let mut bytes = format!("{e:#}").into_bytes();
            bytes.push(0);
            bytes
        }
    });
    let mut bytes = broadcast_bytes(comm, encoded, 0);
    match bytes.pop() {
        Some(1) => Ok(bytes),
        _ if comm.rank() == 0 => bail!("{}", String::from_utf8_lossy(&bytes)),
        _ => bail!("rank 0: {}", String::from_utf8_lossy(&bytes)),
    }
}

/// True when this process was started by an MPI launcher (mpirun, srun, hydra).
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// This rank's number among the ranks of its own machine (0 when not launched by MPI): on a
/// GPU backend, the GPU it takes.
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

/// The transport this build and launch give: MPI under `mpirun` (with the `mpi` feature), one
/// process otherwise. A launch by `mpirun` of a build without MPI is refused, since every
/// rank would train alone on the whole batch.
pub fn connect() -> Result<Box<dyn Collective>> {
    #[cfg(feature = "mpi")]
    {
        Ok(Box::new(mpi_transport::Mpi::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        if launched_by_mpi() {
            bail!(
                "this binary was built without MPI: rebuild it with `cargo build --release \
                 --features mpi` (Debian: apt install openmpi-bin libopenmpi-dev libclang-dev)"
            );
        }
        Ok(Box::new(Solo))
    }
}

#[cfg(feature = "mpi")]
pub mod mpi_transport {
    // ANCHOR: mpi
    //! The collectives on MPI, through the `mpi` crate (rsmpi).

    use super::Collective;
    use anyhow::{Context, Result};
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    pub struct Mpi {
        world: SimpleCommunicator,
        host: String,
        library: String,
        // Last: MPI is finalised when this is dropped, after everything above.
        _universe: mpi::environment::Universe,
    }

    impl Mpi {
        /// Starts MPI. `Funneled`: only the thread that started MPI calls it (the training
        /// loop's), while Burn's worker threads compute.
        pub fn init() -> Result<Mpi> {
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .context("MPI could not be started (was it started already?)")?;
            let world = universe.world();
            let host = mpi::environment::processor_name().unwrap_or_else(|_| "?".into());
            let library = mpi::environment::library_version()
                .unwrap_or_default()
                .split(',')
                .next()
                .unwrap_or("MPI")
                .trim()
                .to_string();
            Ok(Mpi {
                world,
                host,
                library,
                _universe: universe,
            })
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn broadcast(&self, buf: &mut [u8], root: usize) {
            self.world.process_at_rank(root as i32).broadcast_into(buf);
        }
        fn all_gather_u64(&self, value: u64) -> Vec<u64> {
            let mut all = vec![0u64; self.size()];
            self.world.all_gather_into(&value, &mut all[..]);
            all
        }
        fn barrier(&self) {
            self.world.barrier();
        }
        fn describe(&self) -> String {
            format!("MPI ({}) on {}", self.library, self.host)
        }
        fn abort(&self) -> ! {
            self.world.abort(1)
        }
    }
    // ANCHOR_END: mpi
}

// ANCHOR: ring_cost
/// Seconds a ring all-reduce of `bytes` takes on `p` ranks whose links carry `bandwidth`
/// bytes per second, each message also paying `latency` seconds. The buffer is cut into `p`
/// chunks; in `p - 1` steps of the reduce-scatter each rank passes one chunk to its neighbour
/// and adds the one it receives, until each rank holds one chunk summed over all ranks; in
/// `p - 1` steps of the all-gather the summed chunks go round. Each rank sends
/// `2 (p - 1)` chunks of `bytes / p`: `2 (p - 1) / p · bytes`, almost independent of `p`.
pub fn ring_all_reduce_seconds(bytes: f64, p: usize, bandwidth: f64, latency: f64) -> f64 {
    if p <= 1 {
        return 0.0;
    }
    let p = p as f64;
    2.0 * (p - 1.0) * (latency + bytes / p / bandwidth)
}
// ANCHOR_END: ring_cost
