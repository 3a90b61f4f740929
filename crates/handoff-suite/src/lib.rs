//! The suite format: YAML parsed into raw serde types ([`raw`]), validated
//! into a [`Plan`] (the only place suite errors come from), and expanded
//! into [`Case`]s in a documented, deterministic order.
//!
//! Expansion order (outermost first): model, device, batch, the model's
//! symbolic dims (by name), scenario, backend, threads. Cases that share a model,
//! batch and dims are adjacent, so their reference outputs are computed once
//! and results diff cleanly between runs.

pub mod ab;
pub mod duration;
pub mod error;
pub mod expected;
pub mod init;
pub mod locate;
pub mod plan;
pub mod random;
pub mod raw;
pub mod scenario;
pub mod shapes;
pub mod text;

pub use duration::HumanDuration;
pub use error::SuiteError;
pub use plan::{
    Case, Check, Isolation, Lowered, Measure, ModelTools, Plan, PlanModel, PlanOptions,
    Preparation, ToolError, Variant, VariantInfo,
};
pub use scenario::{Endpoint, Load, LoadTarget, Scenario, ScenarioSpec};
