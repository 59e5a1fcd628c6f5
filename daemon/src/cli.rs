//! Command line: `serve`, and pool/exec commands that talk to a running
//! daemon's management API over its Unix socket.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use axum::body::Body;
use clap::{Args, Parser, Subcommand, ValueEnum};
use http_body_util::BodyExt;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_LISTEN_UNIX};

#[derive(Debug, Parser)]
#[command(
    name = "sessiond",
    version,
    about = "Self-hosted dynamic sessions: pools of pre-warmed sandboxes behind an Azure-compatible API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Manage session pools of a running daemon.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Run code in a session (a quick way to try a pool).
    Exec(ExecArgs),
    /// Run one microVM from a JSON config file, without an API server: the VMM process
    /// (exits with the guest's status; 128 for a shutdown). See vmm/README.md.
    Vmm {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show what this host offers for isolation (KVM kind, with the evidence) and which
    /// sandbox backend pools use, and why.
    #[command(alias = "doctor")]
    Host {
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct Connection {
    /// The daemon's API socket (default: listen_unix from --config, else /run/sessiond/api.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Config file to read the socket path from.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// API key, when the daemon has api_keys configured.
    #[arg(long, global = true, env = "SESSIOND_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create (or update) a pool; flags as in `az containerapp sessionpool create`.
    Create(CreateArgs),
    /// List pools.
    List {
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Show one pool as JSON.
    Show {
        #[arg(long, short = 'n')]
        name: String,
    },
    /// Delete a pool and destroy its sessions.
    Delete {
        #[arg(long, short = 'n')]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[arg(long, short = 'n')]
    pub name: String,
    /// PythonLTS or Shell.
    #[arg(long, default_value = "PythonLTS")]
    pub container_type: String,
    #[arg(long)]
    pub max_sessions: Option<u64>,
    /// Idle seconds before a session is destroyed.
    #[arg(long)]
    pub cooldown_period: Option<u64>,
    #[arg(long)]
    pub ready_sessions: Option<u64>,
    /// EgressDisabled (EgressEnabled is not supported yet).
    #[arg(long)]
    pub network_status: Option<String>,
    /// CPU cores per session, e.g. 0.5.
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Memory per session, e.g. 1Gi.
    #[arg(long)]
    pub memory: Option<String>,
    /// Writable disk per session, e.g. 1Gi.
    #[arg(long)]
    pub disk: Option<String>,
    /// Maximum processes per session.
    #[arg(long)]
    pub pids: Option<u64>,
    /// Environment variables, K=V (repeatable, or several after one flag).
    #[arg(long, num_args = 1..)]
    pub env_vars: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[arg(long)]
    pub pool: String,
    #[arg(long)]
    pub identifier: String,
    /// Python code (or a shell command on Shell pools).
    #[arg(long, conflicts_with = "shell")]
    pub code: Option<String>,
    /// A shell command.
    #[arg(long)]
    pub shell: Option<String>,
    #[arg(long)]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub conn: Connection,
}

impl Connection {
    fn socket_path(&self) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        Config::load(&self.config)
            .map(|c| c.listen_unix)
            .unwrap_or_else(|_| PathBuf::from(DEFAULT_LISTEN_UNIX))
    }
}

/// One request to the daemon over its Unix socket.
async fn call(
    conn: &Connection,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    let socket = conn.socket_path();
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .with_context(|| cannot_connect(&socket))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| cannot_connect(&socket))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sessiond")
        .header("content-type", "application/json");
    if let Some(k) = &conn.api_key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body = match body {
        Some(v) => Body::from(serde_json::to_vec(&v)?),
        None => Body::empty(),
    };
    let resp = sender
        .send_request(req.body(body)?)
        .await
        .with_context(|| format!("request to {} failed", socket.display()))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, value))
}

fn cannot_connect(socket: &Path) -> String {
    format!(
        "cannot connect to {}: is `sessiond serve` running? (pass --socket if it listens elsewhere)",
        socket.display()
    )
}

/// Fails with the daemon's own error message when the status is not 2xx.
fn expect_ok(status: StatusCode, v: &Value) -> anyhow::Result<()> {
    if status.is_success() {
        return Ok(());
    }
    let code = v["error"]["code"].as_str().unwrap_or("");
    let msg = v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string());
    if status == StatusCode::UNAUTHORIZED {
        bail!("{msg} ({code}): pass --api-key or set SESSIOND_API_KEY");
    }
    bail!("{msg} ({status} {code})")
}

fn parse_env(vars: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    for v in vars {
        let Some((k, val)) = v.split_once('=') else {
            bail!("--env-vars takes K=V pairs, got {v:?}");
        };
        m.insert(k.to_string(), Value::String(val.to_string()));
    }
    Ok(m)
}

pub fn create_body(a: &CreateArgs) -> anyhow::Result<Value> {
    let mut props = json!({
        "containerType": a.container_type,
        "scaleConfiguration": {},
        "dynamicPoolConfiguration": {},
    });
    if let Some(n) = a.max_sessions {
        props["scaleConfiguration"]["maxConcurrentSessions"] = json!(n);
    }
    if let Some(n) = a.ready_sessions {
        props["scaleConfiguration"]["readySessionInstances"] = json!(n);
    }
    if let Some(n) = a.cooldown_period {
        props["dynamicPoolConfiguration"]["cooldownPeriodInSeconds"] = json!(n);
    }
    if let Some(s) = &a.network_status {
        props["sessionNetworkConfiguration"] = json!({ "status": s });
    }
    if let Some(c) = a.cpu {
        props["cpu"] = json!(c);
    }
    if let Some(m) = &a.memory {
        props["memory"] = json!(m);
    }
    if let Some(d) = &a.disk {
        props["disk"] = json!(d);
    }
    if let Some(p) = a.pids {
        props["pids"] = json!(p);
    }
    if !a.env_vars.is_empty() {
        props["env"] = Value::Object(parse_env(&a.env_vars)?);
    }
    Ok(json!({ "properties": props }))
}

fn print_table(pools: &[Value]) {
    println!(
        "{:<24} {:<10} {:>5} {:>6} {:>10} {:>9} {:>8}  ISOLATION",
        "NAME", "TYPE", "MAX", "READY", "ALLOCATED", "COOLDOWN", "SOURCE"
    );
    for p in pools {
        let pr = &p["properties"];
        println!(
            "{:<24} {:<10} {:>5} {:>6} {:>10} {:>8}s {:>8}  {}",
            p["name"].as_str().unwrap_or(""),
            pr["containerType"].as_str().unwrap_or(""),
            pr["scaleConfiguration"]["maxConcurrentSessions"].to_string(),
            pr["readySessions"].to_string(),
            pr["allocatedSessions"].to_string(),
            pr["dynamicPoolConfiguration"]["cooldownPeriodInSeconds"].to_string(),
            pr["source"].as_str().unwrap_or(""),
            pr["isolation"].as_str().unwrap_or(""),
        );
    }
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub async fn run_pool(cmd: PoolCommand, conn: Connection) -> anyhow::Result<()> {
    match cmd {
        PoolCommand::Create(a) => {
            let body = create_body(&a)?;
            let (status, v) = call(
                &conn,
                Method::PUT,
                &format!("/management/pools/{}", a.name),
                Some(body),
            )
            .await?;
            expect_ok(status, &v)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        PoolCommand::List { output } => {
            let (status, v) = call(&conn, Method::GET, "/management/pools", None).await?;
            expect_ok(status, &v)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => {
                    print_table(v["value"].as_array().map(Vec::as_slice).unwrap_or(&[]))
                }
            }
        }
        PoolCommand::Show { name } => {
            let (status, v) = call(
                &conn,
                Method::GET,
                &format!("/management/pools/{name}"),
                None,
            )
            .await?;
            expect_ok(status, &v)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        PoolCommand::Delete { name } => {
            let (status, v) = call(
                &conn,
                Method::DELETE,
                &format!("/management/pools/{name}"),
                None,
            )
            .await?;
            expect_ok(status, &v)?;
            println!("pool {name} deleted");
        }
    }
    Ok(())
}

pub async fn run_exec(a: ExecArgs) -> anyhow::Result<()> {
    let mut body = json!({ "codeInputType": "Inline", "executionType": "Synchronous" });
    match (&a.code, &a.shell) {
        (Some(c), None) => body["code"] = json!(c),
        (None, Some(s)) => body["shellCommand"] = json!(s),
        _ => bail!("pass --code '<python>' or --shell '<command>'"),
    }
    if let Some(t) = a.timeout {
        body["timeoutInSeconds"] = json!(t);
    }
    let path = format!(
        "/pools/{}/executions?api-version=2025-02-02-preview&identifier={}",
        a.pool,
        encode_query(&a.identifier)
    );
    let (status, v) = call(&a.conn, Method::POST, &path, Some(body)).await?;
    expect_ok(status, &v)?;
    let r = &v["result"];
    if let Some(s) = r["stdout"].as_str().filter(|s| !s.is_empty()) {
        print!("{s}");
    }
    if let Some(s) = r["stderr"].as_str().filter(|s| !s.is_empty()) {
        eprint!("{s}");
    }
    match &r["executionResult"] {
        Value::String(s) if s.is_empty() => {}
        Value::Null => {}
        Value::String(s) => println!("{s}"),
        other => println!("{other}"),
    }
    let st = v["status"].as_str().unwrap_or("");
    if st != "Succeeded" && st != "0" {
        bail!("execution status: {st}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_flags_map_to_arm_properties() {
        let cli = Cli::try_parse_from([
            "sessiond",
            "pool",
            "create",
            "--name",
            "py",
            "--container-type",
            "Shell",
            "--max-sessions",
            "3",
            "--cooldown-period",
            "5",
            "--ready-sessions",
            "1",
            "--memory",
            "1Gi",
            "--env-vars",
            "A=1",
            "B=x=y",
        ])
        .unwrap();
        let Command::Pool {
            command: PoolCommand::Create(a),
            ..
        } = cli.command
        else {
            panic!("not a create");
        };
        let body = create_body(&a).unwrap();
        let props: crate::pool_spec::PoolProperties =
            serde_json::from_value(body["properties"].clone()).unwrap();
        let spec = props.into_fields("py").unwrap().validate().unwrap();
        assert_eq!(spec.max_concurrent_sessions, 3);
        assert_eq!(spec.ready_session_instances, 1);
        assert_eq!(spec.cooldown.as_secs(), 5);
        assert_eq!(
            spec.env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }

    #[test]
    fn bad_env_vars_say_what_to_write() {
        let e = parse_env(&["NOEQUALS".into()]).unwrap_err();
        assert!(e.to_string().contains("K=V"));
    }

    #[tokio::test]
    async fn missing_daemon_says_how_to_start_it() {
        let conn = Connection {
            socket: Some(PathBuf::from("/nonexistent/sessiond.sock")),
            config: PathBuf::from("/nonexistent.toml"),
            api_key: None,
        };
        let e = call(&conn, Method::GET, "/health", None).await.unwrap_err();
        assert!(format!("{e:#}").contains("is `sessiond serve` running?"));
    }
}
