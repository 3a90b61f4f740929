//! The one tokenizer set-up every text path shares (suite inputs, `handoff
//! serve`, the GIL benchmark): fixed-length padding and truncation, so a
//! batch is a dense `[batch, seq]` tensor whatever the sentences.

use std::path::Path;

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// What is wrong with a tokenizer (the caller names the file).
#[derive(Debug, thiserror::Error)]
pub enum TextError {
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

/// Loads a tokenizer.json and fixes its length to `seq`. The error says
/// what is wrong, not which file (the caller knows how to name it).
pub fn load_fixed_length(path: &Path, seq: usize) -> Result<Tokenizer, TextError> {
    if let Some(p) = handoff_onnx::lfs::LfsPointer::at(path) {
        return Err(TextError::NotATokenizer(format!("it is {p}")));
    }
    let mut tok =
        Tokenizer::from_file(path).map_err(|e| TextError::NotATokenizer(e.to_string()))?;
    set_fixed_length(&mut tok, seq)?;
    Ok(tok)
}
