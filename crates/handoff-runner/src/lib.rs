//! Runs a [`Plan`](handoff_suite::Plan): each case is measured (in a child
//! process by default) with warm-up and a stopping rule, its outputs are
//! checked against a reference backend, and one JSON line per case is
//! appended and flushed to `results.jsonl` as soon as it is known.

pub mod avx_sse;
pub mod http_case;
pub mod isolate;
pub mod machine;
pub mod measure;
pub mod rounds;
pub mod run;
pub mod subnormal;
pub mod worker;

// The results format lives in handoff-results; these paths stay for the
// runner's callers.
pub use handoff_results::{pairs, record};

pub use http_case::{Launch, ServerLauncher, ServerSpec};
pub use pairs::{Comparison, read_comparisons};
pub use record::{Accuracy, LoadStats, ResultRecord, Status, read_results};
pub use rounds::{CanaryPoint, RoundsInfo};
pub use run::{FlopCounter, Observer, Quiet, RunError, RunOptions, RunSummary, Runner};
pub use worker::{Job, JobMode, WorkerReport, execute_job};
