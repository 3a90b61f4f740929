//! Tokenised text inputs for models with a tokenizer.json.

use std::collections::BTreeMap;
use std::path::Path;

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Default sentences: varied length, punctuation and vocabulary, 32 of them
/// so a batch of 32 (the conversion check) has no repeats.
pub const DEFAULT_SENTENCES: [&str; 32] = [
    "The quick brown fox jumps over the lazy dog.",
    "Where should we hand off from Python, and to what?",
    "A man is playing a guitar on a street corner.",
    "ONNX Runtime, tract and candle all run the same model here.",
    "It rained all night, so the match was postponed until Sunday morning.",
    "Latency percentiles matter more than averages for interactive services.",
    "She sells sea shells by the sea shore.",
    "How many tokens fit into a sequence of one hundred and twenty-eight?",
    "The committee approved the budget after a long and heated debate.",
    "Quantised models trade a little accuracy for a lot of speed.",
    "A child is riding a red bicycle down the hill.",
    "Please restart the server before applying the configuration change.",
    "The telescope revealed galaxies that formed billions of years ago.",
    "Bread, cheese, olives and a bottle of wine for the picnic.",
    "Is the regression real, or is the runner just noisy today?",
    "Two dogs are running through a field of tall grass.",
    "The museum is closed on Mondays and public holidays.",
    "Matrix multiplication dominates the cost of transformer inference.",
    "He forgot his umbrella and arrived soaked to the bone.",
    "The new library opens next week with a reading by local authors.",
    "Our flight was delayed by three hours because of fog.",
    "Embeddings place similar sentences close together in vector space.",
    "A woman is slicing tomatoes in a small kitchen.",
    "The stock market fell sharply after the announcement.",
    "Mount Everest is the highest mountain above sea level.",
    "Fresh coffee and warm croissants are served from seven o'clock.",
    "The algorithm converges after a few hundred iterations.",
    "Birds migrate south when the days grow shorter.",
    "Thread pools are process-wide, so each case gets its own process.",
    "The orchestra tuned their instruments before the concert began.",
    "Short.",
    "This final sentence is deliberately much longer than most of the others so that it is cut off at the maximum sequence length when the suite asks for short sequences, which exercises truncation as well as padding.",
];

/// Token ids per sentence for one sequence length.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<Vec<i64>>,
    pub mask: Vec<Vec<i64>>,
    pub types: Vec<Vec<i64>>,
}

impl Encoded {
    /// Flattened `[batch, seq]` values, sentences used in turn.
    pub fn batch(&self, which: &[Vec<i64>], batch: usize) -> Vec<i64> {
        (0..batch)
            .flat_map(|b| which[b % which.len()].iter().copied())
            .collect()
    }
}

/// Tokenises `sentences` for every sequence length, padded and truncated.
pub fn encode(
    tokenizer: &Path,
    sentences: &[String],
    seqs: &[u32],
) -> Result<BTreeMap<u32, Encoded>, String> {
    let mut tok = Tokenizer::from_file(tokenizer)
        .map_err(|e| format!("{}: not a tokenizer.json: {e}", tokenizer.display()))?;
    let mut out = BTreeMap::new();
    for &seq in seqs {
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(seq as usize),
            ..Default::default()
        }));
        tok.with_truncation(Some(TruncationParams {
            max_length: seq as usize,
            ..Default::default()
        }))
        .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
        let enc = tok
            .encode_batch(sentences.to_vec(), true)
            .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
        let conv = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<Vec<i64>> {
            enc.iter()
                .map(|e| f(e).iter().map(|&v| i64::from(v)).collect())
                .collect()
        };
        out.insert(
            seq,
            Encoded {
                ids: conv(&|e| e.get_ids()),
                mask: conv(&|e| e.get_attention_mask()),
                types: conv(&|e| e.get_type_ids()),
            },
        );
    }
    Ok(out)
}
