//! Pools: ready sandboxes kept warm, sessions bound to sandboxes, the
//! max-sessions limit, the cooldown sweeper, and pool persistence.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sessiond_agent::proto::InitRequest;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent_client::AgentClient;
use crate::backend::{Backend, Sandbox};
use crate::error_chain;
use crate::metrics::Metrics;
use crate::pool_spec::{PoolProperties, PoolSpec, PoolSpecError};
use crate::session::Session;

const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
const REFILL_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Size of each sandbox's /dev/shm tmpfs (see `jail::rootfs`); like the
/// data directory it is memory charged to the sandbox's memory cgroup.
const SHM_BYTES: u64 = 64 << 20;

/// Pool settings that are valid but likely not what the operator meant.
pub fn spec_warnings(spec: &PoolSpec) -> Vec<String> {
    let mut w = Vec::new();
    if spec.disk_bytes.saturating_add(SHM_BYTES) >= spec.memory_bytes {
        w.push(format!(
            "disk ({} MiB) plus /dev/shm (64 MiB) is not below memory ({} MiB): the sandbox's files live in memory, so code that fills the disk hits the memory limit (and the OOM killer) before it gets ENOSPC",
            spec.disk_bytes >> 20,
            spec.memory_bytes >> 20
        ));
    }
    w
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("session pool {0:?} does not exist")]
    NotFound(String),
    #[error("session pool {pool:?} is full: {max} sessions are allocated (maxConcurrentSessions); retry later or delete a session")]
    Full { pool: String, max: u32 },
    #[error("no session with identifier {0:?} exists in this pool")]
    SessionNotFound(String),
    #[error("could not start a sandbox for the session: {0}")]
    Allocation(String),
    #[error("session pool {0:?} is being deleted or the daemon is shutting down")]
    Closing(String),
    #[error("pool {0:?} is defined in the config file: change it there and restart sessiond")]
    ManagedByConfig(String),
    #[error("invalid pool")]
    Spec(#[from] PoolSpecError),
    #[error("cannot persist pool under {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolSource {
    Config,
    Api,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolCounts {
    pub ready_sessions: usize,
    pub allocated_sessions: usize,
    pub starting_sessions: u32,
}

struct ReadySandbox {
    sandbox: Sandbox,
    generation: u64,
}

#[derive(Default)]
struct PoolInner {
    sessions: HashMap<String, Arc<Session>>,
    ready: VecDeque<ReadySandbox>,
    starting: u32,
    generation: u64,
    closing: bool,
}

pub struct Pool {
    pub name: String,
    pub source: PoolSource,
    spec: RwLock<Arc<PoolSpec>>,
    inner: Mutex<PoolInner>,
    refill: Notify,
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    destroying: Arc<AtomicUsize>,
}

impl Pool {
    fn new(
        spec: PoolSpec,
        source: PoolSource,
        backend: Arc<Backend>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        destroying: Arc<AtomicUsize>,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            name: spec.name.clone(),
            source,
            spec: RwLock::new(Arc::new(spec)),
            inner: Mutex::new(PoolInner::default()),
            refill: Notify::new(),
            backend,
            metrics,
            stop,
            destroying,
        });
        tokio::spawn(Arc::clone(&pool).refill_loop());
        pool.refill.notify_one();
        pool
    }

    pub fn spec(&self) -> Arc<PoolSpec> {
        Arc::clone(&self.spec.read().expect("pool spec lock"))
    }

    pub fn isolation(&self) -> String {
        self.backend.isolation()
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    pub fn counts(&self) -> PoolCounts {
        let inner = self.inner.lock().expect("pool lock");
        PoolCounts {
            ready_sessions: inner.ready.len(),
            allocated_sessions: inner.sessions.len(),
            starting_sessions: inner.starting,
        }
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        let inner = self.inner.lock().expect("pool lock");
        let mut v: Vec<_> = inner.sessions.values().cloned().collect();
        v.sort_by_key(|s| s.created);
        v
    }

    fn publish(&self, inner: &PoolInner) {
        let l = Metrics::pool(&self.name);
        self.metrics
            .sessions_ready
            .get_or_create(&l)
            .set(inner.ready.len() as i64);
        self.metrics
            .sessions_allocated
            .get_or_create(&l)
            .set(inner.sessions.len() as i64);
    }

    /// Looks a session up without allocating one.
    pub fn existing(&self, identifier: &str) -> Option<Arc<Session>> {
        self.inner
            .lock()
            .expect("pool lock")
            .sessions
            .get(identifier)
            .cloned()
    }

    /// The session for `identifier`, allocating one for a new identifier.
    /// Concurrent first calls share one allocation.
    pub async fn session(
        self: &Arc<Self>,
        identifier: &str,
    ) -> Result<(Arc<Session>, AgentClient), PoolError> {
        let session = {
            let mut inner = self.inner.lock().expect("pool lock");
            if inner.closing {
                return Err(PoolError::Closing(self.name.clone()));
            }
            match inner.sessions.get(identifier) {
                Some(s) => Arc::clone(s),
                None => {
                    let max = self.spec().max_concurrent_sessions;
                    if inner.sessions.len() >= max as usize {
                        return Err(PoolError::Full {
                            pool: self.name.clone(),
                            max,
                        });
                    }
                    let s = Session::new(&self.name, identifier);
                    inner
                        .sessions
                        .insert(identifier.to_string(), Arc::clone(&s));
                    self.publish(&inner);
                    s
                }
            }
        };
        let result = session
            .client_cell()
            .get_or_init(|| self.attach(&session))
            .await
            .clone();
        match result {
            Ok(client) if !session.is_removed() => Ok((session, client)),
            Ok(_) => Err(PoolError::SessionNotFound(identifier.to_string())),
            Err(msg) => {
                self.remove_session(&session, "allocation failed");
                Err(PoolError::Allocation(msg))
            }
        }
    }

    /// Takes a live ready sandbox, discarding dead or outdated ones.
    fn take_ready(&self) -> Option<Sandbox> {
        let mut inner = self.inner.lock().expect("pool lock");
        let generation = inner.generation;
        let mut found = None;
        while let Some(mut r) = inner.ready.pop_front() {
            if r.generation == generation && r.sandbox.is_alive() {
                found = Some(r.sandbox);
                break;
            }
            self.destroy_later(r.sandbox, "stale ready sandbox");
        }
        self.publish(&inner);
        found
    }

    async fn attach(self: &Arc<Self>, session: &Arc<Session>) -> Result<AgentClient, String> {
        let spec = self.spec();
        let mut last_err = String::new();
        for attempt in 0..2 {
            let (sandbox, warm) = match self.take_ready() {
                Some(s) => (s, true),
                None => match self.backend.spawn_ready(&spec).await {
                    Ok(s) => (s, false),
                    Err(e) => {
                        self.metrics
                            .sandbox_start_failures
                            .get_or_create(&Metrics::pool(&self.name))
                            .inc();
                        last_err = error_chain(&e);
                        tracing::warn!(pool = %self.name, identifier = %session.identifier, attempt, error = %last_err, "sandbox start failed");
                        continue;
                    }
                },
            };
            self.refill.notify_one();
            let client = AgentClient::new(sandbox.agent_socket());
            let init = InitRequest {
                unix_time_ms: Some(chrono::Utc::now().timestamp_millis().max(0) as u64),
                entropy_hex: Some(format!(
                    "{}{}",
                    uuid::Uuid::new_v4().simple(),
                    uuid::Uuid::new_v4().simple()
                )),
                env: spec.env.clone(),
                session_id: Some(session.identifier.clone()),
            };
            if let Err(e) = client.init(&init).await {
                last_err = format!("agent init failed: {}", error_chain(&e));
                tracing::warn!(pool = %self.name, identifier = %session.identifier, sandbox = %sandbox.id(), error = %last_err, "discarding sandbox");
                self.destroy_later(sandbox, "init failed");
                continue;
            }
            let sandbox_id = sandbox.id().to_string();
            if let Err(sandbox) = session.attach(sandbox) {
                self.destroy_later(*sandbox, "session removed while allocating");
                return Err("the session was deleted while it was being allocated".into());
            }
            self.metrics
                .allocations
                .get_or_create(&Metrics::pool(&self.name))
                .inc();
            tracing::info!(pool = %self.name, identifier = %session.identifier, sandbox = %sandbox_id, warm, "session allocated");
            return Ok(client);
        }
        Err(last_err)
    }

    /// Removes `session` (if it is still the one registered under its
    /// identifier) and destroys its sandbox in the background.
    pub fn remove_session(&self, session: &Arc<Session>, reason: &str) -> bool {
        let removed = {
            let mut inner = self.inner.lock().expect("pool lock");
            let same = inner
                .sessions
                .get(&session.identifier)
                .is_some_and(|s| Arc::ptr_eq(s, session));
            if same {
                inner.sessions.remove(&session.identifier);
                self.publish(&inner);
            }
            same
        };
        if let Some(sandbox) = session.take_sandbox() {
            tracing::info!(pool = %self.name, identifier = %session.identifier, sandbox = %sandbox.id(), reason, "session removed");
            self.destroy_later(sandbox, reason);
        }
        if removed {
            self.refill.notify_one();
        }
        removed
    }

    /// Removes a session whose sandbox is gone; true when that was the case.
    pub fn remove_if_dead(&self, session: &Arc<Session>) -> bool {
        if session.sandbox_alive() {
            return false;
        }
        tracing::warn!(pool = %self.name, identifier = %session.identifier, "sandbox exited unexpectedly");
        self.remove_session(session, "sandbox exited");
        true
    }

    fn destroy_later(&self, sandbox: Sandbox, reason: &str) {
        let id = sandbox.id().to_string();
        let pool = self.name.clone();
        let reason = reason.to_string();
        self.destroying.fetch_add(1, Ordering::SeqCst);
        let destroying = Arc::clone(&self.destroying);
        tokio::spawn(async move {
            if let Err(e) = sandbox.destroy().await {
                tracing::error!(pool = %pool, sandbox = %id, reason = %reason, error = %error_chain(&e), "destroying sandbox failed");
            } else {
                tracing::debug!(pool = %pool, sandbox = %id, reason = %reason, "sandbox destroyed");
            }
            destroying.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Destroys sessions idle past the cooldown; drops dead ready sandboxes.
    fn sweep(&self, now: Instant) {
        let cooldown = self.spec().cooldown;
        let expired: Vec<Arc<Session>> = {
            let inner = self.inner.lock().expect("pool lock");
            inner
                .sessions
                .values()
                .filter(|s| s.is_attached() && s.is_idle_expired(cooldown, now))
                .cloned()
                .collect()
        };
        for s in expired {
            tracing::info!(pool = %self.name, identifier = %s.identifier, cooldown_s = cooldown.as_secs(), "session expired after cooldown");
            if self.remove_session(&s, "cooldown expired") {
                self.metrics
                    .sessions_expired
                    .get_or_create(&Metrics::pool(&self.name))
                    .inc();
            }
        }
        let mut inner = self.inner.lock().expect("pool lock");
        let before = inner.ready.len();
        let mut keep = VecDeque::with_capacity(before);
        while let Some(mut r) = inner.ready.pop_front() {
            if r.sandbox.is_alive() {
                keep.push_back(r);
            } else {
                tracing::warn!(pool = %self.name, sandbox = %r.sandbox.id(), "ready sandbox exited");
                self.destroy_later(r.sandbox, "ready sandbox exited");
            }
        }
        inner.ready = keep;
        if inner.ready.len() != before {
            self.publish(&inner);
            self.refill.notify_one();
        }
    }

    async fn refill_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            tokio::select! {
                _ = self.refill.notified() => {}
                _ = self.stop.cancelled() => return,
            }
            loop {
                let (spec, generation) = {
                    let mut inner = self.inner.lock().expect("pool lock");
                    let spec = self.spec();
                    let have = inner.ready.len() + inner.starting as usize;
                    if inner.closing || have >= spec.ready_session_instances as usize {
                        break;
                    }
                    inner.starting += 1;
                    (spec, inner.generation)
                };
                let started = tokio::select! {
                    r = self.backend.spawn_ready(&spec) => r,
                    _ = self.stop.cancelled() => {
                        self.inner.lock().expect("pool lock").starting -= 1;
                        return;
                    }
                };
                let failed = {
                    let mut inner = self.inner.lock().expect("pool lock");
                    inner.starting -= 1;
                    match started {
                        Ok(sandbox) => {
                            if inner.closing || inner.generation != generation {
                                self.destroy_later(sandbox, "pool changed while starting");
                            } else {
                                tracing::debug!(pool = %self.name, sandbox = %sandbox.id(), "ready sandbox started");
                                inner.ready.push_back(ReadySandbox {
                                    sandbox,
                                    generation,
                                });
                                self.publish(&inner);
                            }
                            None
                        }
                        Err(e) => Some(e),
                    }
                };
                match failed {
                    None => backoff = Duration::from_millis(500),
                    Some(e) => {
                        self.metrics
                            .sandbox_start_failures
                            .get_or_create(&Metrics::pool(&self.name))
                            .inc();
                        tracing::error!(pool = %self.name, error = %error_chain(&e), retry_in_ms = backoff.as_millis() as u64, "starting a ready sandbox failed");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = self.stop.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(REFILL_BACKOFF_MAX);
                    }
                }
            }
        }
    }

    /// Replaces the spec; ready sandboxes built from the old one are dropped.
    fn update(&self, spec: PoolSpec) {
        *self.spec.write().expect("pool spec lock") = Arc::new(spec);
        let mut inner = self.inner.lock().expect("pool lock");
        inner.generation += 1;
        for r in std::mem::take(&mut inner.ready) {
            self.destroy_later(r.sandbox, "pool updated");
        }
        self.publish(&inner);
        drop(inner);
        self.refill.notify_one();
    }

    /// Stops the pool and destroys every sandbox it holds, waiting for them.
    async fn close(&self) {
        self.stop.cancel();
        let (sessions, ready) = {
            let mut inner = self.inner.lock().expect("pool lock");
            inner.closing = true;
            let sessions: Vec<_> = inner.sessions.drain().map(|(_, s)| s).collect();
            let ready: Vec<_> = inner.ready.drain(..).map(|r| r.sandbox).collect();
            self.publish(&inner);
            (sessions, ready)
        };
        let mut sandboxes = ready;
        sandboxes.extend(sessions.iter().filter_map(|s| s.take_sandbox()));
        let pool = self.name.clone();
        let tasks = sandboxes.into_iter().map(|sb| {
            let pool = pool.clone();
            async move {
                let id = sb.id().to_string();
                if let Err(e) = sb.destroy().await {
                    tracing::error!(pool = %pool, sandbox = %id, error = %error_chain(&e), "destroying sandbox failed");
                }
            }
        });
        futures_util::future::join_all(tasks).await;
    }
}

/// What is stored per API-created pool under `<state_dir>/pools/`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPool {
    name: String,
    properties: PoolProperties,
}

/// Every pool of the daemon.
pub struct Pools {
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    state_dir: PathBuf,
    pools: RwLock<BTreeMap<String, Arc<Pool>>>,
    stop: CancellationToken,
    destroying: Arc<AtomicUsize>,
}

impl Pools {
    /// Creates the pools from the config, then those persisted by the API.
    pub fn start(
        backend: Arc<Backend>,
        metrics: Arc<Metrics>,
        state_dir: &Path,
        config_pools: Vec<PoolSpec>,
    ) -> Result<Arc<Pools>, PoolError> {
        let pools = Arc::new(Pools {
            backend,
            metrics,
            state_dir: state_dir.to_path_buf(),
            pools: RwLock::new(BTreeMap::new()),
            stop: CancellationToken::new(),
            destroying: Arc::new(AtomicUsize::new(0)),
        });
        let mut map = BTreeMap::new();
        for spec in config_pools {
            map.insert(spec.name.clone(), pools.make(spec, PoolSource::Config));
        }
        for spec in pools.load_stored()? {
            if map.contains_key(&spec.name) {
                tracing::warn!(pool = %spec.name, "a pool stored by the API has the name of a config pool; the config wins");
                continue;
            }
            map.insert(spec.name.clone(), pools.make(spec, PoolSource::Api));
        }
        *pools.pools.write().expect("pools lock") = map;
        let sweeper = Arc::clone(&pools);
        tokio::spawn(async move { sweeper.sweep_loop().await });
        Ok(pools)
    }

    fn make(&self, spec: PoolSpec, source: PoolSource) -> Arc<Pool> {
        for w in spec_warnings(&spec) {
            tracing::warn!(pool = %spec.name, "{w}");
        }
        tracing::info!(pool = %spec.name, ?source, container_type = spec.container_type.as_str(), max = spec.max_concurrent_sessions, ready = spec.ready_session_instances, cooldown_s = spec.cooldown.as_secs(), "pool configured");
        Pool::new(
            spec,
            source,
            Arc::clone(&self.backend),
            Arc::clone(&self.metrics),
            self.stop.child_token(),
            Arc::clone(&self.destroying),
        )
    }

    fn store_dir(&self) -> PathBuf {
        self.state_dir.join("pools")
    }

    fn load_stored(&self) -> Result<Vec<PoolSpec>, PoolError> {
        let dir = self.store_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(PoolError::Persist { path: dir, source }),
        };
        let mut specs = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<StoredPool>(&b).map_err(|e| e.to_string()))
                .and_then(|p| {
                    p.properties
                        .into_fields(&p.name)
                        .and_then(|f| f.validate())
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok(spec) => specs.push(spec),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "ignoring unreadable stored pool")
                }
            }
        }
        Ok(specs)
    }

    fn persist(&self, spec: &PoolSpec) -> Result<(), PoolError> {
        let dir = self.store_dir();
        let err = |source| PoolError::Persist {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(err)?;
        let stored = StoredPool {
            name: spec.name.clone(),
            properties: PoolProperties::from_spec(spec),
        };
        let bytes = serde_json::to_vec_pretty(&stored).expect("pool properties serialize");
        let tmp = dir.join(format!(".{}.json.tmp", spec.name));
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, dir.join(format!("{}.json", spec.name))).map_err(err)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools.read().expect("pools lock").get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Pool>> {
        self.pools
            .read()
            .expect("pools lock")
            .values()
            .cloned()
            .collect()
    }

    /// Creates or updates an API pool; true when it was created.
    pub fn put(&self, spec: PoolSpec) -> Result<(Arc<Pool>, bool), PoolError> {
        if let Some(existing) = self.get(&spec.name) {
            if existing.source == PoolSource::Config {
                return Err(PoolError::ManagedByConfig(spec.name));
            }
            self.persist(&spec)?;
            if *existing.spec() != spec {
                tracing::info!(pool = %spec.name, "pool updated");
                for w in spec_warnings(&spec) {
                    tracing::warn!(pool = %spec.name, "{w}");
                }
                existing.update(spec);
            }
            return Ok((existing, false));
        }
        self.persist(&spec)?;
        let name = spec.name.clone();
        let pool = self.make(spec, PoolSource::Api);
        let mut map = self.pools.write().expect("pools lock");
        if let Some(raced) = map.get(&name) {
            // Two concurrent creates: keep the first, stop the second.
            pool.stop.cancel();
            return Ok((Arc::clone(raced), false));
        }
        map.insert(name, Arc::clone(&pool));
        Ok((pool, true))
    }

    pub async fn delete(&self, name: &str) -> Result<(), PoolError> {
        let pool = self
            .get(name)
            .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
        if pool.source == PoolSource::Config {
            return Err(PoolError::ManagedByConfig(name.to_string()));
        }
        self.pools.write().expect("pools lock").remove(name);
        let path = self.store_dir().join(format!("{name}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PoolError::Persist { path, source }),
        }
        tracing::info!(pool = %name, "pool deleted");
        pool.close().await;
        Ok(())
    }

    async fn sweep_loop(&self) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop.cancelled() => return,
            }
            let now = Instant::now();
            for pool in self.list() {
                pool.sweep(now);
            }
        }
    }

    /// Destroys every sandbox of every pool.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let pools = self.list();
        futures_util::future::join_all(pools.iter().map(|p| p.close())).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.destroying.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool_spec::PoolFields;

    fn spec(memory: &str, disk: &str) -> PoolSpec {
        PoolFields {
            name: "py".into(),
            memory: Some(memory.into()),
            disk: Some(disk.into()),
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn disk_that_cannot_fill_before_memory_is_warned_about() {
        // The defaults (2 GiB memory, 1 GiB disk) leave room.
        assert!(spec_warnings(&spec("2Gi", "1Gi")).is_empty());
        let w = spec_warnings(&spec("1Gi", "1Gi"));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("ENOSPC"), "{}", w[0]);
        // /dev/shm counts: 960 MiB of disk + 64 MiB of shm fills 1 GiB.
        assert_eq!(spec_warnings(&spec("1Gi", "960Mi")).len(), 1);
        assert!(spec_warnings(&spec("1Gi", "959Mi")).is_empty());
    }
}
