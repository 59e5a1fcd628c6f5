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

/// Past executions kept per session for `GET executions/{id}`, at most.
pub const MAX_EXECUTIONS_KEPT: usize = 100;
/// Bytes of stored execution results kept per session; the oldest go first.
pub const MAX_EXECUTION_BYTES_KEPT: usize = 8 << 20;
/// Largest single stored execution; a larger one is kept shortened.
pub const MAX_EXECUTION_RECORD_BYTES: usize = 2 << 20;
/// Appended to the stderr of a stored execution that had to be shortened.
pub const SHORTENED_MARKER: &str =
    "[sessiond: this stored copy of the execution was shortened to fit the per-session limit; the original answer had the full output]";

/// Past executions, serialized, with their total size.
#[derive(Default)]
struct Executions {
    kept: VecDeque<(String, bytes::Bytes)>,
    bytes: usize,
}

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
    executions: Mutex<Executions>,
    /// The agent runs one Python cell at a time; holding this while one
    /// runs keeps a queued execution's deadline from starting early.
    python_turn: tokio::sync::Mutex<()>,
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
            executions: Mutex::new(Executions::default()),
            python_turn: tokio::sync::Mutex::new(()),
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

    /// Waits until no other Python execution of this session is running.
    pub async fn python_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.python_turn.lock().await
    }

    /// Keeps an execution's answer for `GET executions/{id}`, within
    /// [`MAX_EXECUTIONS_KEPT`] and [`MAX_EXECUTION_BYTES_KEPT`] (oldest out).
    pub fn record_execution(&self, id: &str, value: serde_json::Value) {
        let bytes = bytes::Bytes::from(serialize_within(value, MAX_EXECUTION_RECORD_BYTES));
        let mut ex = self.executions.lock().expect("session lock");
        while !ex.kept.is_empty()
            && (ex.kept.len() >= MAX_EXECUTIONS_KEPT
                || ex.bytes + bytes.len() > MAX_EXECUTION_BYTES_KEPT)
        {
            if let Some((_, old)) = ex.kept.pop_front() {
                ex.bytes -= old.len();
            }
        }
        ex.bytes += bytes.len();
        ex.kept.push_back((id.to_string(), bytes));
    }

    /// A kept execution, as the JSON it was stored as.
    pub fn execution(&self, id: &str) -> Option<bytes::Bytes> {
        self.executions
            .lock()
            .expect("session lock")
            .kept
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

/// Serializes a stored execution in at most `max` bytes: figures go first,
/// then the output streams and the result are cut, with
/// [`SHORTENED_MARKER`] at the end of stderr.
fn serialize_within(mut value: serde_json::Value, max: usize) -> Vec<u8> {
    let bytes = serde_json::to_vec(&value).expect("JSON values serialize");
    if bytes.len() <= max {
        return bytes;
    }
    if let Some(result) = value.get_mut("result").and_then(|r| r.as_object_mut()) {
        result.remove("display");
        if result
            .get("executionResult")
            .is_some_and(|r| r.to_string().len() > max / 8)
        {
            result.insert("executionResult".into(), serde_json::json!(""));
        }
        for key in ["stdout", "stderr"] {
            if let Some(serde_json::Value::String(s)) = result.get_mut(key) {
                // A quarter each leaves room for escaping and the rest.
                let mut cut = (max / 8).min(s.len());
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
            }
        }
        let stderr = result
            .entry("stderr")
            .or_insert_with(|| serde_json::json!(""));
        if let serde_json::Value::String(s) = stderr {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(SHORTENED_MARKER);
        }
    }
    let bytes = serde_json::to_vec(&value).expect("JSON values serialize");
    if bytes.len() <= max {
        return bytes;
    }
    // Still too big (huge fields elsewhere): keep only the summary.
    let keep = |k: &str| {
        value
            .get(k)
            .filter(|v| v.to_string().len() <= 1024)
            .cloned()
    };
    serde_json::to_vec(&serde_json::json!({
        "id": keep("id"),
        "identifier": keep("identifier"),
        "executionType": keep("executionType"),
        "status": keep("status"),
        "result": {"stdout": "", "stderr": SHORTENED_MARKER, "executionResult": ""},
    }))
    .expect("JSON values serialize")
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

    fn stored(s: &Session, id: &str) -> Option<serde_json::Value> {
        s.execution(id).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn executions_are_bounded_by_count() {
        let s = Session::new("py", "abcd");
        for i in 0..(MAX_EXECUTIONS_KEPT + 5) {
            s.record_execution(&i.to_string(), serde_json::json!(i));
        }
        assert!(s.execution("0").is_none());
        assert_eq!(stored(&s, "104"), Some(serde_json::json!(104)));
    }

    fn execution(id: &str, stdout_bytes: usize, figures: usize) -> serde_json::Value {
        serde_json::json!({
            "id": id,
            "identifier": "abcd",
            "executionType": "Synchronous",
            "status": "Succeeded",
            "result": {
                "stdout": "o".repeat(stdout_bytes),
                "stderr": "",
                "executionResult": 1,
                "display": vec![serde_json::json!({"base64_data": "A".repeat(1 << 20)}); figures],
            }
        })
    }

    #[test]
    fn executions_are_bounded_by_bytes() {
        let s = Session::new("py", "abcd");
        // Large answers (1 MiB of stdout and 2 MiB of figures each) must
        // not be kept whole, nor more of them than the byte budget holds.
        for i in 0..40 {
            s.record_execution(&i.to_string(), execution(&i.to_string(), 1 << 20, 2));
        }
        let kept = s.executions.lock().unwrap().bytes;
        assert!(kept <= MAX_EXECUTION_BYTES_KEPT, "{kept}");
        assert!(s.execution("0").is_none());
        let last = stored(&s, "39").unwrap();
        assert_eq!(last["status"], "Succeeded");
        assert!(last["result"].get("display").is_none());
        assert!(last["result"]["stderr"]
            .as_str()
            .unwrap()
            .ends_with(SHORTENED_MARKER));
        assert_eq!(last["result"]["executionResult"], 1);
        // Small answers are kept whole.
        s.record_execution("small", execution("small", 10, 1));
        assert_eq!(stored(&s, "small"), Some(execution("small", 10, 1)));
        let total: usize = s
            .executions
            .lock()
            .unwrap()
            .kept
            .iter()
            .map(|(_, b)| b.len())
            .sum();
        assert_eq!(total, s.executions.lock().unwrap().bytes);
    }

    #[test]
    fn oversized_records_without_a_result_object_become_a_summary() {
        let s = Session::new("py", "abcd");
        s.record_execution(
            "x",
            serde_json::json!({"id": "x", "status": "Failed", "result": "r".repeat(4 << 20)}),
        );
        let v = stored(&s, "x").unwrap();
        assert_eq!(v["id"], "x");
        assert_eq!(v["status"], "Failed");
        assert_eq!(v["result"]["stderr"], SHORTENED_MARKER);
    }

    #[test]
    fn removed_sessions_refuse_sandboxes() {
        let s = Session::new("py", "abcd");
        assert!(s.take_sandbox().is_none());
        assert!(s.is_removed());
        assert!(!s.sandbox_alive());
    }
}
