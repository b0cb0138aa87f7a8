//! Chapter 5's own matrix product: `C = alpha * A @ B + beta * C` for `f32`, with an AVX-512
//! and an AVX2 kernel, spread over the cores by rayon. `kernels::gemm` calls it where the CPU
//! has one of them and falls back to the `matrixmultiply` crate everywhere else.
//!
//! The plan is the classic one (Goto and van de Geijn, "Anatomy of high-performance matrix
//! multiplication", 2008), cut down to what a training step's shapes need:
//! - `C` is cut into tiles of `MR` rows by `NR` columns, each held in vector registers while
//!   the whole inner dimension streams past: `MR * NR / lanes` accumulators, 24 of AVX-512's
//!   32 registers, 12 of AVX2's 16.
//! - `B` is copied ("packed") so that each tile's columns lie side by side, step after step:
//!   the kernel then reads it with plain vector loads. Every element of `B` is packed once per
//!   product, a small cost next to the `m` multiply-adds it takes part in.
//! - `A` is read where it lies, one element at a time, broadcast to a whole vector (a version
//!   that packed `A` as well was slower at the course's shapes).
//! - The inner dimension is cut into blocks of `KC` steps, so that a tile's block of `B`
//!   (`KC * NR` floats, 32 KB) stays in the core's first-level cache.
//! - The tiles are shared out to rayon's workers, the same threads every other kernel uses.

#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

/// A matrix behind a raw pointer: element `(i, j)` is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a `Strided` only reads, and `sgemm`'s caller guarantees that nothing writes the
// matrix while the product runs.
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

impl Strided {
    /// The same matrix from row `i` and column `j` on.
    fn at(&self, i: usize, j: usize) -> Strided {
        // SAFETY (of the `offset`): callers stay inside the matrix.
        let ptr = unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) };
        Strided { ptr, ..*self }
    }
}

/// `C`'s pointer, shared by the rayon tasks; each writes only its own tiles.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint tiles.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY (of the `add`): callers stay inside `C`.
        unsafe { self.0.add(offset) }
    }
}

/// Whether this CPU can run chapter 5's product, for this layout of `A`: row-major (`cs = 1`)
/// or transposed (`rs = 1`). `C` must be row-major.
pub fn supported(a: &Strided) -> bool {
    (a.cs == 1 || a.rs == 1) && isa().is_some()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    Avx512,
    Avx2,
}

// ANCHOR: isa
/// The best vector instructions this CPU runs, which the matrix product and every fused
/// kernel then use; `None`: the portable code, as on a CPU without AVX2 (or not x86), also
/// forced by setting `GPT_PORTABLE=1`, so that that path is tested on any machine.
pub fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(
        || match std::env::var("GPT_PORTABLE").is_ok_and(|v| v == "1") {
            true => None,
            false => detect(),
        },
    )
}

fn detect() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx2") && has!("fma") {
            return Some(Isa::Avx512);
        }
        if has!("avx2") && has!("fma") {
            return Some(Isa::Avx2);
        }
    }
    None
}

/// What [`isa`] chose, for reports: "avx512", "avx2" or "portable".
pub fn isa_name() -> &'static str {
    match isa() {
        Some(Isa::Avx512) => "avx512",
        Some(Isa::Avx2) => "avx2",
        None => "portable",
    }
}
// ANCHOR_END: isa

/// Steps of the inner dimension per block.
const KC: usize = 256;

// ANCHOR: sgemm
/// `C = alpha * A @ B + beta * C` with `A: [m, k]`, `B: [k, n]`, and `C: [m, n]` row-major
/// with row stride `rsc`. With `beta = 0`, `C` is written without being read.
///
/// # Safety
/// The three matrices must lie inside their allocations, `C` may overlap neither `A` nor
/// `B`, `m`, `k` and `n` must be at least 1, `A` must be row-major or transposed, and the
/// CPU must have `isa`'s instructions.
#[cfg(target_arch = "x86_64")]
pub unsafe fn sgemm(
    isa: Isa,
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    (c, rsc): (*mut f32, usize),
) {
    let (mr, nr) = match isa {
        Isa::Avx512 => (avx512::MR, avx512::NR),
        Isa::Avx2 => (avx2::MR, avx2::NR),
    };
    let (tile_rows, panels) = (m.div_ceil(mr), n.div_ceil(nr));
    let tiles = tile_rows * panels;
    // Up to 8 MFLOP one core does it: handing tiles to the other core costs it more than it
    // saves (attention's per-head products of 2 MFLOP took twice as long when shared). Above,
    // 16 tasks per core, each a run of tiles along a row of tiles, so that consecutive tiles
    // reuse the same rows of `A`. Many small tasks rather than a few large ones: when one core
    // is slowed (by another program on a shared machine), the other takes over more of the
    // work instead of waiting for it at the end (5-16% faster than 4 per core, in a loop).
    let tasks = match 2 * m * k * n <= 1 << 23 {
        true => 1,
        false => tiles.min(16 * rayon::current_num_threads()),
    };
    let c = Out(c);
    with_packing_buffer(|packed| {
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            // Later blocks add to what the first wrote.
            let beta = if k0 == 0 { beta } else { 1.0 };
            pack_b(b.at(k0, 0), (kc, n), nr, tasks > 1, packed);
            let (a, packed) = (a.at(0, k0), &*packed);
            let task = |t: usize| {
                for tile in t * tiles / tasks..(t + 1) * tiles / tasks {
                    let (i, j) = (tile / panels * mr, tile % panels * nr);
                    let shape = (mr.min(m - i), kc, nr.min(n - j));
                    let b = packed[j * kc..].as_ptr();
                    let c = (c.at(i * rsc + j), rsc);
                    // SAFETY: the tile lies inside `C`, its rows of `A` inside `A`, its panel
                    // inside `packed`; the caller checked the CPU.
                    unsafe {
                        match isa {
                            Isa::Avx512 => avx512::tile(shape, alpha, a.at(i, 0), b, beta, c),
                            Isa::Avx2 => avx2::tile(shape, alpha, a.at(i, 0), b, beta, c),
                        }
                    }
                }
            };
            match tasks {
                1 => task(0),
                _ => (0..tasks).into_par_iter().for_each(task),
            }
        }
    })
}

/// Runs `f` with the buffer for packed panels that this thread keeps from call to call: a
/// fresh one per call cost attention's small products 8-10% (allocating it, zeroing it). A
/// call that finds its thread's buffer in use (rayon can run a second product on a thread
/// that waits for the first) gets a fresh one.
#[cfg(target_arch = "x86_64")]
fn with_packing_buffer<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    thread_local! {
        static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PACKED.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut packed) => f(&mut packed),
        Err(_) => f(&mut Vec::new()),
    })
}
// ANCHOR_END: sgemm

/// Copies `B: [kc, n]` into panels of `nr` columns, `packed[j * kc + p * nr + jj] = B[p, j +
/// jj]` for the panel that starts at column `j`, zeros past the last column. A row-major `B`
/// is copied a row of the panel at a time, a transposed one a column at a time: either way
/// the reads are contiguous.
#[cfg(target_arch = "x86_64")]
fn pack_b(b: Strided, (kc, n): (usize, usize), nr: usize, parallel: bool, packed: &mut Vec<f32>) {
    let len = n.div_ceil(nr) * nr * kc;
    if packed.len() < len {
        packed.resize(len, 0.0);
    }
    // SAFETY (of every `slice`): the caller keeps `B` in bounds; `count` elements are read.
    let slice =
        |start: Strided, count: usize| unsafe { std::slice::from_raw_parts(start.ptr, count) };
    let pack = |(panel, out): (usize, &mut [f32])| {
        let (j, width) = (panel * nr, nr.min(n - panel * nr));
        if b.cs != 1 && b.rs == 1 {
            // Transposed: column `j + jj` of `B` is contiguous, and lands `nr` apart.
            for jj in 0..nr {
                let column = out.iter_mut().skip(jj).step_by(nr);
                match jj < width {
                    true => column
                        .zip(slice(b.at(0, j + jj), kc))
                        .for_each(|(o, &x)| *o = x),
                    false => column.for_each(|o| *o = 0.0),
                }
            }
        } else {
            for (p, out) in out.chunks_mut(nr).enumerate() {
                let (data, zeros) = out.split_at_mut(width);
                match b.cs {
                    1 => data.copy_from_slice(slice(b.at(p, j), width)),
                    _ => (0..width).for_each(|jj| data[jj] = slice(b.at(p, j + jj), 1)[0]),
                }
                zeros.fill(0.0);
            }
        }
    };
    let packed = &mut packed[..len];
    match parallel {
        true => packed.par_chunks_mut(nr * kc).enumerate().for_each(pack),
        false => packed.chunks_mut(nr * kc).enumerate().for_each(pack),
    }
}

/// `f::<rows>(args)` for a `rows` known only when running: one copy of `f` per count.
macro_rules! by_rows {
    ($rows:expr, $f:ident $args:tt, $($r:literal)*) => {
        match $rows { $($r => $f::<$r> $args,)* _ => unreachable!("more rows than a tile") }
    };
}

/// One instruction set's kernel: `tile` computes one `MR x NR` tile of `C` (fewer rows or
/// columns at the edges) from `kc` steps of `A`'s rows and a packed panel of `B`.
macro_rules! microkernel {
    ($isa:ident, $feature:literal, $v:ty, lanes: $lanes:literal, rows: $mr:literal,
     $zero:ident, $splat:ident, $load:ident, $store:ident, $fma:ident, $mul:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $isa {
            use super::Strided;
            use std::arch::x86_64::*;

            pub const MR: usize = $mr;
            pub const NR: usize = 2 * $lanes; // two vectors per row of the tile
            type Acc<const R: usize> = [[$v; 2]; R];

            // ANCHOR: tile
            /// # Safety
            /// The tile's rows of `A`, its panel of `B` and the tile of `C` must be in
            /// bounds, and the CPU must have the instructions.
            #[target_feature(enable = $feature)]
            pub unsafe fn tile(
                (rows, kc, cols): (usize, usize, usize),
                alpha: f32,
                a: Strided,
                b: *const f32,
                beta: f32,
                c: (*mut f32, usize),
            ) {
                // SAFETY: as the caller promised.
                unsafe {
                    // Ask for the tile of `C` now, so that it arrives while the steps run
                    // instead of stalling `write` (2-8% on the `lecture` shapes, in a loop).
                    for i in 0..rows {
                        let row = c.0.add(i * c.1) as *const i8;
                        _mm_prefetch::<_MM_HINT_T0>(row);
                        _mm_prefetch::<_MM_HINT_T0>(row.add(4 * cols - 1));
                    }
                    // A number of rows known when compiling keeps the accumulators in registers.
                    let out = (cols, alpha, beta, c);
                    by_rows!(rows, tile_rows(kc, a, b, out), 1 2 3 4 5 6 7 8 9 10 11 12);
                }
            }

            /// The tile's `R` rows, from the first step to `C`, in one function per `R`: the
            /// accumulators go from registers straight to `C`. (Handed back from a function of
            /// their own for `tile` to write, they went through the stack, 1.5 KB copied per
            /// tile, and a row buffer was zeroed per tile: 1.4% of a `lecture` step in `perf`.)
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn tile_rows<const R: usize>(
                kc: usize,
                a: Strided,
                b: *const f32,
                (cols, alpha, beta, c): (usize, f32, f32, (*mut f32, usize)),
            ) {
                // SAFETY: as `tile`'s caller promised.
                unsafe {
                    let acc = accumulate::<R>(kc, a, b);
                    write::<R>(&acc, cols, alpha, beta, c);
                }
            }
            // ANCHOR_END: tile

            // ANCHOR: accumulate
            /// `acc[i] = Σ_p A[i, p] · B[p, ..NR]` for the tile's `R` rows of `A`, read
            /// row-major (row `i` contiguous) or transposed (step `p`'s values side by side).
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn accumulate<const R: usize>(kc: usize, a: Strided, b: *const f32) -> Acc<R> {
                // SAFETY: the reads stay inside the tile's rows of `A`.
                unsafe {
                    match a.cs {
                        1 => {
                            let a_ip = |i, p| *a.ptr.offset(i as isize * a.rs).add(p);
                            steps::<R, _, _>(kc, b, a_ip, |_| ())
                        }
                        _ => {
                            let a_ip = |i, p| *a.ptr.offset(p as isize * a.cs).add(i);
                            steps::<R, _, _>(kc, b, a_ip, |p| prefetch_row::<R>(a, p + AHEAD))
                        }
                    }
                }
            }

            /// Steps ahead that `steps` asks for `B`'s panel: 3-25% faster on the `lecture`
            /// shapes in a loop (median ratios over six rounds), the same at 4, 8 or 16.
            const B_AHEAD: usize = 8;

            /// Steps ahead that [`prefetch_row`] asks for a transposed `A`.
            const AHEAD: usize = 32;

            /// Asks for step `p`'s `R` values of a transposed `A`. They lie in another row of
            /// the matrix at every step, a row stride apart (6 KB for `fc2`'s weight
            /// gradient), too far for the hardware to guess the next: 4-18% faster on the
            /// weight gradients in a loop. A prefetch past the end is harmless (it never
            /// faults), hence the wrapping arithmetic.
            #[target_feature(enable = $feature)]
            #[inline]
            fn prefetch_row<const R: usize>(a: Strided, p: usize) {
                let row = a.ptr.wrapping_offset(p as isize * a.cs) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4 * R - 1));
            }

            /// Per step `p`: prefetches, two loads of `B`'s panel, `R` broadcasts of
            /// `A[i, p]` and `2R` fused multiply-adds into the accumulators.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn steps<const R: usize, F: Fn(usize, usize) -> f32, P: Fn(usize)>(
                kc: usize,
                b: *const f32,
                a: F,
                prefetch: P,
            ) -> Acc<R> {
                let mut acc: Acc<R> = [[$zero(); 2]; R];
                for p in 0..kc {
                    prefetch(p);
                    // Ask for the panel's `NR` floats `B_AHEAD` steps on (two lines with
                    // AVX-512, one with AVX2): they come from the second-level cache faster
                    // than the hardware's own prefetcher brings them (past the panel's end:
                    // the next tile's panel).
                    let ahead = b.wrapping_add((p + B_AHEAD) * NR) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                    // SAFETY: the panel holds `kc * NR` floats.
                    let (b0, b1) = unsafe { ($load(b.add(p * NR)), $load(b.add(p * NR + $lanes))) };
                    for i in 0..R {
                        let x = $splat(a(i, p));
                        acc[i][0] = $fma(x, b0, acc[i][0]);
                        acc[i][1] = $fma(x, b1, acc[i][1]);
                    }
                }
                acc
            }
            // ANCHOR_END: accumulate

            // ANCHOR: write
            /// `C = alpha * acc + beta * C` for the tile's `R x cols` corner.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn write<const R: usize>(
                acc: &Acc<R>,
                cols: usize,
                alpha: f32,
                beta: f32,
                (c, rsc): (*mut f32, usize),
            ) {
                // SAFETY: only the `R x cols` corner of the tile is read or written.
                unsafe {
                    for (i, acc) in acc.iter().enumerate() {
                        let row = c.add(i * rsc);
                        if cols == NR {
                            write_row(acc, alpha, beta, row);
                        } else {
                            let mut buf = [0.0f32; NR]; // a row of an edge tile
                            if beta != 0.0 {
                                std::ptr::copy_nonoverlapping(row, buf.as_mut_ptr(), cols);
                            }
                            write_row(acc, alpha, beta, buf.as_mut_ptr());
                            std::ptr::copy_nonoverlapping(buf.as_ptr(), row, cols);
                        }
                    }
                }
            }

            /// One row of a whole tile: `C = alpha * acc + beta * C` for `NR` columns at `out`.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn write_row(acc: &[$v; 2], alpha: f32, beta: f32, out: *mut f32) {
                // SAFETY: `out` has room for `NR` floats.
                unsafe {
                    for (h, &acc) in acc.iter().enumerate() {
                        let mut y = $mul($splat(alpha), acc);
                        if beta != 0.0 {
                            y = $fma($splat(beta), $load(out.add(h * $lanes)), y);
                        }
                        $store(out.add(h * $lanes), y);
                    }
                }
            }
            // ANCHOR_END: write
        }
    };
}
// ANCHOR: instances
microkernel!(avx512, "avx512f", __m512, lanes: 16, rows: 12,
    _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps,
    _mm512_mul_ps);
microkernel!(avx2, "avx2,fma", __m256, lanes: 8, rows: 6,
    _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps,
    _mm256_mul_ps);
// ANCHOR_END: instances
