//! The backends this build has: the one place a backend joins handoff.
//!
//! A runtime family is a cargo feature of this crate (`ort`, `tract`,
//! `candle`; default all). One left out of the build keeps its name as a
//! [`NotBuilt`] entry, so suites that name it still validate and its cases
//! are `unavailable` cells naming the feature.

use std::sync::Arc;

use handoff_backend::{Backend, Registry};
use handoff_suite::{PlanOptions, Preparation};

use handoff_prepare as tools;

/// Registers `$backend` when `$feature` is on, else a [`NotBuilt`] of that
/// name and kind.
macro_rules! backend {
    ($feature:literal, $name:literal, $kind:expr, $backend:expr) => {{
        #[cfg(feature = $feature)]
        let b: Box<dyn Backend> = Box::new($backend);
        #[cfg(not(feature = $feature))]
        let b: Box<dyn Backend> = Box::new(handoff_backend::NotBuilt {
            name: $name,
            kind: $kind,
            feature: $feature,
        });
        b
    }};
}

pub fn registry() -> Registry {
    Registry::new()
        .with(backend!(
            "ort",
            "ort",
            handoff_backend::ExecutionKind::OptimisedGraph,
            handoff_ort::OrtBackend
        ))
        .with(backend!(
            "tract",
            "tract",
            handoff_backend::ExecutionKind::OptimisedGraph,
            handoff_tract::TractBackend
        ))
        .with(backend!(
            "candle",
            "candle-onnx",
            handoff_backend::ExecutionKind::Interpreter,
            handoff_candle::CandleOnnxBackend
        ))
        .with(backend!(
            "candle",
            "candle-native",
            handoff_backend::ExecutionKind::Native,
            handoff_candle::CandleNativeBackend
        ))
        .with(Box::new(handoff_python::PythonOrtBackend))
        .with(Box::new(handoff_python::torch::PythonTorchBackend))
        .with(Box::new(handoff_backend::mock::MockBackend::new("mock")))
        .with(Box::new(handoff_backend::mock::MockBackend::new(
            "mock-ref",
        )))
}

/// Parses a backend name: one the registry has (help lists them).
pub fn name_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(registry().names().into_iter().map(|n| {
        // The runner's test doubles are accepted but not advertised.
        clap::builder::PossibleValue::new(n).hide(n.starts_with("mock"))
    }))
}

/// Where the plan's models are cached, which backends exist, the
/// conversion and quantisation tools materialising a plan uses, and
/// whether it may use them.
pub fn plan_options(registry: &Arc<Registry>, preparation: Preparation) -> PlanOptions {
    let model_cache = handoff_backend::home::model_cache_dir();
    PlanOptions {
        model_cache: model_cache.clone(),
        known_backends: registry.names().into_iter().map(str::to_owned).collect(),
        tools: Some(Arc::new(tools::Tools {
            registry: Arc::clone(registry),
            model_cache,
            ensure_ort: || ensure_ort(false),
        })),
        preparation,
    }
}

/// Fetches libonnxruntime if no library can be found; on failure the ort
/// cells will say why, and other backends still run.
pub fn ensure_ort(quiet: bool) {
    #[cfg(feature = "ort")]
    {
        if handoff_ort::provision::locate().is_ok() {
            return;
        }
        if !quiet {
            crate::out::errln!(
                "libonnxruntime not found; fetching onnxruntime=={} from PyPI…",
                handoff_ort::provision::PINNED_VERSION
            );
        }
        if let Err(e) = handoff_ort::provision::fetch() {
            crate::out::errln!("warning: {e}; ort cells will be `unavailable`");
        }
    }
    #[cfg(not(feature = "ort"))]
    let _ = quiet;
}

/// Creates the Python baseline's environment (pinned packages from PyPI,
/// as `handoff setup` does) if it is not there; on failure its cells say
/// why, and other backends still run.
pub fn ensure_python(quiet: bool) {
    if handoff_python::interpreter().is_ok() {
        return;
    }
    if !quiet {
        crate::out::errln!(
            "the Python baseline's environment is not set up; creating it from PyPI ({})…",
            handoff_python::PYTHON_ORT_PACKAGES.join(" ")
        );
    }
    if let Err(e) = handoff_python::setup() {
        crate::out::errln!("warning: {e}; python-onnxruntime cells will be `unavailable`");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_backend_has_a_name_in_every_build() {
        // A build without a feature keeps the names (as unavailable cells),
        // so one suite validates on every build.
        let names = super::registry().names();
        for n in [
            "ort",
            "tract",
            "candle-onnx",
            "candle-native",
            "python-onnxruntime",
            "python-torch",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
    }

    /// Every suite shipped in `suites/` is valid as it stands against this
    /// build's backends (described, not prepared: nothing is downloaded).
    #[test]
    fn every_shipped_suite_validates() {
        let dir = tempfile::tempdir().unwrap();
        let options = handoff_suite::PlanOptions {
            model_cache: dir.path().join("cache"),
            known_backends: super::registry()
                .names()
                .into_iter()
                .map(String::from)
                .collect(),
            tools: None,
            preparation: handoff_suite::Preparation::Describe,
        };
        let suites = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../suites");
        let mut seen = 0;
        for entry in std::fs::read_dir(&suites).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                if let Err(e) = handoff_suite::Plan::from_file(&path, &options) {
                    panic!("{}: {e}", path.display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 10, "{seen} suites in {}", suites.display());
    }
}
