//! Python virtual environments under the project cache, filled from PyPI
//! with pinned packages on first use (`python3 -m venv`, then `pip install`).
//! Used for reference tools that only exist in Python (ONNX Runtime's
//! quantiser) and for Python baselines. Nothing is installed outside the
//! cache.

use std::path::{Path, PathBuf};
use std::process::Command;

fn marker_text(packages: &[&str]) -> String {
    packages.join("\n")
}

/// The interpreter of an environment created earlier with these pins.
pub fn existing(cache: &Path, name: &str, packages: &[&str]) -> Option<PathBuf> {
    let dir = cache.join(format!("venv-{name}"));
    let python = dir.join("bin").join("python");
    let marker = std::fs::read_to_string(dir.join(".handoff-packages")).ok()?;
    (python.is_file() && marker == marker_text(packages)).then_some(python)
}

/// A created environment's interpreter, or why there is none.
pub fn ensure(cache: &Path, name: &str, packages: &[&str]) -> Result<PathBuf, String> {
    let dir = cache.join(format!("venv-{name}"));
    let python = dir.join("bin").join("python");
    // The marker lists the pins: a changed pin rebuilds the environment.
    let marker = dir.join(".handoff-packages");
    let wanted = marker_text(packages);
    if python.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted) {
        return Ok(python);
    }
    let tmp = cache.join(format!("venv-{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd
            .output()
            .map_err(|e| format!("{what}: cannot start: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            Err(format!(
                "{what} failed ({}): {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        }
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&tmp),
        "python3 -m venv",
    )?;
    run(
        Command::new(tmp.join("bin").join("python"))
            .args(["-m", "pip", "install", "--quiet", "--only-binary=:all:"])
            .args(packages),
        &format!("pip install {}", packages.join(" ")),
    )?;
    // venv scripts embed their path: build in place of the final directory.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // pip's entry-point scripts keep the temporary path in their shebang;
    // handoff only ever runs `python -m` / `python -c`, which survive the move.
    std::fs::write(&marker, wanted).map_err(|e| format!("{}: {e}", marker.display()))?;
    Ok(python)
}
