//! A backend with no runtime behind it, for tests of the runner: it copies
//! its first input to its output after spinning for a configurable time, and
//! can be told to fail in each way a real runtime can.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{
    Backend, BackendError, Device, ExecutionKind, ModelRef, PrepareOptions, Prepared, Probe, Tensor,
};

/// Settings of the mock backend (`backend_options.mock` in a suite).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MockOptions {
    /// Busy-wait per run, in microseconds (0: return at once).
    pub latency_us: f64,
    /// Multiplies the latency (1.1 = a 10% regression), for tests of the gate.
    pub slowdown: Option<f64>,
    /// Apply `slowdown` only to the model with this id.
    pub slowdown_model: Option<String>,
    /// Machine drift for tests of interleaved measurement: every run's
    /// latency is scaled by `1 + drift x sin(2 pi t / drift_period_ms)`, `t` the
    /// wall clock, so all workers see the same slow and fast phases.
    pub drift: f64,
    /// Period of the drift, ms (default 1000).
    pub drift_period_ms: Option<f64>,
    /// Added to every output value, to exercise the parity check.
    pub perturb: f64,
    /// Make the backend fail: `prepare`, `run`, `unsupported`, `panic`,
    /// `abort`, `hang`, `hang-later` (after 0.9 s of runs), `run-later`
    /// (runs fail after 0.3 s), `alloc`
    /// (allocates without bound).
    pub fail: Option<String>,
    /// Apply `fail` only to the model with this id.
    pub fail_model: Option<String>,
}

pub struct MockBackend {
    name: &'static str,
}

impl MockBackend {
    /// `name` lets tests register a second mock as a reference.
    pub fn new(name: &'static str) -> Self {
        Self { name }
    }
}

impl Backend for MockBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn execution_kind(&self) -> ExecutionKind {
        ExecutionKind::Mock
    }

    fn probe(&self, device: Device) -> Probe {
        match device {
            Device::Cpu => Probe::Available {
                version: env!("CARGO_PKG_VERSION").into(),
                detail: "mock backend for tests".into(),
            },
            Device::Cuda => Probe::Unavailable {
                reason: "mock backend has no GPU".into(),
            },
        }
    }

    fn prepare(
        &self,
        model: &ModelRef,
        options: &PrepareOptions,
    ) -> Result<Box<dyn Prepared>, BackendError> {
        let opts: MockOptions = if options.options.is_null() {
            MockOptions::default()
        } else {
            serde_json::from_value(options.options.clone())
                .map_err(|e| BackendError::Failed(format!("mock options: {e}")))?
        };
        let fail = match &opts.fail_model {
            Some(id) if *id != model.id => None,
            _ => opts.fail.as_deref(),
        };
        match fail {
            Some("prepare") => return Err(BackendError::Failed("mock prepare failure".into())),
            Some("unsupported") => {
                return Err(BackendError::Unsupported("op MockOp".into()));
            }
            Some("panic") => panic!("mock backend panicked on purpose"),
            Some("abort") => std::process::abort(),
            Some("alloc") => {
                // Grows without bound, touching every page.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 64 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => {}
        }
        let slowdown = match &opts.slowdown_model {
            Some(id) if *id != model.id => 1.0,
            _ => opts.slowdown.unwrap_or(1.0),
        };
        // A build-wide knob, so tests of `compare --rerun` can stand two
        // "builds" side by side: a wrapper script that sets it is the slow one.
        let build = std::env::var("HANDOFF_MOCK_BUILD_SLOWDOWN")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(1.0);
        let latency = Duration::from_secs_f64(opts.latency_us * slowdown * build / 1e6);
        Ok(Box::new(MockPrepared {
            latency,
            drift: (opts.drift, opts.drift_period_ms.unwrap_or(1000.0)),
            perturb: opts.perturb as f32,
            fail_run: fail == Some("run"),
            hang: fail == Some("hang"),
            hang_after: if fail == Some("hang-later") {
                Some(Duration::from_millis(900))
            } else {
                None
            },
            fail_after: if fail == Some("run-later") {
                Some(Duration::from_millis(300))
            } else {
                None
            },
            started: None,
            input: None,
            output: None,
        }))
    }
}

struct MockPrepared {
    latency: Duration,
    /// Amplitude and period (ms) of the shared drift.
    drift: (f64, f64),
    perturb: f32,
    fail_run: bool,
    hang: bool,
    /// `fail: hang-later`: hang once this long has passed since the first run.
    hang_after: Option<Duration>,
    /// `fail: run-later`: runs fail once this long has passed since the first.
    fail_after: Option<Duration>,
    started: Option<Instant>,
    input: Option<Tensor>,
    output: Option<Tensor>,
}

impl Prepared for MockPrepared {
    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError> {
        self.input = inputs.first().cloned();
        Ok(())
    }

    fn run(&mut self) -> Result<(), BackendError> {
        if self.fail_run {
            return Err(BackendError::Failed("mock run failure".into()));
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.fail_after.is_some_and(|d| started.elapsed() > d) {
            return Err(BackendError::Failed("mock run failure after 0.3 s".into()));
        }
        if self.hang || self.hang_after.is_some_and(|d| started.elapsed() > d) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if !self.latency.is_zero() {
            let start = Instant::now();
            let latency = if self.drift.0 == 0.0 {
                self.latency
            } else {
                let t_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64() * 1e3);
                let phase = 2.0 * std::f64::consts::PI * t_ms / self.drift.1;
                self.latency
                    .mul_f64((1.0 + self.drift.0 * phase.sin()).max(0.0))
            };
            while start.elapsed() < latency {
                std::hint::spin_loop();
            }
        }
        // Only the first run pays for the copy; the timed loop measures the
        // harness, not a memcpy.
        if self.output.is_none() {
            let mut out = self
                .input
                .clone()
                .ok_or_else(|| BackendError::Failed("no input bound".into()))?;
            out.name = "y".into();
            if let crate::TensorData::F32(v) = &mut out.data {
                v.iter_mut().for_each(|x| *x += self.perturb);
            }
            self.output = Some(out);
        }
        Ok(())
    }

    fn outputs(&mut self) -> Result<Vec<Tensor>, BackendError> {
        self.output
            .clone()
            .map(|t| vec![t])
            .ok_or_else(|| BackendError::Failed("run first".into()))
    }
}
