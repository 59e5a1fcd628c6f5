//! Prometheus metrics: what an operator watches to size pools.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecLabels {
    pub pool: String,
    pub kind: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub code: String,
}

pub struct Metrics {
    registry: Registry,
    pub sessions_allocated: Family<PoolLabel, Gauge>,
    pub sessions_ready: Family<PoolLabel, Gauge>,
    pub allocations: Family<PoolLabel, Counter>,
    pub sandbox_start_failures: Family<PoolLabel, Counter>,
    pub sessions_expired: Family<PoolLabel, Counter>,
    pub executions: Family<ExecLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sessiond");
        let m = Metrics {
            registry: Registry::default(),
            sessions_allocated: Family::default(),
            sessions_ready: Family::default(),
            allocations: Family::default(),
            sandbox_start_failures: Family::default(),
            sessions_expired: Family::default(),
            executions: Family::default(),
            errors: Family::default(),
        };
        registry.register(
            "sessions_allocated",
            "Sessions currently bound to a sandbox",
            m.sessions_allocated.clone(),
        );
        registry.register(
            "sessions_ready",
            "Pre-warmed sandboxes waiting for a session",
            m.sessions_ready.clone(),
        );
        registry.register("allocations", "Sessions allocated", m.allocations.clone());
        registry.register(
            "sandbox_start_failures",
            "Sandboxes that failed to start or become ready",
            m.sandbox_start_failures.clone(),
        );
        registry.register(
            "sessions_expired",
            "Sessions destroyed after their cooldown",
            m.sessions_expired.clone(),
        );
        registry.register(
            "executions",
            "Code and shell executions",
            m.executions.clone(),
        );
        registry.register(
            "api_errors",
            "API error responses by code",
            m.errors.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn pool(pool: &str) -> PoolLabel {
        PoolLabel {
            pool: pool.to_string(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_up_in_the_text_format() {
        let m = Metrics::new();
        m.allocations.get_or_create(&Metrics::pool("py")).inc();
        m.sessions_ready.get_or_create(&Metrics::pool("py")).set(2);
        let text = m.encode();
        assert!(
            text.contains("sessiond_allocations_total{pool=\"py\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sessiond_sessions_ready{pool=\"py\"} 2"),
            "{text}"
        );
    }
}
