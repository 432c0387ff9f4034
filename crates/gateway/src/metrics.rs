//! Counters for Prometheus: tokens, cost, errors and streams in flight, per provider and model.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::backend::UsageRecord;

#[derive(Debug, Default, Clone, Copy)]
struct ModelStats {
    requests: u64,
    errors: u64,
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
    cost_micros: u64,
    /// From the request's arrival to its response's end.
    latency_micros: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    in_flight: AtomicI64,
    refused: AtomicU64,
    overhead_micros: AtomicU64,
    overhead_count: AtomicU64,
    /// Per account, provider and model.
    models: Mutex<BTreeMap<(String, String, String), ModelStats>>,
}

impl Metrics {
    pub(crate) fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request the gateway answered itself (bad input, limits, no credit).
    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn overhead(&self, micros: u64) {
        self.overhead_micros.fetch_add(micros, Ordering::Relaxed);
        self.overhead_count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finished(&self, r: &UsageRecord, broken: bool, took: std::time::Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        let s = models
            .entry((
                r.caller.account_id.clone(),
                r.provider.clone(),
                r.model.clone(),
            ))
            .or_default();
        s.latency_micros += took.as_micros() as u64;
        s.requests += 1;
        s.errors += u64::from(broken || r.status >= 400);
        s.input += r.usage.input;
        s.output += r.usage.output;
        s.cache_read += r.usage.cache_read;
        s.cache_write += r.usage.cache_write;
        s.cost_micros += r.cost_micros;
    }

    /// The counters in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# TYPE nook_gateway_in_flight gauge\nnook_gateway_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE nook_gateway_refused_total counter\nnook_gateway_refused_total {}",
            self.refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE nook_gateway_overhead_seconds summary\nnook_gateway_overhead_seconds_sum {}\nnook_gateway_overhead_seconds_count {}",
            self.overhead_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.overhead_count.load(Ordering::Relaxed)
        );
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        let series: [Series; 8] = [
            ("nook_gateway_requests_total", "", |s| s.requests),
            ("nook_gateway_errors_total", "", |s| s.errors),
            ("nook_gateway_tokens_total", "input", |s| s.input),
            ("nook_gateway_tokens_total", "output", |s| s.output),
            ("nook_gateway_tokens_total", "cache_read", |s| s.cache_read),
            ("nook_gateway_tokens_total", "cache_write", |s| {
                s.cache_write
            }),
            ("nook_gateway_cost_micro_dollars_total", "", |s| {
                s.cost_micros
            }),
            ("nook_gateway_latency_micros_total", "", |s| {
                s.latency_micros
            }),
        ];
        let mut typed = std::collections::HashSet::new();
        for (name, kind, get) in series {
            if typed.insert(name) {
                let _ = writeln!(out, "# TYPE {name} counter");
            }
            for ((account, provider, model), s) in models.iter() {
                let kind = if kind.is_empty() {
                    String::new()
                } else {
                    format!(",kind=\"{kind}\"")
                };
                let _ = writeln!(
                    out,
                    "{name}{{account=\"{}\",provider=\"{}\",model=\"{}\"{kind}}} {}",
                    label(account),
                    label(provider),
                    label(model),
                    get(s)
                );
            }
        }
        out
    }
}

/// A metric name, its `kind` label (or none) and how to read it.
type Series = (&'static str, &'static str, fn(&ModelStats) -> u64);

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
