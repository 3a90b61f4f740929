//! The `random` model source: a BERT or DistilBERT of a real model's size
//! with seeded random weights, written once into the model cache as an HF
//! directory, so every backend (and PyTorch) runs it like a downloaded
//! model. Its outputs mean nothing; the source label says so wherever the
//! model's numbers appear.

use std::path::{Path, PathBuf};

use handoff_convert::bert::{Arch, RandomModel};

use crate::raw::{RandomArch, RawRandom};
use crate::text::{CALIBRATION_SENTENCES, DEFAULT_SENTENCES};

/// What the results call such a model, in `model_source`.
pub use handoff_backend::RANDOM_WEIGHTS_NOTE as RANDOM_NOTE;

/// Why a random model cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum RandomError {
    #[error("`labels` must be at least 1")]
    NoLabels,
    #[error("`hidden`, `layers` and `heads` must be at least 1")]
    Empty,
    #[error("`hidden` ({hidden}) must be a multiple of `heads` ({heads})")]
    Heads { hidden: usize, heads: usize },
    #[error("hidden {hidden} and {layers} layers are beyond the limits (4096, 48)")]
    TooLarge { hidden: usize, layers: usize },
    #[error("{}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A random model's place in the model cache, checked but not yet written.
pub struct RandomDir {
    pub dir: PathBuf,
    /// What the results call it (`random:<id> (random weights: ...)`).
    pub label: String,
    model: RandomModel,
    id: String,
}

impl RandomDir {
    /// Checks the suite's settings and names the directory.
    pub fn new(raw: &RawRandom, suite_seed: u64, cache: &Path) -> Result<Self, RandomError> {
        let (arch, name, layers) = match raw.arch {
            RandomArch::Bert => (Arch::Bert, "bert", 12),
            RandomArch::Distilbert => (Arch::DistilBert, "distilbert", 6),
        };
        let model = RandomModel {
            arch,
            labels: raw.labels.map(|n| n as usize),
            hidden: raw.hidden.unwrap_or(768) as usize,
            layers: raw.layers.unwrap_or(layers) as usize,
            heads: raw.heads.unwrap_or(12) as usize,
            vocab: 30522,
            max_positions: 512,
            scale: 0.035,
            seed: raw.seed.unwrap_or(suite_seed),
        };
        if model.labels == Some(0) {
            return Err(RandomError::NoLabels);
        }
        if model.hidden == 0 || model.layers == 0 || model.heads == 0 {
            return Err(RandomError::Empty);
        }
        if !model.hidden.is_multiple_of(model.heads) {
            return Err(RandomError::Heads {
                hidden: model.hidden,
                heads: model.heads,
            });
        }
        if model.hidden > 4096 || model.layers > 48 {
            return Err(RandomError::TooLarge {
                hidden: model.hidden,
                layers: model.layers,
            });
        }
        let id = format!(
            "{name}-h{}-l{}-a{}{}-seed{}",
            model.hidden,
            model.layers,
            model.heads,
            model
                .labels
                .map_or_else(|| "-encoder".to_owned(), |n| format!("-cls{n}")),
            model.seed
        );
        Ok(Self {
            dir: cache.join("random").join(&id),
            label: format!("random:{id} ({RANDOM_NOTE})"),
            model,
            id,
        })
    }

    /// Whether the model is in the cache already.
    pub fn is_written(&self) -> bool {
        self.dir.join("tokenizer.json").is_file()
    }

    /// Writes the weights and tokenizer (elsewhere, then renamed: a crash
    /// leaves no half model).
    pub fn write(&self) -> Result<(), RandomError> {
        let parent = self.dir.parent().unwrap_or(&self.dir);
        let tmp = parent.join(format!("{}.tmp{}", self.id, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let at = |path: &Path| {
            let path = path.to_owned();
            move |source| RandomError::Write { path, source }
        };
        self.model.write(&tmp).map_err(at(&tmp))?;
        write_tokenizer(&tmp, self.model.vocab).map_err(at(&tmp))?;
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::rename(&tmp, &self.dir).map_err(at(&self.dir))
    }
}

/// A word-level tokenizer over the built-in sentences' words (lower-cased,
/// `[CLS] ... [SEP]` around each text; other words become `[UNK]`): real
/// lengths and masks for the random model, whose vocabulary it fits in.
fn write_tokenizer(dir: &Path, vocab_size: usize) -> std::io::Result<()> {
    let mut vocab = serde_json::Map::new();
    for w in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] {
        vocab.insert(w.into(), vocab.len().into());
    }
    for s in DEFAULT_SENTENCES.iter().chain(&CALIBRATION_SENTENCES) {
        for w in s.split(|c: char| !c.is_alphanumeric()) {
            let w = w.to_lowercase();
            if !w.is_empty() && !vocab.contains_key(&w) && vocab.len() < vocab_size {
                vocab.insert(w, vocab.len().into());
            }
        }
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [
            {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tok)?)
}
