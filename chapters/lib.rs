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
