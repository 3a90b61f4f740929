//! Python virtual environments under the project cache, filled from PyPI on
//! first use (`python3 -m venv`, then `pip install --require-hashes` from
//! the environment's lock file: every package pinned to one version and
//! the SHA-256 of its wheels, so pip installs those files or nothing).
//! Used for reference tools that only exist in Python (ONNX Runtime's
//! quantiser) and for Python baselines. Nothing is installed outside the
//! cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::PythonError;

/// An environment: its name (`venv-<name>` in the cache), its top-level
/// pins and its lock (`scripts/locks/<name>.txt`, written by
/// `scripts/lock_python.py` from those pins).
#[derive(Debug, Clone, Copy)]
pub struct EnvSpec<'a> {
    pub name: &'a str,
    pub packages: &'a [&'a str],
    pub lock: &'a str,
}

impl EnvSpec<'_> {
    /// What the marker file of a built environment holds: a changed pin or
    /// lock rebuilds it.
    fn marker_text(&self) -> String {
        format!("{}\n{}", self.packages.join("\n"), self.lock)
    }

    /// The lock's `# <key>: ...` header line.
    fn header(&self, key: &str) -> Option<&str> {
        self.lock
            .lines()
            .find_map(|l| l.strip_prefix("# ")?.strip_prefix(key)?.strip_prefix(": "))
    }

    /// The platforms the lock has wheels for (`cp311-x86_64`, ...).
    pub fn platforms(&self) -> Vec<&str> {
        self.header("platforms")
            .map(|p| p.split_whitespace().collect())
            .unwrap_or_default()
    }

    /// The top-level pins the lock was written from.
    pub fn locked_packages(&self) -> Vec<&str> {
        self.header("top-level")
            .map(|p| p.split_whitespace().collect())
            .unwrap_or_default()
    }

    /// Why the lock does not match the pins, if it does not: it was written
    /// from other top-level pins, or a pin has no locked line with a hash
    /// (a lock edited by hand or regenerated from a stale list).
    pub fn lock_drift(&self) -> Option<String> {
        if self.locked_packages() != self.packages {
            return Some(format!(
                "the lock of `{}` was written from {:?}, the pins are {:?}: run scripts/lock_python.py {}",
                self.name,
                self.locked_packages(),
                self.packages,
                self.name
            ));
        }
        let norm = |s: &str| s.replace('_', "-").to_ascii_lowercase();
        let lines: Vec<&str> = self.lock.lines().collect();
        self.packages.iter().find_map(|p| {
            let at = lines
                .iter()
                .position(|l| !l.starts_with('#') && norm(l).starts_with(&format!("{} ", norm(p))));
            let hashed = at
                .and_then(|i| lines.get(i + 1))
                .is_some_and(|next| next.trim_start().starts_with("--hash=sha256:"));
            (!hashed).then(|| format!("the lock of `{}` has no hashed line for {p}", self.name))
        })
    }
}

/// Prints the interpreter's platform as the locks name it (`cp311-x86_64`).
const PLATFORM_PY: &str = "import sys, platform; print(f'cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}')";

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PythonError + '_ {
    move |source| PythonError::Io {
        path: path.to_owned(),
        source,
    }
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

/// The interpreter of an environment created earlier from this spec.
pub fn existing(cache: &Path, spec: &EnvSpec<'_>) -> Option<PathBuf> {
    let dir = cache.join(format!("venv-{}", spec.name));
    let python = dir.join("bin").join("python");
    let marker = std::fs::read_to_string(dir.join(".handoff-packages")).ok()?;
    (python.is_file() && marker == spec.marker_text()).then_some(python)
}

/// A created environment's interpreter, or why there is none.
pub fn ensure(cache: &Path, spec: &EnvSpec<'_>) -> Result<PathBuf, PythonError> {
    let name = spec.name;
    let dir = cache.join(format!("venv-{name}"));
    let python = dir.join("bin").join("python");
    let marker = dir.join(".handoff-packages");
    let wanted = spec.marker_text();
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
    let built = build_from_lock(&tmp, spec, &run);
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // venv scripts embed their path: build in place of the final directory.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    // pip's entry-point scripts keep the temporary path in their shebang;
    // handoff only ever runs `python -m` / `python -c`, which survive the move.
    std::fs::write(&marker, wanted).map_err(io(&marker))?;
    Ok(python)
}

/// Installs the lock into the new environment at `venv`, after checking
/// that the lock has wheels for its interpreter and machine.
fn build_from_lock(
    venv: &Path,
    spec: &EnvSpec<'_>,
    run: &dyn Fn(&mut Command, &str) -> Result<(), PythonError>,
) -> Result<(), PythonError> {
    let python = venv.join("bin").join("python");
    let out = Command::new(&python)
        .args(["-c", PLATFORM_PY])
        .output()
        .map_err(|source| PythonError::Start {
            what: python.display().to_string(),
            source,
        })?;
    let platform = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let covered = spec.platforms();
    if !covered.contains(&platform.as_str()) {
        return Err(PythonError::NoLock {
            env: spec.name.to_owned(),
            platform,
            covered: covered.join(" "),
        });
    }
    let lock = venv.join("handoff-lock.txt");
    std::fs::write(&lock, spec.lock).map_err(io(&lock))?;
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--only-binary=:all:"])
            .args(["--require-hashes", "-r"])
            .arg(&lock),
        &format!(
            "pip install --require-hashes (the {} lock: {})",
            spec.name,
            spec.packages.join(" ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn each_lock_was_written_from_its_environments_pins() {
        for spec in [crate::PYTHON_ORT, crate::torch::PYTHON_TORCH] {
            assert_eq!(spec.lock_drift(), None);
            assert!(spec.platforms().contains(&"cp311-x86_64"), "{}", spec.name);
        }
    }

    #[test]
    fn a_lock_that_lost_a_pins_line_or_was_written_from_other_pins_drifts() {
        let lock = one_package_lock(&"0".repeat(64), "cp311-x86_64");
        let unhashed: String = lock
            .lines()
            .filter(|l| !l.contains("--hash"))
            .collect::<Vec<_>>()
            .join("\n");
        fn spec<'a>(packages: &'a [&'a str], lock: &'a str) -> EnvSpec<'a> {
            EnvSpec {
                name: "t",
                packages,
                lock,
            }
        }
        assert_eq!(spec(&["idna==3.20"], &lock).lock_drift(), None);
        let other = spec(&["idna==3.21"], &lock).lock_drift().unwrap();
        assert!(other.contains("was written from"), "{other}");
        let lost = spec(&["idna==3.20"], &unhashed).lock_drift().unwrap();
        assert!(lost.contains("no hashed line for idna==3.20"), "{lost}");
    }

    /// A lock of one small wheel, with `hash` as its SHA-256.
    fn one_package_lock(hash: &str, platforms: &str) -> String {
        format!(
            "# top-level: idna==3.20\n# platforms: {platforms}\nidna==3.20 \\\n    --hash=sha256:{hash}\n"
        )
    }

    fn this_platform() -> String {
        let out = Command::new("python3")
            .args(["-c", PLATFORM_PY])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn a_wheel_whose_hash_is_not_locked_is_refused_and_nothing_is_kept() {
        let cache = tempfile::tempdir().unwrap();
        let lock = one_package_lock(&"0".repeat(64), &this_platform());
        let spec = EnvSpec {
            name: "t",
            packages: &["idna==3.20"],
            lock: &lock,
        };
        let err = ensure(cache.path(), &spec).unwrap_err();
        assert!(
            matches!(&err, PythonError::Failed { detail, .. } if detail.to_lowercase().contains("hash")),
            "{err}"
        );
        let left: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(existing(cache.path(), &spec).is_none());
    }

    #[test]
    fn a_platform_the_lock_does_not_cover_is_refused_before_pip() {
        let cache = tempfile::tempdir().unwrap();
        let lock = one_package_lock(&"0".repeat(64), "cp39-sparc64");
        let spec = EnvSpec {
            name: "t",
            packages: &["idna==3.20"],
            lock: &lock,
        };
        let err = ensure(cache.path(), &spec).unwrap_err();
        assert!(
            matches!(&err, PythonError::NoLock { covered, .. } if covered == "cp39-sparc64"),
            "{err}"
        );
        assert!(
            err.to_string().contains("scripts/lock_python.py t"),
            "{err}"
        );
    }

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
