//! # Build a GPT from scratch in Rust, with Burn
//!
//! The library half of the course: every chapter's model lives here so the next chapter can
//! `use` it, and every chapter binary (`chapters/chNN_*/main.rs`) is a notebook that walks
//! through it. See the book in `book/` for the prose.

pub mod common;

pub mod ch01_bigram;
pub mod ch02_attention;
pub mod ch03_gpt;
pub mod ch04_pretrain;
pub mod ch05_fast;
pub mod ch06_generate;
pub mod ch07_bpe;
pub mod ch08_pretrained;
pub mod ch09_finetune;
pub mod ch10_gpu;
pub mod ch11_distributed;
pub mod compare_backends;
pub mod exercises;

// ANCHOR: allocator
/// The memory allocator of every binary and test. Burn's CPU backends allocate a fresh buffer
/// for each tensor op and free it soon after; glibc's default `malloc` returns big buffers to
/// the kernel on every free, so the next op pays page faults to get them back (a fifth of a
/// training step's time in `perf`). mimalloc keeps freed memory for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
// ANCHOR_END: allocator

// ANCHOR: keep_freed_memory
unsafe extern "C" {
    // mimalloc's C API (`mimalloc.h`), linked in by the `mimalloc` crate.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in the `mi_option_e` of the mimalloc that `Cargo.lock` pins (2.x):
/// setting `MIMALLOC_PURGE_DELAY=-1` in the environment shows up as this option's value.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc gives memory that stayed free for a second back to the kernel, and a `lecture`
/// step (chapter 5) frees gigabytes and asks for them again seconds later: the kernel then
/// zeroes every page anew (`clear_page_erms`, 13-16% of the run in `perf`). Never giving it
/// back keeps each process at its peak instead (for `lecture`, 4.3 GB instead of 3.5).
pub fn keep_freed_memory() {
    // SAFETY: a plain call into the allocator's option table.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
// ANCHOR_END: keep_freed_memory
