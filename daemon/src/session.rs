//! A session: a caller's identifier bound to one sandbox, with its idle
//! timer and its recent executions.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::OnceCell;

use crate::agent_client::AgentClient;
use crate::backend::Sandbox;

/// Past executions kept per session for `GET executions/{id}`.
pub const MAX_EXECUTIONS_KEPT: usize = 100;

struct Activity {
    last: Instant,
    last_wall: DateTime<Utc>,
}

pub struct Session {
    pub identifier: String,
    pub pool: String,
    pub created: DateTime<Utc>,
    /// Set once the sandbox is attached (or attaching failed); concurrent
    /// first calls with one identifier all wait on this one cell.
    client: OnceCell<Result<AgentClient, String>>,
    sandbox: Mutex<Option<Sandbox>>,
    sandbox_id: OnceLock<String>,
    removed: AtomicBool,
    activity: Mutex<Activity>,
    in_flight: AtomicU32,
    executions: Mutex<VecDeque<(String, serde_json::Value)>>,
}

/// Pure idle rule, kept apart so it can be tested without a clock.
pub fn is_expired(last: Instant, in_flight: u32, cooldown: Duration, now: Instant) -> bool {
    in_flight == 0 && now.saturating_duration_since(last) >= cooldown
}

impl Session {
    pub fn new(pool: &str, identifier: &str) -> Arc<Session> {
        Arc::new(Session {
            identifier: identifier.to_string(),
            pool: pool.to_string(),
            created: Utc::now(),
            client: OnceCell::new(),
            sandbox: Mutex::new(None),
            sandbox_id: OnceLock::new(),
            removed: AtomicBool::new(false),
            activity: Mutex::new(Activity {
                last: Instant::now(),
                last_wall: Utc::now(),
            }),
            in_flight: AtomicU32::new(0),
            executions: Mutex::new(VecDeque::new()),
        })
    }

    pub fn client_cell(&self) -> &OnceCell<Result<AgentClient, String>> {
        &self.client
    }

    /// The agent client once attached; `None` while still allocating.
    pub fn client(&self) -> Option<&AgentClient> {
        self.client.get().and_then(|r| r.as_ref().ok())
    }

    pub fn sandbox_id(&self) -> Option<&str> {
        self.sandbox_id.get().map(String::as_str)
    }

    /// Stores the sandbox; hands it back when the session was removed
    /// meanwhile, so the caller destroys it instead of leaking it.
    pub fn attach(&self, sandbox: Sandbox) -> Result<(), Box<Sandbox>> {
        let mut slot = self.sandbox.lock().expect("session lock");
        // Checked under the slot lock: `take_sandbox` sets `removed` before
        // locking, so either it sees this sandbox or this sees `removed`.
        if self.removed.load(Ordering::SeqCst) {
            return Err(Box::new(sandbox));
        }
        let _ = self.sandbox_id.set(sandbox.id().to_string());
        *slot = Some(sandbox);
        Ok(())
    }

    /// Marks the session removed and takes its sandbox out for destruction.
    pub fn take_sandbox(&self) -> Option<Sandbox> {
        self.removed.store(true, Ordering::SeqCst);
        self.sandbox.lock().expect("session lock").take()
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Whether the sandbox process is still there (false once removed).
    pub fn sandbox_alive(&self) -> bool {
        match self.sandbox.lock().expect("session lock").as_mut() {
            Some(s) => s.is_alive(),
            None => false,
        }
    }

    pub fn memory_private_bytes(&self) -> Option<u64> {
        self.sandbox
            .lock()
            .expect("session lock")
            .as_ref()
            .and_then(Sandbox::memory_private_bytes)
    }

    pub fn touch(&self) {
        let mut a = self.activity.lock().expect("session lock");
        a.last = Instant::now();
        a.last_wall = Utc::now();
    }

    pub fn last_accessed(&self) -> DateTime<Utc> {
        self.activity.lock().expect("session lock").last_wall
    }

    pub fn expires_at(&self, cooldown: Duration) -> DateTime<Utc> {
        self.last_accessed() + chrono::Duration::from_std(cooldown).unwrap_or_default()
    }

    pub fn is_idle_expired(&self, cooldown: Duration, now: Instant) -> bool {
        let last = self.activity.lock().expect("session lock").last;
        is_expired(last, self.in_flight.load(Ordering::SeqCst), cooldown, now)
    }

    pub fn is_attached(&self) -> bool {
        self.client().is_some()
    }

    /// Marks a call in progress: the session is not expired while it runs,
    /// and its idle timer restarts when it ends.
    pub fn begin_call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        CallGuard(Arc::clone(self))
    }

    pub fn record_execution(&self, id: &str, value: serde_json::Value) {
        let mut ex = self.executions.lock().expect("session lock");
        if ex.len() == MAX_EXECUTIONS_KEPT {
            ex.pop_front();
        }
        ex.push_back((id.to_string(), value));
    }

    pub fn execution(&self, id: &str) -> Option<serde_json::Value> {
        self.executions
            .lock()
            .expect("session lock")
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, v)| v.clone())
    }

    /// Metadata as served by `GET session` and the management API.
    pub fn metadata(&self, cooldown: Duration) -> serde_json::Value {
        serde_json::json!({
            "identifier": self.identifier,
            "pool": self.pool,
            "created": self.created.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "lastAccessed": self.last_accessed().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "expires": self.expires_at(cooldown).to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "cooldownPeriodInSeconds": cooldown.as_secs(),
            "state": if self.is_attached() { "Running" } else { "Allocating" },
            "sandboxId": self.sandbox_id(),
        })
    }
}

pub struct CallGuard(Arc<Session>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_rule() {
        let t0 = Instant::now();
        let cd = Duration::from_secs(5);
        assert!(!is_expired(t0, 0, cd, t0 + Duration::from_secs(4)));
        assert!(is_expired(t0, 0, cd, t0 + Duration::from_secs(5)));
        // A call in progress keeps the session alive however long it runs.
        assert!(!is_expired(t0, 1, cd, t0 + Duration::from_secs(500)));
        // A clock reading before the last access never expires.
        assert!(!is_expired(t0 + Duration::from_secs(1), 0, cd, t0));
    }

    #[test]
    fn calls_reset_the_idle_timer() {
        let s = Session::new("py", "abcd");
        let later = Instant::now() + Duration::from_secs(10);
        assert!(s.is_idle_expired(Duration::from_secs(1), later));
        let guard = s.begin_call();
        assert!(!s.is_idle_expired(Duration::from_secs(1), later + Duration::from_secs(100)));
        drop(guard);
        assert!(!s.is_idle_expired(Duration::from_secs(5), Instant::now()));
        assert!(s.expires_at(Duration::from_secs(5)) > s.last_accessed());
    }

    #[test]
    fn executions_are_bounded() {
        let s = Session::new("py", "abcd");
        for i in 0..(MAX_EXECUTIONS_KEPT + 5) {
            s.record_execution(&i.to_string(), serde_json::json!(i));
        }
        assert!(s.execution("0").is_none());
        assert_eq!(s.execution("104"), Some(serde_json::json!(104)));
    }

    #[test]
    fn removed_sessions_refuse_sandboxes() {
        let s = Session::new("py", "abcd");
        assert!(s.take_sandbox().is_none());
        assert!(s.is_removed());
        assert!(!s.sandbox_alive());
    }
}
