//! `sessiond-agent`: see `sessiond_agent::args::USAGE` for the command line.

use std::os::fd::{FromRawFd, RawFd};
use std::process::ExitCode;

use anyhow::Context;
use sessiond_agent::args::{Args, ArgsError, Listen, USAGE};
use sessiond_agent::files::DataDir;
use sessiond_agent::init::{fork_init, Role};
use sessiond_agent::python::Python;
use sessiond_agent::server::{router, AgentState};

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args_os()) {
        Ok(a) => a,
        Err(ArgsError::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Version) => {
            println!("sessiond-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("sessiond-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Code in the sandbox runs as the agent's uid: without this it could
    // open /proc/<agent>/mem and take the agent over. Python and shell
    // children become dumpable again at execve, which is fine.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("sessiond-agent: cannot mark the agent non-dumpable: {e}");
        return ExitCode::FAILURE;
    }
    if args.init {
        let fd = match &args.listen {
            Listen::Fd(fd) => Some(*fd),
            Listen::Path(_) => None,
        };
        match fork_init(fd) {
            Ok(Role::Agent) => {}
            Ok(Role::Exit(code)) => return ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("sessiond-agent: {:#}", anyhow::Error::from(e));
                return ExitCode::FAILURE;
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sessiond-agent: build the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn listener_from_fd(fd: RawFd) -> anyhow::Result<tokio::net::UnixListener> {
    // The socket must not leak into Python or shell children: they could
    // accept the daemon's connections and answer in the agent's name.
    // SAFETY: fcntl on an integer fd; a bad fd only yields EBADF.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("listening fd {fd} is not open"));
    }
    // SAFETY: the fd is open (checked above) and handed to us to own; nothing
    // else in this process uses it.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    std_listener
        .set_nonblocking(true)
        .context("set the listening socket non-blocking")?;
    tokio::net::UnixListener::from_std(std_listener)
        .with_context(|| format!("fd {fd} is not a listening Unix socket"))
}

fn listener_at(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("remove stale socket {}", path.display()))?;
        }
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = match &args.listen {
        Listen::Fd(fd) => listener_from_fd(*fd)?,
        Listen::Path(p) => listener_at(p)?,
    };
    let data = DataDir::open(&args.data_dir).context("open the data directory")?;
    let python = Python::new(args.python.clone(), args.data_dir.clone());
    let warm = python.clone();
    tokio::spawn(async move {
        if let Err(e) = warm.warm().await {
            tracing::error!("start python: {:#}", anyhow::Error::from(e));
        }
    });
    let state = AgentState::new(python, data);
    tracing::info!(listen = ?args.listen, data_dir = %args.data_dir.display(), "agent serving");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            sigterm.recv().await;
        })
        .await
        .context("serve")?;
    Ok(())
}
