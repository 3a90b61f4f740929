//! Python virtual environments under the project cache, filled from PyPI
//! with pinned packages on first use (`python3 -m venv`, then `pip install`).
//! Used for reference tools that only exist in Python (ONNX Runtime's
//! quantiser) and for Python baselines. Nothing is installed outside the
//! cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::PythonError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PythonError + '_ {
    move |source| PythonError::Io {
        path: path.to_owned(),
        source,
    }
}

fn marker_text(packages: &[&str]) -> String {
    packages.join("\n")
}

/// A directory as a lock: creating one is atomic, and it is removed when
/// the guard drops. A lock older than `STALE` (its builder died) is taken
/// over.
struct BuildLock(PathBuf);

impl BuildLock {
    const STALE: std::time::Duration = std::time::Duration::from_secs(20 * 60);

    fn acquire(path: &Path) -> Result<Self, PythonError> {
        let start = std::time::Instant::now();
        loop {
            match std::fs::create_dir(path) {
                Ok(()) => return Ok(Self(path.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|a| a > Self::STALE) {
                        let _ = std::fs::remove_dir(path);
                        continue;
                    }
                    if start.elapsed() > Self::STALE {
                        return Err(PythonError::Locked {
                            path: path.to_owned(),
                            minutes: Self::STALE.as_secs() / 60,
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                Err(e) => return Err(io(path)(e)),
            }
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The interpreter of an environment created earlier with these pins.
pub fn existing(cache: &Path, name: &str, packages: &[&str]) -> Option<PathBuf> {
    let dir = cache.join(format!("venv-{name}"));
    let python = dir.join("bin").join("python");
    let marker = std::fs::read_to_string(dir.join(".handoff-packages")).ok()?;
    (python.is_file() && marker == marker_text(packages)).then_some(python)
}

/// A created environment's interpreter, or why there is none.
pub fn ensure(cache: &Path, name: &str, packages: &[&str]) -> Result<PathBuf, PythonError> {
    let dir = cache.join(format!("venv-{name}"));
    let python = dir.join("bin").join("python");
    // The marker lists the pins: a changed pin rebuilds the environment.
    let marker = dir.join(".handoff-packages");
    let wanted = marker_text(packages);
    let ready =
        || python.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted);
    if ready() {
        return Ok(python);
    }
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    // One builder at a time: a second process (parallel tests, two
    // `handoff` runs) would otherwise delete the first one's finished
    // environment, perhaps in use, to put its own in place.
    let _lock = BuildLock::acquire(&cache.join(format!("venv-{name}.lock")))?;
    if ready() {
        return Ok(python);
    }
    let tmp = cache.join(format!("venv-{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let run = |cmd: &mut Command, what: &str| -> Result<(), PythonError> {
        let out = cmd.output().map_err(|source| PythonError::Start {
            what: what.to_owned(),
            source,
        })?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            Err(PythonError::Failed {
                what: what.to_owned(),
                status: out.status,
                detail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            })
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
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    // pip's entry-point scripts keep the temporary path in their shebang;
    // handoff only ever runs `python -m` / `python -c`, which survive the move.
    std::fs::write(&marker, wanted).map_err(io(&marker))?;
    Ok(python)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn the_build_lock_lets_one_builder_in_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("venv-x.lock");
        let first = BuildLock::acquire(&path).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let second = {
            let (path, released) = (path.clone(), Arc::clone(&released));
            std::thread::spawn(move || {
                let _lock = BuildLock::acquire(&path).unwrap();
                released.load(Ordering::SeqCst)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(600));
        released.store(true, Ordering::SeqCst);
        drop(first);
        assert!(second.join().unwrap(), "the second builder got in first");
        assert!(!path.exists(), "the lock is removed when dropped");
    }
}
