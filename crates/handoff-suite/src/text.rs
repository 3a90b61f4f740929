//! Tokenised text inputs for models with a tokenizer.json.

use std::collections::BTreeMap;
use std::path::Path;

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

/// Calibration sentences for quantisation (activation ranges, smoothing
/// factors): none of them is in [`DEFAULT_SENTENCES`], which the accuracy
/// gate checks, so a variant is not judged on the text it was tuned on.
pub const CALIBRATION_SENTENCES: [&str; 32] = [
    "The train to the airport leaves every twenty minutes.",
    "Can you recommend a good book about the history of mathematics?",
    "A cat is sleeping on a warm windowsill in the afternoon sun.",
    "Profits rose by twelve percent in the third quarter.",
    "The compiler rejected the program because of a missing semicolon.",
    "Heavy snow closed the mountain pass for most of the winter.",
    "Why do leaves change colour in the autumn?",
    "The team celebrated their victory with a parade through the city.",
    "Add two cups of flour, one egg and a pinch of salt.",
    "A group of students is studying together in the library.",
    "The patient was discharged from the hospital after three days.",
    "Solar panels convert sunlight directly into electricity.",
    "I lost my keys somewhere between the office and the station.",
    "The river flooded the low-lying fields after the storm.",
    "Which programming language should I learn first?",
    "The violinist played a difficult piece without any sheet music.",
    "Customers can return items within thirty days of purchase.",
    "Ancient Romans built roads that are still in use today.",
    "The baby laughed when the puppy licked her hand.",
    "Memory bandwidth limits how fast large models can run.",
    "Two men are playing chess in the park.",
    "The election results will be announced tomorrow evening.",
    "Turn left at the second traffic light and park behind the bakery.",
    "Volcanic eruptions can cool the climate for several years.",
    "Our quarterly report is due at the end of the month.",
    "The painting was sold at auction for a record price.",
    "Ok.",
    "Strong encryption protects messages from being read by anyone but the recipient.",
    "The children built a sandcastle on the beach.",
    "He apologised for missing the meeting and promised to send notes.",
    "Wind turbines were installed along the coast last year.",
    "Despite the long delays and the confusing announcements at the station, every passenger eventually reached the city centre before midnight, tired but relieved that the journey was finally over.",
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
    let mut tok = handoff_backend::text::load(tokenizer)
        .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    let mut out = BTreeMap::new();
    for &seq in seqs {
        handoff_backend::text::set_fixed_length(&mut tok, seq as usize)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_sentences_are_distinct_and_not_the_gates() {
        let all: std::collections::BTreeSet<&str> = DEFAULT_SENTENCES
            .iter()
            .chain(&CALIBRATION_SENTENCES)
            .copied()
            .collect();
        assert_eq!(
            all.len(),
            DEFAULT_SENTENCES.len() + CALIBRATION_SENTENCES.len()
        );
    }
}
