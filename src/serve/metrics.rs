//! The server's counters, rendered for `GET /metrics` in Prometheus' text exposition format
//! (version 0.0.4): requests by endpoint and status, tokens, time to first token and tokens per
//! second as histograms, active sessions, queue depth, and per-hop compute and chain overhead.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds.
#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

const TTFT_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const TPS_BOUNDS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Histogram,
    tps: Histogram,
    active_sessions: u64,
    queued: u64,
    slots: u64,
    disconnects: u64,
    /// Per shard: (sum of median compute seconds per step, requests).
    hop_compute: BTreeMap<usize, (f64, u64)>,
    overhead: (f64, u64),
}

/// Thread-safe metrics; every method takes the lock briefly.
#[derive(Debug)]
pub struct Metrics(Mutex<Inner>);

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics(Mutex::new(Inner {
            requests: BTreeMap::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            ttft: Histogram::new(TTFT_BOUNDS),
            tps: Histogram::new(TPS_BOUNDS),
            active_sessions: 0,
            queued: 0,
            slots: 0,
            disconnects: 0,
            hop_compute: BTreeMap::new(),
            overhead: (0.0, 0),
        }))
    }
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// One answered request: `endpoint` is the route (`/v1/chat/completions`, or `other`).
    pub fn request(&self, endpoint: &str, status: u16) {
        self.with(|m| *m.requests.entry((endpoint.to_string(), status)).or_default() += 1);
    }

    pub fn queued(&self, delta: i64) {
        self.with(|m| m.queued = m.queued.saturating_add_signed(delta));
    }

    /// `--parallel`: how many generations may run at once.
    pub fn set_slots(&self, n: usize) {
        self.with(|m| m.slots = n as u64);
    }

    pub fn session(&self, delta: i64) {
        self.with(|m| m.active_sessions = m.active_sessions.saturating_add_signed(delta));
    }

    pub fn disconnect(&self) {
        self.with(|m| m.disconnects += 1);
    }

    /// A finished generation: its token counts, seconds to the first token, decode tokens per
    /// second, per-shard median compute ms per step, and the chain's overhead per hop in us.
    pub fn generation(
        &self,
        prompt: usize,
        completion: usize,
        ttft_s: f64,
        tps: Option<f64>,
        hop_ms: &[f64],
        overhead_us: f64,
    ) {
        self.with(|m| {
            m.prompt_tokens += prompt as u64;
            m.completion_tokens += completion as u64;
            m.ttft.observe(ttft_s);
            if let Some(t) = tps {
                m.tps.observe(t);
            }
            for (s, ms) in hop_ms.iter().enumerate() {
                let e = m.hop_compute.entry(s).or_default();
                e.0 += ms / 1e3;
                e.1 += 1;
            }
            if !hop_ms.is_empty() {
                m.overhead.0 += overhead_us / 1e6;
                m.overhead.1 += 1;
            }
        })
    }

    pub fn render(&self) -> String {
        self.with(|m| {
            let mut o = String::new();
            let _ = writeln!(o, "# HELP shardnet_http_requests_total HTTP requests answered, by endpoint and status.");
            let _ = writeln!(o, "# TYPE shardnet_http_requests_total counter");
            for ((e, s), n) in &m.requests {
                let _ = writeln!(o, "shardnet_http_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}");
            }
            let counter = |o: &mut String, name: &str, help: &str, v: u64| {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
            };
            let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            };
            counter(&mut o, "shardnet_prompt_tokens_total", "Prompt tokens processed.", m.prompt_tokens);
            counter(&mut o, "shardnet_completion_tokens_total", "Tokens generated.", m.completion_tokens);
            counter(&mut o, "shardnet_client_disconnects_total", "Generations ended because the client went away.", m.disconnects);
            m.ttft.render(&mut o, "shardnet_time_to_first_token_seconds", "From a request's start on the chain to its first token.");
            m.tps.render(&mut o, "shardnet_tokens_per_second", "Decode tokens per second of each generation.");
            gauge(&mut o, "shardnet_active_sessions", "Generations running on the chain (at most --parallel).", m.active_sessions);
            gauge(&mut o, "shardnet_queued_requests", "Requests waiting for a free slot.", m.queued);
            gauge(&mut o, "shardnet_parallel_slots", "Generations that may run at once (--parallel).", m.slots);
            let _ = writeln!(o, "# HELP shardnet_hop_compute_seconds Median compute per decode step on each hop, per request.");
            let _ = writeln!(o, "# TYPE shardnet_hop_compute_seconds summary");
            for (s, (sum, n)) in &m.hop_compute {
                let _ = writeln!(o, "shardnet_hop_compute_seconds_sum{{shard=\"{s}\"}} {sum}");
                let _ = writeln!(o, "shardnet_hop_compute_seconds_count{{shard=\"{s}\"}} {n}");
            }
            let _ = writeln!(o, "# HELP shardnet_chain_overhead_per_hop_seconds A decode step's time less the hops' compute, over the hops, per request.");
            let _ = writeln!(o, "# TYPE shardnet_chain_overhead_per_hop_seconds summary");
            let _ = writeln!(o, "shardnet_chain_overhead_per_hop_seconds_sum {}", m.overhead.0);
            let _ = writeln!(o, "shardnet_chain_overhead_per_hop_seconds_count {}", m.overhead.1);
            o
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_every_sample_is_a_family_member() {
        let m = Metrics::default();
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 200);
        m.generation(5, 3, 0.02, Some(40.0), &[1.0, 2.0], 300.0);
        let text = m.render();
        assert!(text.contains("shardnet_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"));
        assert!(text.contains("shardnet_time_to_first_token_seconds_bucket{le=\"0.01\"} 0"));
        assert!(text.contains("shardnet_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("shardnet_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains("shardnet_hop_compute_seconds_sum{shard=\"1\"} 0.002"));
        // Every sample line belongs to a family declared with # TYPE before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.iter().any(|d| name.starts_with(d.as_str())), "{line}");
            }
        }
    }
}
