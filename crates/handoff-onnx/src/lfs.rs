//! Git LFS pointer files in place of a model's bytes.
//!
//! A repository that keeps its models in Git LFS and is checked out
//! without the objects (`actions/checkout` without `lfs: true`, a clone
//! without `git lfs install`, a file taken from history with `git show`)
//! has a ~130-byte text file where the model should be. Every parser then
//! fails with something that does not say why (protobuf's "invalid wire
//! type value: 6", safetensors' "header too large"); this names it.

use std::fmt;
use std::path::Path;

/// What a pointer file says of the object it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LfsPointer {
    /// `sha256:<hex>` as written in the pointer.
    pub oid: String,
    /// The object's size in bytes.
    pub size: u64,
}

/// The spec's limit: a pointer file is smaller than this.
const MAX_POINTER_BYTES: usize = 1024;

impl LfsPointer {
    /// The pointer `bytes` are, or `None` for anything else (a model, a
    /// truncated file, text that only starts like one).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() >= MAX_POINTER_BYTES {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        // The first line is the version; the spec's current URL and the
        // one pointers were written with before Git LFS had its name.
        let version = lines.next()?.strip_prefix("version ")?;
        if !matches!(
            version,
            "https://git-lfs.github.com/spec/v1" | "https://hawser.github.com/spec/v1"
        ) {
            return None;
        }
        let (mut oid, mut size) = (None, None);
        for line in lines {
            if let Some(v) = line.strip_prefix("oid ") {
                oid = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("size ") {
                size = v.parse().ok();
            }
        }
        Some(Self {
            oid: oid?,
            size: size?,
        })
    }

    /// Reads `path` far enough to tell whether it is a pointer (for files
    /// that are read by a library, not by handoff).
    pub fn at(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_file() || meta.len() >= MAX_POINTER_BYTES as u64 {
            return None;
        }
        Self::parse(&std::fs::read(path).ok()?)
    }
}

impl fmt::Display for LfsPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short: String = self.oid.chars().take(15).collect();
        let ellipsis = if self.oid.chars().count() > 15 {
            "…"
        } else {
            ""
        };
        write!(
            f,
            "a Git LFS pointer (object {short}{ellipsis}, {:.1} MB), not the file itself: fetch the objects \
             (`git lfs pull`; in GitHub Actions `actions/checkout` with `lfs: true`), and pipe a file taken \
             from history through `git lfs smudge` (`git show REV:PATH | git lfs smudge > FILE`)",
            self.size as f64 / 1e6
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POINTER: &str = "version https://git-lfs.github.com/spec/v1\n\
        oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n\
        size 90312345\n";

    #[test]
    fn a_pointer_is_read_and_said() {
        let p = LfsPointer::parse(POINTER.as_bytes()).expect("a pointer");
        assert_eq!(p.size, 90_312_345);
        assert!(p.oid.starts_with("sha256:4d7a2146"));
        let said = p.to_string();
        assert!(
            said.starts_with("a Git LFS pointer (object sha256:4d7a2146…, 90.3 MB)"),
            "{said}"
        );
        assert!(said.contains("git lfs smudge"), "{said}");
    }

    #[test]
    fn other_files_are_not_pointers() {
        // A model, text that starts like a pointer but lacks its fields,
        // another version line, and a pointer-like file over the limit.
        assert_eq!(LfsPointer::parse(&[0x08, 0x07, 0x12, 0x04]), None);
        assert_eq!(
            LfsPointer::parse(b"version https://git-lfs.github.com/spec/v1\nsize 3\n"),
            None
        );
        assert_eq!(
            LfsPointer::parse(
                POINTER
                    .replace("git-lfs.github.com", "example.com")
                    .as_bytes()
            ),
            None
        );
        let padded = format!("{POINTER}{}", "x".repeat(1024));
        assert_eq!(LfsPointer::parse(padded.as_bytes()), None);
        // The spec's pre-release version line is still a pointer.
        let old = POINTER.replace("git-lfs.github.com", "hawser.github.com");
        assert!(LfsPointer::parse(old.as_bytes()).is_some());
    }
}
