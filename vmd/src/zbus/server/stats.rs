//! What the server counts of the calls it answers, for the OpenMetrics
//! endpoint: calls by method and outcome, their latency, changes in flight.
//!
//! Recording is on the path of every call (a quick read is ~100 µs end to
//! end): a read lock and a hash of the labels, a few atomic adds. Only known
//! methods get a label of their own, so a caller cannot grow the series.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::super::wire::Response;

/// How a call ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Answered without an error.
    Ok,
    /// Answered with the method's error (what a Go caller gets as `error`).
    Error,
    /// Answered with a protocol error (unknown method, malformed arguments).
    ProtocolError,
    /// Refused at once: too many changes in flight.
    Refused,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::ProtocolError => "protocol_error",
            Outcome::Refused => "refused",
        }
    }

    pub fn of(response: &Response) -> Self {
        if response.error.is_some() {
            Outcome::ProtocolError
        } else if response.output.error.is_some() {
            Outcome::Error
        } else {
            Outcome::Ok
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

/// The label of a method nobody serves.
pub const UNKNOWN_METHOD: &str = "unknown";

fn latency_histogram() -> Histogram {
    // 50 µs to 60 s: a quick read is ~0.1 ms, a graceful Delete up to the
    // guest's grace period.
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Shared by the server (which records) and the endpoint (which reads).
#[derive(Debug, Clone)]
pub struct CallStats {
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabel, Histogram, fn() -> Histogram>,
    changes_in_flight: Gauge,
}

impl Default for CallStats {
    fn default() -> Self {
        CallStats {
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            changes_in_flight: Gauge::default(),
        }
    }
}

impl CallStats {
    /// A call answered after `secs`; `method`: `None` for a method nobody
    /// serves (one label for all of them).
    pub fn record(&self, method: Option<&str>, outcome: Outcome, secs: f64) {
        let method = method.unwrap_or(UNKNOWN_METHOD).to_owned();
        self.latency
            .get_or_create(&MethodLabel {
                method: method.clone(),
            })
            .observe(secs);
        self.calls
            .get_or_create(&CallLabels { method, outcome })
            .inc();
    }

    /// Counts a change from its slot to its reply.
    pub fn change_started(&self) -> ChangeInFlight<'_> {
        self.changes_in_flight.inc();
        ChangeInFlight(&self.changes_in_flight)
    }

    /// Adds these families to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vmd_zbus_calls",
            "zbus calls answered, by method and outcome",
            self.calls.clone(),
        );
        registry.register_with_unit(
            "vmd_zbus_call_duration",
            "Time from taking a zbus request to its reply",
            Unit::Seconds,
            self.latency.clone(),
        );
        registry.register(
            "vmd_zbus_changes_in_flight",
            "Changes (Run, Delete, Lock, StreamCreate, StreamDelete) taken and not yet answered",
            self.changes_in_flight.clone(),
        );
    }
}

pub struct ChangeInFlight<'a>(&'a Gauge);

impl Drop for ChangeInFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
