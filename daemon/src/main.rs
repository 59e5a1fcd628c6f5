//! `sessiond`: the host daemon and its command-line interface.

mod jail;
// The microVM backend for pools (a later issue) is its user; the tests drive it now.
#[allow(dead_code)]
mod vmm_jail;

mod agent_client;
mod api;
mod backend;
mod cli;
mod config;
mod host;
mod metrics;
mod pool;
mod pool_spec;
mod session;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use crate::backend::Backend;
use crate::cli::{Cli, Command};
use crate::config::Config;

fn main() -> std::process::ExitCode {
    // `jail-init` is dispatched before anything else starts a thread: it forks
    // into new namespaces, which is only sound in a single-threaded process.
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new("jail-init")) {
        jail::init::run();
    }
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new("vmm-jail-init")) {
        vmm_jail::init::run();
    }
    let cli = Cli::parse();
    // Also before any thread: the VMM starts its own vCPU threads, each confined by its
    // own seccomp filter, and needs no async runtime.
    match &cli.command {
        Command::Vmm { config } => return run_vmm(config),
        Command::Host { output } => return print_host(*output),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sessiond: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => serve(&config).await,
            Command::Pool { command, conn } => cli::run_pool(command, conn).await,
            Command::Exec(args) => cli::run_exec(args).await,
            Command::Vmm { .. } | Command::Host { .. } => unreachable!("dispatched above"),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessiond: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `sessiond vmm --config <file>`: one microVM in this process until the guest stops.
fn run_vmm(config: &Path) -> std::process::ExitCode {
    match vmm::standalone::run(config) {
        Ok(stop) => std::process::ExitCode::from(vmm::standalone::exit_code(stop)),
        Err(e) => {
            eprintln!("sessiond vmm: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `sessiond host`: this host's KVM, the evidence, and the backend pools use.
fn print_host(output: cli::Output) -> std::process::ExitCode {
    let report = host::detect();
    match output {
        cli::Output::Table => print!("{}", report.to_text()),
        cli::Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("sessiond host: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
    }
    std::process::ExitCode::SUCCESS
}

/// How long in-flight requests may run on after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

pub use sessiond_agent::output::error_chain;

/// `http+unix://` URL base for a socket path (requests-unixsocket style).
fn unix_endpoint(path: &Path) -> String {
    let enc: String = path
        .to_string_lossy()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("http+unix://{enc}")
}

async fn serve(config_path: &Path) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let config = Config::load(config_path)?;
    let (rootfs, agent) = config.resolve_paths()?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
    let mut jail_cfg = jail::JailConfig::new(rootfs, agent, config.run_dir.clone());
    jail_cfg.uid_base = config.uid_base;
    jail_cfg.cgroup_name = config.cgroup_name.clone();
    let backend = Arc::new(Backend::Jail(
        jail::JailBackend::new(jail_cfg).context("cannot start the jail backend")?,
    ));
    let isolation = backend.isolation();
    tracing::info!(backend = backend.kind(), %isolation, "sandbox backend ready");
    let host = Arc::new(host::detect());
    tracing::info!(kvm = ?host.kvm.kind, reason = %host.reason, "host capability");

    let unix = api::bind_unix(&config.listen_unix)?;
    let tcp = match config.listen_tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let endpoint_base = match config.listen_tcp {
        Some(addr) => format!("http://{addr}"),
        None => unix_endpoint(&config.listen_unix),
    };

    let metrics = Arc::new(metrics::Metrics::new());
    let pools = pool::Pools::start(
        Arc::clone(&backend),
        Arc::clone(&metrics),
        &config.state_dir,
        config.pools.clone(),
    )?;
    let state = Arc::new(api::AppState {
        pools: Arc::clone(&pools),
        metrics,
        api_keys: config.api_keys.clone(),
        pool_full_status: config.pool_full_status,
        endpoint_base,
        backend_kind: backend.kind(),
        isolation,
        host,
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal_token.cancel();
    });
    tracing::info!(socket = %config.listen_unix.display(), tcp = ?config.listen_tcp, auth = !config.api_keys.is_empty(), "sessiond listening");
    let mut server = tokio::spawn(api::serve(api::router(state), unix, tcp, shutdown.clone()));
    let served = tokio::select! {
        r = &mut server => Some(r),
        _ = shutdown.cancelled() => None,
    };
    // In-flight requests get a moment to finish; a long execution must not
    // hold the shutdown (and its sandboxes) hostage.
    let served = match served {
        Some(r) => r,
        None => match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    grace_s = SHUTDOWN_GRACE.as_secs(),
                    "requests still running at shutdown; cutting them off"
                );
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    tracing::info!("shutting down: destroying all sandboxes");
    shutdown.cancel();
    pools.shutdown().await;
    backend.shutdown();
    let _ = std::fs::remove_file(&config.listen_unix);
    served.context("server task failed")??;
    tracing::info!("sessiond stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
