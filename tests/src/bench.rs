//! What both benchmarks measure and write the same way.

use std::path::PathBuf;

/// Peak resident memory (`VmHWM`) of a process, in MiB; 0 when it cannot be read.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Writes a benchmark's figures to `target/bench/<name>` and says where.
pub fn write_json(name: &str, figures: &serde_json::Value) {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"));
    let path = dir.join(name);
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(figures).unwrap_or_default(),
        )
    });
    match written {
        Ok(()) => println!("\nJSON: {}", path.display()),
        Err(error) => eprintln!("\ncould not write {}: {error}", path.display()),
    }
}
