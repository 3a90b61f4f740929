//! What a model's declared input shapes allow of a suite's batch sizes and
//! dims. A model whose batch is fixed at 1 cannot run batch 8: expanding it
//! anyway would run the batch-1 tensor and report eight times its items/s.
//! So the expansion keeps only the values the model accepts, and says which
//! it dropped and why.

use std::collections::BTreeMap;

use handoff_onnx::{Dim, ModelInfo};

use crate::plan::InputTemplate;
use crate::raw::RawDim;

/// A value a model's inputs force on a suite symbol, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub value: u32,
    /// Why, for messages: "input `x` is [1, 3, 224, 224]".
    pub because: String,
}

/// The values of `batch` and named dims a model accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShapeLimits {
    /// `Some` when the batch is not free: the model fixes the dim the suite
    /// calls `batch`, or no input has a `batch` dim at all.
    pub batch: Option<Pinned>,
    /// Named dims the model fixes where the suite's inputs use the name.
    pub dims: BTreeMap<String, Pinned>,
}

impl ShapeLimits {
    /// Reads the limits off the inputs as the suite shapes them and the
    /// dims the model declares. Two inputs fixing one symbol at different
    /// values is an error (no case could run).
    pub fn of(inputs: &[InputTemplate], info: &ModelInfo) -> Result<Self, String> {
        let mut limits = ShapeLimits::default();
        let mut named: BTreeMap<String, Option<Pinned>> = BTreeMap::new();
        let mut batch_used = false;
        for t in inputs {
            let declared = info
                .input(&t.name)
                .and_then(|i| i.dims.as_ref())
                .filter(|d| d.len() == t.shape.len());
            for (k, d) in t.shape.iter().enumerate() {
                let RawDim::Symbol(s) = d else { continue };
                if s == "batch" {
                    batch_used = true;
                }
                let Some(Dim::Fixed(v)) = declared.map(|d| &d[k]) else {
                    continue;
                };
                let Ok(value) = u32::try_from(*v) else {
                    continue;
                };
                let because = format!("input `{}` is {}", t.name, declared_shape(info, &t.name));
                let slot = if s == "batch" {
                    &mut limits.batch
                } else {
                    named.entry(s.clone()).or_default()
                };
                match slot {
                    Some(p) if p.value != value => return Err(conflict(s, p, value, &because)),
                    Some(_) => {}
                    None => *slot = Some(Pinned { value, because }),
                }
            }
        }
        limits.dims = named
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        if !batch_used {
            limits.batch = Some(unbatched(inputs));
        }
        Ok(limits)
    }

    /// Splits `wanted` batch sizes into those the model accepts and a note
    /// for each one it does not.
    pub fn batches(&self, wanted: &[u32]) -> (Vec<u32>, Vec<String>) {
        split(wanted, self.batch.as_ref(), |b| format!("b{b}"), "batch")
    }

    /// The same for the values of a named dim.
    pub fn dim_values(&self, name: &str, wanted: &[u32]) -> (Vec<u32>, Vec<String>) {
        split(
            wanted,
            self.dims.get(name),
            |v| format!("{name}={v}"),
            &format!("`{name}`"),
        )
    }
}

fn conflict(symbol: &str, first: &Pinned, value: u32, because: &str) -> String {
    format!(
        "`{symbol}` cannot be both {} ({}) and {value} ({because})",
        first.value, first.because
    )
}

/// Without a `batch` dim every call runs the same tensors; they hold as many
/// items as their shared leading dim, else one.
fn unbatched(inputs: &[InputTemplate]) -> Pinned {
    let leading: Vec<Option<u32>> = inputs
        .iter()
        .filter_map(|t| t.shape.first())
        .map(|d| match d {
            RawDim::Fixed(v) => Some(*v),
            RawDim::Symbol(_) => None,
        })
        .collect();
    let common = match leading.first() {
        Some(Some(v)) if leading.iter().all(|l| *l == Some(*v)) => Some(*v),
        _ => None,
    };
    match common {
        Some(value) => Pinned {
            value,
            because: format!("no input has a `batch` dim; every input's first dim is {value}"),
        },
        None => Pinned {
            value: 1,
            because: "no input has a `batch` dim, so a call counts as one item".into(),
        },
    }
}

fn split(
    wanted: &[u32],
    pinned: Option<&Pinned>,
    label: impl Fn(u32) -> String,
    what: &str,
) -> (Vec<u32>, Vec<String>) {
    let Some(p) = pinned else {
        return (wanted.to_vec(), Vec::new());
    };
    let (kept, dropped): (Vec<u32>, Vec<u32>) = wanted.iter().partition(|v| **v == p.value);
    let notes = dropped
        .into_iter()
        .map(|v| {
            format!(
                "{} not run: {what} is fixed at {} ({})",
                label(v),
                p.value,
                p.because
            )
        })
        .collect();
    (kept, notes)
}

fn declared_shape(info: &ModelInfo, input: &str) -> String {
    info.input(input)
        .and_then(|i| i.dims.as_ref())
        .map(|dims| {
            let d: Vec<String> = dims.iter().map(ToString::to_string).collect();
            format!("[{}]", d.join(", "))
        })
        .unwrap_or_default()
}
