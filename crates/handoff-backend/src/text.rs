//! The one tokenizer set-up every text path shares (suite inputs, `handoff
//! serve`, the GIL benchmark): fixed-length padding and truncation, so a
//! batch is a dense `[batch, seq]` tensor whatever the sentences.

use std::path::Path;

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// What is wrong with a tokenizer (the caller names the file).
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("it is {0}")]
    LfsPointer(handoff_onnx::lfs::LfsPointer),
    #[error("not a tokenizer.json: {0}")]
    NotATokenizer(String),
    #[error("cannot pad and truncate to {seq} tokens: {detail}")]
    FixedLength { seq: usize, detail: String },
}

/// Pads and truncates every encoding of `tok` to exactly `seq` tokens.
pub fn set_fixed_length(tok: &mut Tokenizer, seq: usize) -> Result<(), TextError> {
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(seq),
        ..Default::default()
    }));
    tok.with_truncation(Some(TruncationParams {
        max_length: seq,
        ..Default::default()
    }))
    .map(|_| ())
    .map_err(|e| TextError::FixedLength {
        seq,
        detail: e.to_string(),
    })
}

/// Loads a tokenizer.json (a Git LFS pointer in its place is named as one).
/// The error says what is wrong, not which file (the caller knows how to
/// name it).
pub fn load(path: &Path) -> Result<Tokenizer, TextError> {
    if let Some(p) = handoff_onnx::lfs::LfsPointer::at(path) {
        return Err(TextError::LfsPointer(p));
    }
    Tokenizer::from_file(path).map_err(|e| TextError::NotATokenizer(e.to_string()))
}

/// Loads a tokenizer.json and fixes its length to `seq`.
pub fn load_fixed_length(path: &Path, seq: usize) -> Result<Tokenizer, TextError> {
    let mut tok = load(path)?;
    set_fixed_length(&mut tok, seq)?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_git_lfs_pointer_in_place_of_the_tokenizer_is_named_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(
            &path,
            "version https://git-lfs.github.com/spec/v1\n\
             oid sha256:4d7a2146aa1b2b0e1c2a5fba5ea7e4f6d2d6e0ad6d2b14c6b9e3a1f2c4d5e6f7\n\
             size 711661\n",
        )
        .unwrap();
        let err = load_fixed_length(&path, 16).unwrap_err().to_string();
        assert!(
            err.starts_with("it is a Git LFS pointer (object sha256:4d7a2146…, 0.7 MB)"),
            "{err}"
        );
        std::fs::write(&path, "{").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.starts_with("not a tokenizer.json: "), "{err}");
    }
}
