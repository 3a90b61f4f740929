//! How queries reach the model, in MLPerf LoadGen's terms: one at a time
//! (`single-stream`), everything at once (`offline`), several closed-loop
//! streams sharing the machine (`multi-stream`), Poisson arrivals at a target
//! rate (`server`, in-process) and the same load over HTTP on loopback
//! against a server process (`http`: `handoff serve` or, for
//! `python-onnxruntime`, a FastAPI service).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;

/// A scenario as written: `single-stream`, `offline`, or a map with one key.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum RawScenario {
    /// One query at a time, each waiting for the previous (the default).
    SingleStream,
    /// All items at the model's largest batch size; throughput is the figure.
    Offline,
    /// `multi-stream` or `{multi-stream: {streams: [2, 4], duration: 5s}}`:
    /// closed-loop streams
    /// in threads of one process, each with its own session.
    MultiStream(RawMultiStream),
    /// `{server: {qps: [10, 20], peak_p99: 100ms}}`: Poisson arrivals
    /// (open loop) served one at a time in-process; latency includes the
    /// time a query waited.
    Server(RawLoad),
    /// `{http: {...}}`: as `server`, but each request goes over loopback
    /// HTTP to a server process that loaded the model at start-up
    /// (`handoff serve`; FastAPI for `python-onnxruntime`). Needs a text model.
    Http(RawLoad),
}

const SCENARIO_NAMES: &[&str] = &["single-stream", "offline", "multi-stream", "server", "http"];

/// By hand: YAML maps `{server: {...}}` to an externally tagged enum only
/// through `!server` tags, which nobody writes.
impl<'de> Deserialize<'de> for RawScenario {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawScenario;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a scenario: `single-stream`, `offline`, or a map with one key (`multi-stream`, `server`, `http`)",
                )
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawScenario, E> {
                match v {
                    "single-stream" => Ok(RawScenario::SingleStream),
                    "offline" => Ok(RawScenario::Offline),
                    "multi-stream" => Ok(RawScenario::MultiStream(RawMultiStream::default())),
                    "server" | "http" => Err(E::custom(format!(
                        "`{v}` needs settings: `{{{v}: {{qps: [10, 20]}}}}` or `{{{v}: {{peak_p99: 100ms}}}}`"
                    ))),
                    other => Err(E::unknown_variant(other, SCENARIO_NAMES)),
                }
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawScenario, A::Error> {
                use serde::de::Error;
                let key: String = map
                    .next_key()?
                    .ok_or_else(|| A::Error::custom("an empty map is not a scenario"))?;
                let value = match key.as_str() {
                    "multi-stream" => RawScenario::MultiStream(map.next_value()?),
                    "server" => RawScenario::Server(map.next_value()?),
                    "http" => RawScenario::Http(map.next_value()?),
                    "single-stream" | "offline" => {
                        return Err(A::Error::custom(format!(
                            "`{key}` takes no settings: write it as a plain `- {key}`"
                        )));
                    }
                    other => return Err(A::Error::unknown_variant(other, SCENARIO_NAMES)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(A::Error::custom(format!(
                        "one scenario per list item: `{extra}` goes in an item of its own"
                    )));
                }
                Ok(value)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMultiStream {
    /// Numbers of concurrent streams (default `[2]`).
    #[serde(default)]
    pub streams: Option<Vec<u32>>,
    /// How long the streams run (default 5s).
    #[serde(default)]
    pub duration: Option<HumanDuration>,
    /// Only these of the suite's backends (default: all).
    #[serde(default)]
    pub backends: Option<Vec<String>>,
    /// Only these thread counts (default: all).
    #[serde(default)]
    pub threads: Option<Vec<u32>>,
    /// Only these batch sizes (default: all).
    #[serde(default)]
    pub batch: Option<Vec<u32>>,
}

/// An open-loop load: fixed rates, a search for the peak rate, or both.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLoad {
    /// Target rates in queries per second, one case each.
    #[serde(default)]
    pub qps: Option<Vec<f64>>,
    /// Also search for the highest rate whose p99 latency stays under this
    /// bound (one more case, `@peak`).
    #[serde(default)]
    pub peak_p99: Option<HumanDuration>,
    /// Length of each fixed-rate run (default 10s); the peak search runs
    /// each step for a third of it (at least 2s).
    #[serde(default)]
    pub duration: Option<HumanDuration>,
    /// At least this many queries per run, so p99 rests on enough samples
    /// (default 200; the run lasts longer at low rates).
    #[serde(default)]
    pub min_queries: Option<u32>,
    /// Only these of the suite's backends (default: all).
    #[serde(default)]
    pub backends: Option<Vec<String>>,
    /// Only these thread counts (default: all).
    #[serde(default)]
    pub threads: Option<Vec<u32>>,
    /// Only these batch sizes (default: all).
    #[serde(default)]
    pub batch: Option<Vec<u32>>,
    /// `http` only: what each request asks. `embed` (default): `POST
    /// /embed {"texts": [batch texts]}` -> the last output per text.
    /// `predict`: `POST /predict {"text": "..."}` -> `{"label", "score"}`,
    /// a classifier served as a transformers text-classification pipeline
    /// is (python-torch: the pipeline itself behind FastAPI); batch 1.
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// `http` only: dynamic batching in `handoff serve` (`--batch-wait-ms`):
    /// after a request the model thread waits up to this long for more and
    /// runs them as one batch. The FastAPI services have none: their cells
    /// say so.
    #[serde(default)]
    pub batch_wait: Option<HumanDuration>,
    /// Also load these precision variants of the model (from its
    /// `variants:`), e.g. `[int8-dynamic]`: the hand-off served with its
    /// int8 build, beside the fp32 servers. Default: none; a variant
    /// otherwise runs single-stream only.
    #[serde(default)]
    pub variants: Option<Vec<String>>,
}

/// What an `http` request asks the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
    #[default]
    Embed,
    Predict,
}

impl Endpoint {
    pub fn is_embed(&self) -> bool {
        *self == Endpoint::Embed
    }

    /// The request path.
    pub fn path(&self) -> &'static str {
        match self {
            Endpoint::Embed => "/embed",
            Endpoint::Predict => "/predict",
        }
    }
}

/// Limits a scenario to some of the suite's settings.
struct RawOnly<'a> {
    backends: &'a Option<Vec<String>>,
    threads: &'a Option<Vec<u32>>,
    batch: &'a Option<Vec<u32>>,
}

macro_rules! only {
    ($r:expr) => {
        RawOnly {
            backends: &$r.backends,
            threads: &$r.threads,
            batch: &$r.batch,
        }
    };
}

/// A validated scenario of one case.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Scenario {
    #[default]
    SingleStream,
    Offline,
    MultiStream {
        streams: u32,
        duration: Duration,
    },
    Server {
        load: Load,
    },
    Http {
        load: Load,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub target: LoadTarget,
    pub duration: Duration,
    pub min_queries: u32,
    #[serde(default, skip_serializing_if = "Endpoint::is_embed")]
    pub endpoint: Endpoint,
    /// `http`: the server's dynamic-batching wait (none: each request alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_wait: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadTarget {
    Qps(f64),
    /// The highest rate whose p99 stays under the bound.
    Peak {
        p99: Duration,
    },
}

impl Scenario {
    /// The name in results (`scenario` field) and reports.
    pub fn label(&self) -> String {
        match self {
            Scenario::SingleStream => "single-stream".into(),
            Scenario::Offline => "offline".into(),
            Scenario::MultiStream { streams, .. } => format!("multi-stream x{streams}"),
            Scenario::Server { load } => format!("server {}", load.target.label()),
            Scenario::Http { load } if load.endpoint == Endpoint::Predict => {
                format!("http predict {}{}", load.target.label(), load.wait_label())
            }
            Scenario::Http { load } => format!("http {}{}", load.target.label(), load.wait_label()),
        }
    }

    /// What the case id gets appended (`/server@20qps`); none for
    /// single-stream, so ids of older runs still match in `compare`.
    pub fn id_suffix(&self) -> Option<String> {
        match self {
            Scenario::SingleStream => None,
            Scenario::Offline => Some("offline".into()),
            Scenario::MultiStream { streams, .. } => Some(format!("multi-stream@{streams}")),
            Scenario::Server { load } => Some(format!("server@{}", load.target.id())),
            Scenario::Http { load } if load.endpoint == Endpoint::Predict => Some(format!(
                "http-predict@{}{}",
                load.target.id(),
                load.wait_id()
            )),
            Scenario::Http { load } => Some(format!("http@{}{}", load.target.id(), load.wait_id())),
        }
    }

    pub fn load(&self) -> Option<&Load> {
        match self {
            Scenario::Server { load } | Scenario::Http { load } => Some(load),
            _ => None,
        }
    }
}

impl Load {
    /// `+wait5ms` for a batching server, for case ids.
    fn wait_id(&self) -> String {
        self.batch_wait.map_or_else(String::new, |d| {
            format!("+wait{}ms", trim_float(d.as_secs_f64() * 1e3))
        })
    }

    fn wait_label(&self) -> String {
        self.batch_wait.map_or_else(String::new, |d| {
            format!(", batch wait {} ms", trim_float(d.as_secs_f64() * 1e3))
        })
    }
}

impl LoadTarget {
    fn id(&self) -> String {
        match self {
            LoadTarget::Qps(q) => format!("{}qps", trim_float(*q)),
            LoadTarget::Peak { p99 } => format!("peak-p99-{}ms", p99.as_millis()),
        }
    }

    pub fn label(&self) -> String {
        match self {
            LoadTarget::Qps(q) => format!("{} QPS", trim_float(*q)),
            LoadTarget::Peak { p99 } => format!("peak (p99 <= {} ms)", p99.as_millis()),
        }
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A scenario with the settings it is limited to.
#[derive(Debug, Clone)]
pub struct ScenarioSpec {
    pub scenario: Scenario,
    pub backends: Option<Vec<String>>,
    pub threads: Option<Vec<u32>>,
    pub batch: Option<Vec<u32>>,
    /// Precision variants of the model this load scenario also runs on.
    pub variants: Vec<String>,
}

impl ScenarioSpec {
    pub fn single_stream() -> Self {
        Self {
            scenario: Scenario::SingleStream,
            backends: None,
            threads: None,
            batch: None,
            variants: Vec::new(),
        }
    }

    /// Whether a precision variant of the model (`None`: the model itself)
    /// runs this scenario: single-stream and offline always, a load
    /// scenario only when it lists the variant.
    pub fn runs_variant(&self, variant: Option<&str>) -> bool {
        match variant {
            None => true,
            Some(v) => {
                matches!(self.scenario, Scenario::SingleStream | Scenario::Offline)
                    || self.variants.iter().any(|x| x == v)
            }
        }
    }

    pub fn allows(&self, backend: &str, threads: u32, batch: u32) -> bool {
        self.backends
            .as_ref()
            .is_none_or(|b| b.iter().any(|x| x == backend))
            && self.threads.as_ref().is_none_or(|t| t.contains(&threads))
            && self.batch.as_ref().is_none_or(|b| b.contains(&batch))
    }
}

/// Validates raw scenarios; `err(path, message)` records a problem.
pub fn build_scenarios(
    raw: &[RawScenario],
    path: &str,
    backends: &[String],
    err: &mut dyn FnMut(String, String),
) -> Vec<ScenarioSpec> {
    if raw.is_empty() {
        err(path.to_owned(), "must list at least one scenario".into());
    }
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let spec = |scenario, only: &RawOnly<'_>| ScenarioSpec {
            scenario,
            backends: only.backends.clone(),
            threads: only.threads.clone(),
            batch: only.batch.clone(),
            variants: Vec::new(),
        };
        match r {
            RawScenario::SingleStream => out.push(ScenarioSpec::single_stream()),
            RawScenario::Offline => out.push(ScenarioSpec {
                scenario: Scenario::Offline,
                ..ScenarioSpec::single_stream()
            }),
            RawScenario::MultiStream(m) => {
                let p = format!("{p}.multi-stream");
                check_only(&only!(m), &p, backends, err);
                let duration = m.duration.map_or(Duration::from_secs(5), |d| d.0);
                if duration < Duration::from_millis(100) {
                    err(format!("{p}.duration"), "must be at least 100ms".into());
                }
                let streams = m.streams.clone().unwrap_or_else(|| vec![2]);
                if streams.is_empty() || streams.iter().any(|s| *s < 1 || *s > 256) {
                    err(
                        format!("{p}.streams"),
                        "must list stream counts from 1 to 256".into(),
                    );
                }
                for s in streams {
                    out.push(spec(
                        Scenario::MultiStream {
                            streams: s,
                            duration,
                        },
                        &only!(m),
                    ));
                }
            }
            RawScenario::Server(l) | RawScenario::Http(l) => {
                let http = matches!(r, RawScenario::Http(_));
                let p = format!("{p}.{}", if http { "http" } else { "server" });
                check_only(&only!(l), &p, backends, err);
                let duration = l.duration.map_or(Duration::from_secs(10), |d| d.0);
                if duration < Duration::from_millis(500) {
                    err(format!("{p}.duration"), "must be at least 500ms".into());
                }
                let min_queries = l.min_queries.unwrap_or(200);
                if min_queries == 0 {
                    err(format!("{p}.min_queries"), "must be at least 1".into());
                }
                let endpoint = l.endpoint.unwrap_or_default();
                if !http && l.endpoint.is_some() {
                    err(
                        format!("{p}.endpoint"),
                        "only `http` scenarios have an endpoint".into(),
                    );
                }
                let batch_wait = l.batch_wait.map(|d| d.0).filter(|d| !d.is_zero());
                if !http && l.batch_wait.is_some() {
                    err(
                        format!("{p}.batch_wait"),
                        "only `http` scenarios have a server to batch in".into(),
                    );
                }
                if batch_wait.is_some_and(|d| d > Duration::from_secs(1)) {
                    err(
                        format!("{p}.batch_wait"),
                        "must be at most 1s (every request waits up to this long)".into(),
                    );
                }
                // One text per /predict request: batch 1 only.
                let predict_batch = Some(vec![1]);
                if endpoint == Endpoint::Predict
                    && l.batch.as_ref().is_some_and(|b| b.iter().any(|v| *v != 1))
                {
                    err(
                        format!("{p}.batch"),
                        "`endpoint: predict` sends one text per request: batch must be [1]".into(),
                    );
                }
                let mut targets = Vec::new();
                for (j, q) in l.qps.iter().flatten().enumerate() {
                    if !(q.is_finite() && *q > 0.0 && *q <= 100_000.0) {
                        err(
                            format!("{p}.qps[{j}]"),
                            "must be a rate above 0 and at most 100000 queries/s".into(),
                        );
                    } else {
                        targets.push(LoadTarget::Qps(*q));
                    }
                }
                if let Some(b) = l.peak_p99 {
                    if b.0 < Duration::from_millis(1) {
                        err(format!("{p}.peak_p99"), "must be at least 1ms".into());
                    }
                    targets.push(LoadTarget::Peak { p99: b.0 });
                }
                if l.qps.is_none() && l.peak_p99.is_none() {
                    err(
                        p.clone(),
                        "give `qps: [..]` (fixed rates), `peak_p99: <bound>` (search for the peak rate), or both".into(),
                    );
                }
                for target in targets {
                    let load = Load {
                        target,
                        duration,
                        min_queries,
                        endpoint,
                        batch_wait,
                    };
                    let scenario = if http {
                        Scenario::Http { load }
                    } else {
                        Scenario::Server { load }
                    };
                    let only = RawOnly {
                        backends: &l.backends,
                        threads: &l.threads,
                        batch: if endpoint == Endpoint::Predict {
                            &predict_batch
                        } else {
                            &l.batch
                        },
                    };
                    out.push(ScenarioSpec {
                        variants: l.variants.clone().unwrap_or_default(),
                        ..spec(scenario, &only)
                    });
                }
            }
        }
    }
    out
}

fn check_only(
    only: &RawOnly<'_>,
    p: &str,
    backends: &[String],
    err: &mut dyn FnMut(String, String),
) {
    if let Some(b) = only.backends {
        for (j, name) in b.iter().enumerate() {
            if !backends.contains(name) {
                err(
                    format!("{p}.backends[{j}]"),
                    format!("`{name}` is not among the suite's backends"),
                );
            }
        }
    }
    for (key, v) in [("threads", only.threads), ("batch", only.batch)] {
        if v.as_ref().is_some_and(|v| v.is_empty() || v.contains(&0)) {
            err(
                format!("{p}.{key}"),
                "must list values of at least 1".into(),
            );
        }
    }
}
