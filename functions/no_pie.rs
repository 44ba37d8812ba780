//! Build script shared by the six functions: link each as a position-dependent
//! executable on Linux.
//!
//! A position-independent executable is relocated by the dynamic loader at every
//! start: some 28,000 relative relocations here, written into pages that are then
//! copied on write. That was a fifth of a cold start's CPU (docs/benchmarks.md).
//! The price is that the binary's own code and data load at a fixed address
//! (the stack, heap, mmap areas and shared libraries stay randomized), as Go's
//! Lambda binaries have always loaded. `RUSTFLAGS` cannot carry this: it reaches
//! proc-macros and cdylibs too, which must stay position-independent.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
