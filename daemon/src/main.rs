//! `sessiond`: the host daemon and its command-line interface.

mod jail;

use std::ffi::OsStr;

fn main() -> std::process::ExitCode {
    // `jail-init` is dispatched before anything else starts a thread: it forks
    // into new namespaces, which is only sound in a single-threaded process.
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new("jail-init")) {
        jail::init::run();
    }
    std::process::ExitCode::SUCCESS
}
