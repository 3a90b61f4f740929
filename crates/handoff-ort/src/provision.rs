//! Finding `libonnxruntime.so`, in this order:
//! 1. `ORT_DYLIB_PATH`;
//! 2. the cache directory (`handoff_backend::home`: `.cache/` of the clone
//!    a binary was built in, `~/.cache/handoff` for an installed one),
//!    filled by [`fetch`] with
//!    `pip download onnxruntime==PINNED --no-deps` (a wheel is a zip);
//! 3. the `onnxruntime` package of an installed `python3`.
//!
//! The `ort` crate is built with `api-31`, so the library must be 1.31 or
//! newer; an older one is reported, not loaded.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The ONNX Runtime release handoff fetches and was tested with.
pub const PINNED_VERSION: &str = "1.31.1";
/// The lowest minor version the `ort` crate's `api-31` feature accepts.
pub const MIN_MINOR: u32 = 31;

#[derive(Debug, Clone)]
pub struct Located {
    pub path: PathBuf,
    pub version: String,
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    EnvVar,
    ProjectCache,
    PythonPackage,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::EnvVar => "ORT_DYLIB_PATH",
            Origin::ProjectCache => "project cache",
            Origin::PythonPackage => "python onnxruntime package",
        })
    }
}

/// Why no usable library was found or fetched.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("library not found: ORT_DYLIB_PATH={0} does not exist")]
    EnvPathMissing(String),
    /// Every place tried, with why it did not hold a library.
    #[error("library not found: tried {}", tried.join("; "))]
    NotFound { tried: Vec<String> },
    #[error(
        "library {} is ONNX Runtime {version}; handoff needs 1.{MIN_MINOR} or newer (run `handoff setup` to fetch {PINNED_VERSION})",
        path.display()
    )]
    TooOld { path: PathBuf, version: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}; or set ORT_DYLIB_PATH to a library you trust")]
    Wheel(#[from] handoff_backend::wheel::WheelError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The cache directory (see [`handoff_backend::home`]).
pub fn cache_dir() -> PathBuf {
    handoff_backend::home::cache_dir()
}

fn cached_library() -> PathBuf {
    cache_dir()
        .join(format!("onnxruntime-{PINNED_VERSION}"))
        .join(format!("libonnxruntime.so.{PINNED_VERSION}"))
}

/// Where the library is, or why none was found (each place tried).
pub fn locate() -> Result<Located, ProvisionError> {
    let mut tried = Vec::new();
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH")
        && !p.is_empty()
    {
        let path = PathBuf::from(&p);
        if path.is_file() {
            return check(path, Origin::EnvVar);
        }
        return Err(ProvisionError::EnvPathMissing(p));
    }
    tried.push("ORT_DYLIB_PATH (unset)".to_owned());
    let cached = cached_library();
    if cached.is_file() {
        return check(cached, Origin::ProjectCache);
    }
    tried.push(format!(
        "{} (absent; `handoff setup` fills it)",
        cached.display()
    ));
    match python_library() {
        Some(p) => check(p, Origin::PythonPackage),
        None => {
            tried.push("python3 -c 'import onnxruntime' (not installed)".to_owned());
            Err(ProvisionError::NotFound { tried })
        }
    }
}

fn check(path: PathBuf, origin: Origin) -> Result<Located, ProvisionError> {
    let version = library_version(&path)
        .or_else(|| version_from_name(&path))
        .unwrap_or_else(|| "unknown".into());
    if let Some(minor) = version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok())
        && minor < MIN_MINOR
    {
        return Err(ProvisionError::TooOld { path, version });
    }
    Ok(Located {
        path,
        version,
        origin,
    })
}

/// The version the library itself reports
/// (`OrtGetApiBase()->GetVersionString()`), which a renamed or copied file
/// keeps; `None` when `path` is not an ONNX Runtime library.
pub fn library_version(path: &Path) -> Option<String> {
    use std::ffi::{CStr, CString, c_char, c_void};
    use std::os::unix::ffi::OsStrExt;
    /// The C API's `OrtApiBase`: two function pointers.
    #[repr(C)]
    struct ApiBase {
        get_api: *const c_void,
        get_version_string: unsafe extern "C" fn() -> *const c_char,
    }
    let file = CString::new(path.as_os_str().as_bytes()).ok()?;
    // dlopen of a library already loaded returns the same handle (its
    // count goes up and back down); OrtGetApiBase and GetVersionString are
    // the C API's stable entry points, callable before any initialisation,
    // and the string is static in the library.
    #[allow(unsafe_code)]
    unsafe {
        let handle = libc::dlopen(file.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        let symbol = libc::dlsym(handle, c"OrtGetApiBase".as_ptr());
        let version = if symbol.is_null() {
            None
        } else {
            let get_base: unsafe extern "C" fn() -> *const ApiBase = std::mem::transmute(symbol);
            let base = get_base();
            if base.is_null() {
                None
            } else {
                let s = ((*base).get_version_string)();
                (!s.is_null())
                    .then(|| CStr::from_ptr(s).to_str().ok().map(str::to_owned))
                    .flatten()
            }
        };
        libc::dlclose(handle);
        version
    }
}

/// `libonnxruntime.so.1.31.1` -> `1.31.1`.
fn version_from_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let v = name.strip_prefix("libonnxruntime.so.")?;
    (!v.is_empty()).then(|| v.to_owned())
}

fn python_library() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os, glob; d = os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'); \
             c = sorted(glob.glob(os.path.join(d, 'libonnxruntime.so.*'))); print(c[-1] if c else '')",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let p = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!p.is_empty()).then(|| PathBuf::from(p))
}

/// SHA-256 of every Linux wheel of the pinned release (CPython 3.11-3.14,
/// x86_64 and aarch64): the shared library handoff loads into its own
/// process comes only from one of these files.
pub const WHEEL_SHA256: [&str; 8] = [
    "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f", // cp311 x86_64
    "da05378364c44d4407e463982d2bf8d5e4cfea873283757e48beeb41df97b7f3", // cp311 aarch64
    "1f3dea47f2f0e5117c2404cea7d21fd253ae7836a3bf167a501cdfbb2600d536", // cp312 x86_64
    "0b9a492176886992e0e875f06bc0367e333f5fff11711a2d642e18b02f3009cc", // cp312 aarch64
    "74a6a52994616c4d18b33db1e13c226333a70a6ba07480a5cab9c2a50dff1430", // cp313 x86_64
    "dcaedc50333876f3829ab966b242147f0e548229e29c36fe44622ecf748c25ee", // cp313 aarch64
    "c20d7f15d84427db070b163f78c2c7146cc93edd6113fa7327671259a24184fe", // cp314 x86_64
    "c878686b75cade1ed59131aa018ab004b1e64368b0d54041912450b9642cf04f", // cp314 aarch64
];

/// `pip download` of the pinned onnxruntime wheel into `dir`, refused by
/// pip (`--require-hashes`) unless the file is one of `hashes`.
pub fn download_wheel(dir: &Path, hashes: &[&str]) -> Result<PathBuf, ProvisionError> {
    Ok(handoff_backend::wheel::download(
        dir,
        &format!("onnxruntime=={PINNED_VERSION}"),
        hashes,
    )?)
}

/// Fills the project cache from the onnxruntime wheel on PyPI. Returns the
/// library path; a no-op when it is already there.
pub fn fetch() -> Result<PathBuf, ProvisionError> {
    let lib = cached_library();
    if lib.is_file() {
        return Ok(lib);
    }
    let dir = lib.parent().unwrap_or(Path::new(".")).to_owned();
    // Per-process download directory: parallel test processes may all
    // find the cache empty; each extracts to its own temp name and the
    // renames race harmlessly.
    let wheels = cache_dir().join(format!("wheels-{}", std::process::id()));
    // Unpacked beside the cache entry, then renamed: parallel processes
    // never see half a library.
    let tmp = dir.join(format!("unpack{}", std::process::id()));
    let fill = || -> Result<(), ProvisionError> {
        let wheel = download_wheel(&wheels, &WHEEL_SHA256)?;
        let member = format!("onnxruntime/capi/libonnxruntime.so.{PINNED_VERSION}");
        handoff_backend::wheel::unpack(&wheel, &member, &tmp)?;
        let unpacked = tmp.join(format!("libonnxruntime.so.{PINNED_VERSION}"));
        std::fs::rename(&unpacked, &lib).map_err(io(&lib))
    };
    let filled = fill();
    // Whether it worked or not: a failed download must not leave a
    // half-written wheel or library behind in the cache.
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&wheels);
    filled.map(|()| lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_comes_from_the_file_name() {
        assert_eq!(
            version_from_name(Path::new("/x/libonnxruntime.so.1.31.1")).as_deref(),
            Some("1.31.1")
        );
        assert_eq!(version_from_name(Path::new("/x/libonnxruntime.so")), None);
    }

    #[test]
    fn the_library_reports_its_own_version_under_any_name() {
        let lib = fetch().expect("libonnxruntime from the project cache");
        let dir = std::env::temp_dir().join(format!("handoff-ort-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("libonnxruntime.so");
        std::fs::copy(&lib, &copy).unwrap();
        assert_eq!(library_version(&copy).as_deref(), Some(PINNED_VERSION));
        std::fs::write(dir.join("not.so"), "not a library").unwrap();
        assert_eq!(library_version(&dir.join("not.so")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_wheel_that_is_not_a_pinned_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wrong = "0".repeat(64);
        let err = download_wheel(dir.path(), &[wrong.as_str()]).unwrap_err();
        assert!(
            matches!(
                &err,
                ProvisionError::Wheel(handoff_backend::wheel::WheelError::Download { hint, .. })
                    if hint.contains("not one of the pinned files")
            ),
            "{err}"
        );
        let wheels = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "whl"))
            })
            .count();
        assert_eq!(wheels, 0, "pip kept a wheel whose hash did not match");
    }

    #[test]
    fn old_libraries_are_refused_with_the_reason() {
        let err = check(PathBuf::from("/x/libonnxruntime.so.1.20.0"), Origin::EnvVar).unwrap_err();
        assert!(
            matches!(&err, ProvisionError::TooOld { version, .. } if version == "1.20.0"),
            "{err}"
        );
        assert!(err.to_string().contains("needs 1.31 or newer"), "{err}");
    }
}
