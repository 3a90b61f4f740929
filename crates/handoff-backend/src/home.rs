//! Where handoff keeps what it downloads and builds: the runtime library,
//! Python environments (the cache) and fetched or converted models (the
//! model cache).
//!
//! In order:
//! 1. `HANDOFF_CACHE` / `HANDOFF_MODEL_CACHE`, each for its own directory;
//! 2. `HANDOFF_HOME`: `$HANDOFF_HOME/.cache` and `$HANDOFF_HOME/models/cache`;
//! 3. a binary that lives inside the source tree it was built from
//!    (`target/release/handoff` of a clone): that tree's `.cache` and
//!    `models/cache`, so a clone keeps everything in one place;
//! 4. an installed binary (`cargo install`, copied elsewhere):
//!    `$XDG_CACHE_HOME/handoff` (else `~/.cache/handoff`) and its `models/`.

use std::path::{Path, PathBuf};

/// The source tree this code was compiled from, when the running binary is
/// inside it. Decided once per process: a `cargo build` that replaces the
/// binary during a run leaves Linux naming it `handoff (deleted)`, and a
/// later answer would move the cache out of the clone mid-run.
fn source_tree() -> Option<PathBuf> {
    static TREE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    TREE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let root = root.canonicalize().ok()?;
        let exe = std::env::current_exe().ok()?;
        let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(path) => PathBuf::from(path),
            None => exe,
        };
        let exe = exe.canonicalize().ok()?;
        exe.starts_with(&root).then_some(root)
    })
    .clone()
}

fn var(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn user_cache() -> PathBuf {
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("handoff")
}

/// Downloads and environments: the ONNX Runtime library, Python venvs,
/// Chromium.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = var("HANDOFF_CACHE") {
        return dir;
    }
    if let Some(home) = var("HANDOFF_HOME") {
        return home.join(".cache");
    }
    match source_tree() {
        Some(root) => root.join(".cache"),
        None => user_cache(),
    }
}

/// Models fetched from registries, converted and quantised.
pub fn model_cache_dir() -> PathBuf {
    if let Some(dir) = var("HANDOFF_MODEL_CACHE") {
        return dir;
    }
    if let Some(home) = var("HANDOFF_HOME") {
        return home.join("models/cache");
    }
    match source_tree() {
        Some(root) => root.join("models/cache"),
        None => user_cache().join("models"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_binary_is_inside_its_source_tree() {
        // Test binaries live in target/ of the workspace, so the clone's own
        // directories are used; an installed binary would not match.
        let root = source_tree().expect("test binary under the workspace");
        assert!(root.join("Cargo.toml").is_file());
        assert!(root.join("crates/handoff-backend").is_dir());
    }
}
