//! The freestanding test guests in `tests/guests/`, compiled with gcc: shared by this crate's
//! tests and benchmark and by the daemon's tests of the jailed VMM, so every caller builds
//! them the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestBuildError {
    #[error("running gcc (needed to build the test guests)")]
    Spawn(#[source] std::io::Error),
    #[error("gcc failed to build guest {0}")]
    Failed(String),
}

/// Directory holding the guests' C sources.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests")
}

/// Compiles `tests/guests/<name>.c` into `<out_dir>/<name>.elf`: a freestanding ELF entered
/// at 1 MiB in 64-bit mode.
pub fn build(name: &str, out_dir: &Path) -> Result<PathBuf, GuestBuildError> {
    let src = source_dir();
    let out = out_dir.join(format!("{name}.elf"));
    let status = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-fno-pie",
            "-mgeneral-regs-only",
            "-mno-sse",
            "-mno-red-zone",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            // No endbr64: KVM's instruction emulator may not know it.
            "-fcf-protection=none",
            "-O2",
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=4096",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()))
        .arg(src.join(format!("{name}.c")))
        .arg("-o")
        .arg(&out)
        .status()
        .map_err(GuestBuildError::Spawn)?;
    if !status.success() {
        return Err(GuestBuildError::Failed(name.to_owned()));
    }
    Ok(out)
}
