//! `sessiond jail-init`: the single-threaded process that builds one sandbox.

/// Entry point of `sessiond jail-init`; never returns.
pub fn run() -> ! {
    std::process::exit(1)
}
