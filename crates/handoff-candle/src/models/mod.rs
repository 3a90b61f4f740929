//! BERT and DistilBERT encoders as candle-transformers 0.11.1 defines them
//! (`models::bert`, `models::distilbert` and the `models::with_tracing`
//! layers they use; MIT OR Apache-2.0, the candle authors), so that
//! candle-native runs candle's own model code without a build compiling the
//! crate's other ~80,000 lines (a model zoo handoff does not run: 97-143
//! CPU-seconds at the tail of every cold build on 2 cores). The forward passes
//! are upstream's line for line; left out are the masked-LM heads and the
//! wrappers nothing here uses. When the candle pin moves, copy these files
//! again from the same release.

pub mod bert;
pub mod distilbert;
mod with_tracing;
