//! HF BERT-family safetensors + config.json -> ONNX (opset 17), written with
//! handoff's own protobuf types; no Python involved.
//!
//! Inputs `input_ids`, `attention_mask`, `token_type_ids` (i64
//! `[batch, seq]`); outputs `last_hidden_state` (`[batch, seq, hidden]`) and
//! `sentence_embedding` (attention-mask-weighted mean over `seq`, the
//! sentence-transformers pooling). Only ops that ORT, tract and (after
//! lowering LayerNormalization) candle-onnx all have are used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use handoff_onnx::builder::{D, GraphBuilder, attr_float, attr_int, attr_ints, write_model};
use handoff_onnx::inspect::{ElemType, sha256_hex};
use handoff_onnx::lfs::LfsPointer;
use handoff_onnx::proto::ModelProto;
use serde::Deserialize;

use crate::provenance::{Provenance, SourceFile, Step};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("cannot read {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("{path}: field `{field}`: {detail}")]
    Config {
        path: PathBuf,
        field: String,
        detail: String,
    },
    #[error("{path}: tensor `{name}` is missing{hint}")]
    MissingTensor {
        path: PathBuf,
        name: String,
        hint: String,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, config.json implies {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` is {dtype}, only F32 weights are supported")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error(transparent)]
    Write(#[from] handoff_onnx::OnnxError),
    #[error("cannot write provenance next to {path}: {detail}")]
    Provenance { path: PathBuf, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// `0.5 x (1 + erf(x / sqrt 2))` (HF `gelu`).
    Erf,
    /// The tanh approximation (HF `gelu_new`, `gelu_pytorch_tanh`).
    Tanh,
}

/// The encoder family: BERT, or DistilBERT (no token types, no pooler, its
/// own tensor names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bert,
    DistilBert,
}

/// What sits on the encoder: nothing (the sentence-transformers mean
/// pooling becomes `sentence_embedding`), or a sequence-classification
/// head (`logits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    Embedding,
    Classification { labels: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub arch: Arch,
    pub head: Head,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub gelu: Gelu,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    num_labels: Option<usize>,
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
    // DistilBERT's names for the same sizes.
    dim: Option<usize>,
    n_layers: Option<usize>,
    n_heads: Option<usize>,
    hidden_dim: Option<usize>,
    activation: Option<String>,
    sinusoidal_pos_embds: Option<bool>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
}

impl BertConfig {
    pub fn load(path: &Path) -> Result<Self, ConvertError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConvertError::Read {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        if let Some(p) = LfsPointer::parse(text.as_bytes()) {
            return Err(ConvertError::Read {
                path: path.to_owned(),
                detail: format!("it is {p}"),
            });
        }
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConvertError> {
        let err = |field: &str, detail: String| ConvertError::Config {
            path: path.to_owned(),
            field: field.to_owned(),
            detail,
        };
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| err("(file)", format!("not valid JSON config: {e}")))?;
        let arch = match raw.model_type.as_deref() {
            Some("bert") => Arch::Bert,
            Some("distilbert") => Arch::DistilBert,
            Some(other) => {
                return Err(err(
                    "model_type",
                    format!("`{other}` is not supported (supported: bert, distilbert)"),
                ));
            }
            None => {
                return Err(err(
                    "model_type",
                    "missing (supported: bert, distilbert)".into(),
                ));
            }
        };
        let classifier = raw
            .architectures
            .iter()
            .any(|a| a.ends_with("ForSequenceClassification"));
        let head = if classifier {
            let labels = raw
                .id2label
                .as_ref()
                .map(serde_json::Map::len)
                .or(raw.num_labels)
                .unwrap_or(2);
            if labels == 0 {
                return Err(err("id2label", "must name at least one label".into()));
            }
            Head::Classification { labels }
        } else {
            Head::Embedding
        };
        if arch == Arch::DistilBert {
            return Self::distilbert(&raw, head, &err);
        }
        if let Some(p) = raw.position_embedding_type.as_deref()
            && p != "absolute"
        {
            return Err(err(
                "position_embedding_type",
                format!("`{p}` is not supported (supported: absolute)"),
            ));
        }
        let gelu = match raw.hidden_act.as_deref().unwrap_or("gelu") {
            "gelu" => Gelu::Erf,
            "gelu_new" | "gelu_pytorch_tanh" => Gelu::Tanh,
            other => {
                return Err(err(
                    "hidden_act",
                    format!(
                        "`{other}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh)"
                    ),
                ));
            }
        };
        let need = |field: &str, v: Option<usize>| -> Result<usize, ConvertError> {
            match v {
                Some(v) if v > 0 => Ok(v),
                Some(_) => Err(err(field, "must be positive".into())),
                None => Err(err(field, "missing".into())),
            }
        };
        let c = BertConfig {
            arch,
            head,
            vocab_size: need("vocab_size", raw.vocab_size)?,
            hidden_size: need("hidden_size", raw.hidden_size)?,
            num_hidden_layers: need("num_hidden_layers", raw.num_hidden_layers)?,
            num_attention_heads: need("num_attention_heads", raw.num_attention_heads)?,
            intermediate_size: need("intermediate_size", raw.intermediate_size)?,
            max_position_embeddings: need("max_position_embeddings", raw.max_position_embeddings)?,
            type_vocab_size: raw.type_vocab_size.unwrap_or(2),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
            gelu,
        };
        c.heads_divide("num_attention_heads", &err)
    }

    /// DistilBERT's config: `dim`, `n_layers`, `n_heads`, `hidden_dim`,
    /// `activation`; learned positions only.
    fn distilbert(
        raw: &RawConfig,
        head: Head,
        err: &dyn Fn(&str, String) -> ConvertError,
    ) -> Result<Self, ConvertError> {
        if raw.sinusoidal_pos_embds == Some(true) {
            return Err(err(
                "sinusoidal_pos_embds",
                "`true` is not supported (supported: learned position embeddings)".into(),
            ));
        }
        let gelu = match raw.activation.as_deref().unwrap_or("gelu") {
            "gelu" => Gelu::Erf,
            other => {
                return Err(err(
                    "activation",
                    format!("`{other}` is not supported (supported: gelu)"),
                ));
            }
        };
        let need = |field: &str, v: Option<usize>| -> Result<usize, ConvertError> {
            match v {
                Some(v) if v > 0 => Ok(v),
                Some(_) => Err(err(field, "must be positive".into())),
                None => Err(err(field, "missing".into())),
            }
        };
        let c = BertConfig {
            arch: Arch::DistilBert,
            head,
            vocab_size: need("vocab_size", raw.vocab_size)?,
            hidden_size: need("dim", raw.dim)?,
            num_hidden_layers: need("n_layers", raw.n_layers)?,
            num_attention_heads: need("n_heads", raw.n_heads)?,
            intermediate_size: need("hidden_dim", raw.hidden_dim)?,
            max_position_embeddings: need("max_position_embeddings", raw.max_position_embeddings)?,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
            gelu,
        };
        c.heads_divide("n_heads", err)
    }

    fn heads_divide(
        self,
        field: &str,
        err: &dyn Fn(&str, String) -> ConvertError,
    ) -> Result<Self, ConvertError> {
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(err(
                field,
                format!(
                    "hidden size {} is not divisible by {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        Ok(self)
    }

    /// The graph's outputs, last one the model's answer.
    pub fn outputs(&self) -> [&'static str; 2] {
        match self.head {
            Head::Embedding => ["last_hidden_state", "sentence_embedding"],
            Head::Classification { .. } => ["last_hidden_state", "logits"],
        }
    }
}

struct Weights<'a> {
    path: &'a Path,
    st: safetensors::SafeTensors<'a>,
    prefix: &'static str,
    arch: Arch,
}

/// BERT's module names inside a layer and DistilBERT's for the same thing.
const DISTILBERT_LAYER: [(&str, &str); 8] = [
    ("attention.self.query", "attention.q_lin"),
    ("attention.self.key", "attention.k_lin"),
    ("attention.self.value", "attention.v_lin"),
    ("attention.output.dense", "attention.out_lin"),
    ("attention.output.LayerNorm", "sa_layer_norm"),
    ("intermediate.dense", "ffn.lin1"),
    ("output.dense", "ffn.lin2"),
    ("output.LayerNorm", "output_layer_norm"),
];

impl Arch {
    /// The prefix transformers gives the encoder's tensors inside a model
    /// with a head (`bert.`, `distilbert.`); bare encoders have none.
    fn prefix_if(self, headed: bool) -> &'static str {
        match (self, headed) {
            (_, false) => "",
            (Arch::Bert, true) => "bert.",
            (Arch::DistilBert, true) => "distilbert.",
        }
    }
}

/// The file's name for an encoder tensor named as in BERT
/// (`encoder.layer.0.attention.self.query.weight`).
fn source_name(arch: Arch, prefix: &str, name: &str) -> String {
    if arch == Arch::Bert {
        return format!("{prefix}{name}");
    }
    let Some(rest) = name.strip_prefix("encoder.layer.") else {
        return format!("{prefix}{name}");
    };
    let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
    let mapped = DISTILBERT_LAYER
        .iter()
        .find_map(|(bert, distil)| {
            module
                .strip_prefix(bert)
                .filter(|tail| tail.starts_with('.'))
                .map(|tail| format!("{distil}{tail}"))
        })
        .unwrap_or_else(|| module.to_owned());
    format!("{prefix}transformer.layer.{layer}.{mapped}")
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ConvertError> {
        self.get_named(&source_name(self.arch, self.prefix, name), shape)
    }

    /// A tensor by its name in the file (the classification head's, which
    /// sit outside the encoder's prefix).
    fn get_named(&self, full: &str, shape: &[usize]) -> Result<Vec<f32>, ConvertError> {
        let full = full.to_owned();
        let view = self
            .st
            .tensor(&full)
            .map_err(|_| ConvertError::MissingTensor {
                path: self.path.to_owned(),
                name: full.clone(),
                hint: if self.st.names().is_empty() {
                    " (the file holds no tensors)".into()
                } else {
                    String::new()
                },
            })?;
        if view.shape() != shape {
            return Err(ConvertError::Shape {
                path: self.path.to_owned(),
                name: full,
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(ConvertError::Dtype {
                path: self.path.to_owned(),
                name: full,
                dtype: format!("{:?}", view.dtype()),
            });
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// A Linear weight `[out, in]`, transposed to `[in, out]` for MatMul.
    fn linear_t(&self, name: &str, out: usize, inp: usize) -> Result<Vec<f32>, ConvertError> {
        transpose(self.get(name, &[out, inp])?, out, inp)
    }
}

fn transpose(w: Vec<f32>, out: usize, inp: usize) -> Result<Vec<f32>, ConvertError> {
    let mut t = vec![0.0; w.len()];
    for o in 0..out {
        for i in 0..inp {
            t[i * out + o] = w[o * inp + i];
        }
    }
    Ok(t)
}

/// What a converted model was made from.
#[derive(Debug, Clone)]
pub struct HfDir {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub safetensors: PathBuf,
}

impl HfDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            config: dir.join("config.json"),
            safetensors: dir.join("model.safetensors"),
        }
    }
}

/// Builds the ONNX graph from a model directory.
pub fn build(src: &HfDir) -> Result<(ModelProto, BertConfig), ConvertError> {
    let cfg = BertConfig::load(&src.config)?;
    let bytes = std::fs::read(&src.safetensors).map_err(|e| ConvertError::Read {
        path: src.safetensors.clone(),
        detail: e.to_string(),
    })?;
    if let Some(p) = LfsPointer::parse(&bytes) {
        return Err(ConvertError::Read {
            path: src.safetensors.clone(),
            detail: format!("it is {p}"),
        });
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ConvertError::Read {
        path: src.safetensors.clone(),
        detail: format!("not a safetensors file: {e}"),
    })?;
    let wanted = match cfg.arch {
        Arch::Bert => "bert.",
        Arch::DistilBert => "distilbert.",
    };
    let prefix = if st.names().iter().any(|n| n.starts_with(wanted)) {
        wanted
    } else {
        ""
    };
    let w = Weights {
        path: &src.safetensors,
        st,
        prefix,
        arch: cfg.arch,
    };
    Ok((graph(&cfg, &w)?, cfg))
}

fn graph(c: &BertConfig, w: &Weights<'_>) -> Result<ModelProto, ConvertError> {
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let hd = h / heads;
    let mut g = GraphBuilder::new("bert");
    let bs = [D::Sym("batch"), D::Sym("seq")];
    let ids = g.input("input_ids", ElemType::I64, &bs);
    let mask = g.input("attention_mask", ElemType::I64, &bs);
    let types = (c.arch == Arch::Bert).then(|| g.input("token_type_ids", ElemType::I64, &bs));
    let hi = h as i64;

    // Embeddings.
    let word = g.init_f32(
        "embeddings.word_embeddings.weight",
        &[c.vocab_size as i64, hi],
        w.get("embeddings.word_embeddings.weight", &[c.vocab_size, h])?,
    );
    let pos = g.init_f32(
        "embeddings.position_embeddings.weight",
        &[c.max_position_embeddings as i64, hi],
        w.get(
            "embeddings.position_embeddings.weight",
            &[c.max_position_embeddings, h],
        )?,
    );
    let typ = match &types {
        Some(_) => Some(g.init_f32(
            "embeddings.token_type_embeddings.weight",
            &[c.type_vocab_size as i64, hi],
            w.get(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size, h],
            )?,
        )),
        None => None,
    };
    let we = g.node("Gather", &[&word, &ids], vec![]);
    let shape = g.node("Shape", &[&ids], vec![]);
    let one_i = g.init_i64("const_i64_1", &[], vec![1]);
    let zero_i = g.init_i64("const_i64_0", &[], vec![0]);
    let seq = g.node("Gather", &[&shape, &one_i], vec![attr_int("axis", 0)]);
    let pos_ids = g.node("Range", &[&zero_i, &seq, &one_i], vec![]);
    let pe = g.node("Gather", &[&pos, &pos_ids], vec![]);
    let te = match (&typ, &types) {
        (Some(typ), Some(types)) => Some(g.node("Gather", &[typ, types], vec![])),
        _ => None,
    };
    let mut emb = g.node("Add", &[&we, &pe], vec![]);
    if let Some(te) = te {
        emb = g.node("Add", &[&emb, &te], vec![]);
    }
    let mut x = layer_norm(&mut g, w, c, &emb, "embeddings.LayerNorm")?;

    // Additive attention bias: 0 where attended, f32::MIN where masked
    // (torch.finfo(float32).min, as HF and candle-transformers do).
    let mask_f = g.node(
        "Cast",
        &[&mask],
        vec![attr_int("to", ElemType::F32.onnx_code() as i64)],
    );
    let bias_shape = g.init_i64("mask_bias_shape", &[4], vec![0, 1, 1, -1]);
    let m4 = g.node("Reshape", &[&mask_f, &bias_shape], vec![]);
    let one_f = g.init_f32("const_f32_1", &[], vec![1.0]);
    let fmin = g.init_f32("const_f32_min", &[], vec![f32::MIN]);
    let inv = g.node("Sub", &[&one_f, &m4], vec![]);
    let bias = g.node("Mul", &[&inv, &fmin], vec![]);

    let split = g.init_i64(
        "split_heads_shape",
        &[4],
        vec![0, 0, heads as i64, hd as i64],
    );
    let merge = g.init_i64("merge_heads_shape", &[3], vec![0, 0, hi]);
    let scale = g.init_f32("attn_scale", &[], vec![1.0 / (hd as f32).sqrt()]);
    for l in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        let proj = |g: &mut GraphBuilder,
                    x: &str,
                    name: &str,
                    dout: usize,
                    din: usize|
         -> Result<String, ConvertError> {
            let wt = g.init_f32(
                &format!("{name}.weight_t"),
                &[din as i64, dout as i64],
                w.linear_t(&format!("{name}.weight"), dout, din)?,
            );
            let b = g.init_f32(
                &format!("{name}.bias"),
                &[dout as i64],
                w.get(&format!("{name}.bias"), &[dout])?,
            );
            let mm = g.node("MatMul", &[x, &wt], vec![]);
            Ok(g.node("Add", &[&mm, &b], vec![]))
        };
        let heads_of = |g: &mut GraphBuilder, t: &str, perm: &[i64]| {
            let r = g.node("Reshape", &[t, &split], vec![]);
            g.node("Transpose", &[&r], vec![attr_ints("perm", perm)])
        };
        let q = proj(&mut g, &x, &format!("{p}.attention.self.query"), h, h)?;
        let k = proj(&mut g, &x, &format!("{p}.attention.self.key"), h, h)?;
        let v = proj(&mut g, &x, &format!("{p}.attention.self.value"), h, h)?;
        let q = heads_of(&mut g, &q, &[0, 2, 1, 3]);
        let k = heads_of(&mut g, &k, &[0, 2, 3, 1]);
        let v = heads_of(&mut g, &v, &[0, 2, 1, 3]);
        let scores = g.node("MatMul", &[&q, &k], vec![]);
        let scaled = g.node("Mul", &[&scores, &scale], vec![]);
        let masked = g.node("Add", &[&scaled, &bias], vec![]);
        let probs = g.node("Softmax", &[&masked], vec![attr_int("axis", -1)]);
        let ctx = g.node("MatMul", &[&probs, &v], vec![]);
        let ctx = g.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let ctx = g.node("Reshape", &[&ctx, &merge], vec![]);
        let attn = proj(&mut g, &ctx, &format!("{p}.attention.output.dense"), h, h)?;
        let r1 = g.node("Add", &[&attn, &x], vec![]);
        let x1 = layer_norm(
            &mut g,
            w,
            c,
            &r1,
            &format!("{p}.attention.output.LayerNorm"),
        )?;
        let up = proj(
            &mut g,
            &x1,
            &format!("{p}.intermediate.dense"),
            c.intermediate_size,
            h,
        )?;
        let act = gelu(&mut g, &up, c.gelu);
        let down = proj(
            &mut g,
            &act,
            &format!("{p}.output.dense"),
            h,
            c.intermediate_size,
        )?;
        let r2 = g.node("Add", &[&down, &x1], vec![]);
        x = layer_norm(&mut g, w, c, &r2, &format!("{p}.output.LayerNorm"))?;
    }
    g.node_to("Identity", &[&x], vec![], "last_hidden_state");
    g.output(
        "last_hidden_state",
        ElemType::F32,
        &[D::Sym("batch"), D::Sym("seq"), D::Fixed(hi)],
    );
    match c.head {
        Head::Embedding => mean_pooling(&mut g, &x, &mask_f, hi),
        Head::Classification { labels } => classifier(&mut g, w, c, &x, labels)?,
    }
    Ok(g.finish(17))
}

/// The sequence-classification head on the first token: BERT's pooler
/// (dense + tanh) or DistilBERT's pre-classifier (dense + ReLU), then the
/// classifier; output `logits` `[batch, labels]`.
fn classifier(
    g: &mut GraphBuilder,
    w: &Weights<'_>,
    c: &BertConfig,
    x: &str,
    labels: usize,
) -> Result<(), ConvertError> {
    let h = c.hidden_size;
    let zero = g.init_i64("const_i64_0", &[], vec![0]);
    let first = g.node("Gather", &[x, &zero], vec![attr_int("axis", 1)]);
    let dense = |g: &mut GraphBuilder,
                 x: &str,
                 file_name: &str,
                 out: usize|
     -> Result<String, ConvertError> {
        let wt = g.init_f32(
            &format!("{file_name}.weight_t"),
            &[h as i64, out as i64],
            transpose(
                w.get_named(&format!("{file_name}.weight"), &[out, h])?,
                out,
                h,
            )?,
        );
        let b = g.init_f32(
            &format!("{file_name}.bias"),
            &[out as i64],
            w.get_named(&format!("{file_name}.bias"), &[out])?,
        );
        let mm = g.node("MatMul", &[x, &wt], vec![]);
        Ok(g.node("Add", &[&mm, &b], vec![]))
    };
    let pooled = match c.arch {
        Arch::Bert => {
            let d = dense(g, &first, &format!("{}pooler.dense", w.prefix), h)?;
            g.node("Tanh", &[&d], vec![])
        }
        Arch::DistilBert => {
            let d = dense(g, &first, "pre_classifier", h)?;
            g.node("Relu", &[&d], vec![])
        }
    };
    let logits = dense(g, &pooled, "classifier", labels)?;
    g.node_to("Identity", &[&logits], vec![], "logits");
    g.output(
        "logits",
        ElemType::F32,
        &[D::Sym("batch"), D::Fixed(labels as i64)],
    );
    Ok(())
}

/// `sentence_embedding`: the mean of the attended tokens' states,
/// (mask @ x) / sum(mask), as sentence-transformers pools.
fn mean_pooling(g: &mut GraphBuilder, x: &str, mask_f: &str, hi: i64) {
    let row_shape = g.init_i64("mask_row_shape", &[3], vec![0, 1, -1]);
    let m_row = g.node("Reshape", &[mask_f, &row_shape], vec![]);
    let summed = g.node("MatMul", &[&m_row, x], vec![]);
    let axes1 = g.init_i64("axes_1", &[1], vec![1]);
    let count = g.node(
        "ReduceSum",
        &[mask_f, &axes1],
        vec![attr_int("keepdims", 1)],
    );
    let tiny = g.init_f32("const_f32_tiny", &[], vec![1e-9]);
    // Clip, not Max: candle-onnx lacks Max.
    let count = g.node("Clip", &[&count, &tiny], vec![]);
    let pooled_shape = g.init_i64("pooled_shape", &[2], vec![0, hi]);
    let summed2 = g.node("Reshape", &[&summed, &pooled_shape], vec![]);
    g.node_to("Div", &[&summed2, &count], vec![], "sentence_embedding");
    g.output(
        "sentence_embedding",
        ElemType::F32,
        &[D::Sym("batch"), D::Fixed(hi)],
    );
}

fn layer_norm(
    g: &mut GraphBuilder,
    w: &Weights<'_>,
    c: &BertConfig,
    x: &str,
    name: &str,
) -> Result<String, ConvertError> {
    let h = c.hidden_size;
    let gamma = g.init_f32(
        &format!("{name}.weight"),
        &[h as i64],
        w.get(&format!("{name}.weight"), &[h])?,
    );
    let beta = g.init_f32(
        &format!("{name}.bias"),
        &[h as i64],
        w.get(&format!("{name}.bias"), &[h])?,
    );
    Ok(g.node(
        "LayerNormalization",
        &[x, &gamma, &beta],
        vec![
            attr_int("axis", -1),
            attr_float("epsilon", c.layer_norm_eps as f32),
        ],
    ))
}

fn gelu(g: &mut GraphBuilder, x: &str, kind: Gelu) -> String {
    let half = g.init_f32("const_f32_half", &[], vec![0.5]);
    let one = g.init_f32("const_f32_1", &[], vec![1.0]);
    let inner = match kind {
        Gelu::Erf => {
            let sqrt2 = g.init_f32("const_f32_sqrt2", &[], vec![std::f32::consts::SQRT_2]);
            let d = g.node("Div", &[x, &sqrt2], vec![]);
            g.node("Erf", &[&d], vec![])
        }
        Gelu::Tanh => {
            let k = g.init_f32("const_f32_gelu_k", &[], vec![0.044_715]);
            let s = g.init_f32(
                "const_f32_sqrt_2_over_pi",
                &[],
                vec![(2.0 / std::f32::consts::PI).sqrt()],
            );
            let x2 = g.node("Mul", &[x, x], vec![]);
            let x3 = g.node("Mul", &[&x2, x], vec![]);
            let kx3 = g.node("Mul", &[&x3, &k], vec![]);
            let sum = g.node("Add", &[x, &kx3], vec![]);
            let arg = g.node("Mul", &[&sum, &s], vec![]);
            g.node("Tanh", &[&arg], vec![])
        }
    };
    let plus = g.node("Add", &[&inner, &one], vec![]);
    let m = g.node("Mul", &[x, &plus], vec![]);
    g.node("Mul", &[&m, &half], vec![])
}

/// Converts and writes `out` plus its provenance sidecar. The model is
/// written to a temporary file and renamed, so a failure leaves nothing.
pub fn convert(src: &HfDir, out: &Path) -> Result<Provenance, ConvertError> {
    let (model, cfg) = build(src)?;
    write_model(&model, out)?;
    let bytes = std::fs::read(out).map_err(|e| ConvertError::Read {
        path: out.to_owned(),
        detail: e.to_string(),
    })?;
    let file_sha = |p: &Path| -> Result<SourceFile, ConvertError> {
        let b = std::fs::read(p).map_err(|e| ConvertError::Read {
            path: p.to_owned(),
            detail: e.to_string(),
        })?;
        Ok(SourceFile {
            path: p.to_owned(),
            sha256: sha256_hex(&b),
        })
    };
    let prov = Provenance {
        tool: crate::CONVERTER_VERSION.into(),
        sources: vec![file_sha(&src.config)?, file_sha(&src.safetensors)?],
        steps: vec![Step {
            name: "hf-bert-to-onnx".into(),
            params: serde_json::json!({
                "opset": 17,
                "hidden_size": cfg.hidden_size,
                "layers": cfg.num_hidden_layers,
                "heads": cfg.num_attention_heads,
                "intermediate_size": cfg.intermediate_size,
                "gelu": format!("{:?}", cfg.gelu),
                "layer_norm_eps": cfg.layer_norm_eps,
                "arch": format!("{:?}", cfg.arch),
                "outputs": cfg.outputs(),
            }),
        }],
        output_sha256: sha256_hex(&bytes),
        size_bytes: bytes.len() as u64,
        checks: vec![],
    };
    prov.save(out).map_err(|e| ConvertError::Provenance {
        path: out.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(prov)
}

/// Writes a random BERT (config.json + model.safetensors) for tests.
pub fn write_tiny_bert(
    dir: &Path,
    hidden: usize,
    layers: usize,
    heads: usize,
    seed: u64,
) -> std::io::Result<()> {
    RandomModel {
        arch: Arch::Bert,
        labels: None,
        hidden,
        layers,
        heads,
        vocab: 100,
        max_positions: 64,
        scale: 0.1,
        seed,
    }
    .write(dir)
}

/// A model with seeded random weights in an HF directory (config.json +
/// model.safetensors), named as transformers names them: for tests, and as
/// a stand-in of real size where no trained model is at hand (its outputs
/// mean nothing; only its speed does).
#[derive(Debug, Clone)]
pub struct RandomModel {
    pub arch: Arch,
    /// `Some(n)`: a `...ForSequenceClassification` with `n` labels.
    pub labels: Option<usize>,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub vocab: usize,
    pub max_positions: usize,
    /// Weights are uniform in `[-scale, scale]` (LayerNorm gains around 1).
    pub scale: f32,
    pub seed: u64,
}

impl RandomModel {
    /// distilbert-base-uncased's sizes (66M parameters, the BERT uncased
    /// vocabulary) with a two-label classification head.
    pub fn distilbert_base_classifier(seed: u64) -> Self {
        Self {
            arch: Arch::DistilBert,
            labels: Some(2),
            hidden: 768,
            layers: 6,
            heads: 12,
            vocab: 30522,
            max_positions: 512,
            // About the 0.02 standard deviation transformers initialises with.
            scale: 0.035,
            seed,
        }
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let (hidden, inter) = (self.hidden, self.hidden * 4);
        let (vocab, maxpos, types) = (self.vocab, self.max_positions, 2);
        let labels: serde_json::Map<String, serde_json::Value> = (0..self.labels.unwrap_or(0))
            .map(|i| (i.to_string(), format!("LABEL_{i}").into()))
            .collect();
        let mut config = match self.arch {
            Arch::Bert => serde_json::json!({
                "model_type": "bert", "architectures": [if self.labels.is_some() { "BertForSequenceClassification" } else { "BertModel" }],
                "vocab_size": vocab, "hidden_size": hidden,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "intermediate_size": inter,
                "hidden_act": "gelu", "max_position_embeddings": maxpos, "type_vocab_size": types,
                "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                "initializer_range": 0.02, "pad_token_id": 0, "position_embedding_type": "absolute"
            }),
            Arch::DistilBert => serde_json::json!({
                "model_type": "distilbert", "architectures": [if self.labels.is_some() { "DistilBertForSequenceClassification" } else { "DistilBertModel" }],
                "vocab_size": vocab, "dim": hidden, "n_layers": self.layers, "n_heads": self.heads,
                "hidden_dim": inter, "activation": "gelu", "max_position_embeddings": maxpos,
                "sinusoidal_pos_embds": false, "dropout": 0.0, "attention_dropout": 0.0,
                "seq_classif_dropout": 0.0, "qa_dropout": 0.0, "initializer_range": 0.02, "pad_token_id": 0
            }),
        };
        if self.labels.is_some() {
            let ids: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .map(|(i, l)| {
                    (
                        l.as_str().unwrap_or_default().to_owned(),
                        i.parse::<u64>().unwrap_or(0).into(),
                    )
                })
                .collect();
            config["id2label"] = labels.into();
            config["label2id"] = ids.into();
        }
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        let w = |canonical: &str| {
            source_name(
                self.arch,
                self.arch.prefix_if(self.labels.is_some()),
                canonical,
            )
        };
        let mut tensors: Vec<(String, Vec<usize>)> = vec![
            (w("embeddings.word_embeddings.weight"), vec![vocab, hidden]),
            (
                w("embeddings.position_embeddings.weight"),
                vec![maxpos, hidden],
            ),
        ];
        if self.arch == Arch::Bert {
            tensors.push((
                w("embeddings.token_type_embeddings.weight"),
                vec![types, hidden],
            ));
        }
        tensors.push((w("embeddings.LayerNorm.weight"), vec![hidden]));
        tensors.push((w("embeddings.LayerNorm.bias"), vec![hidden]));
        for l in 0..self.layers {
            let p = format!("encoder.layer.{l}");
            for (n, s) in [
                ("attention.self.query", vec![hidden, hidden]),
                ("attention.self.key", vec![hidden, hidden]),
                ("attention.self.value", vec![hidden, hidden]),
                ("attention.output.dense", vec![hidden, hidden]),
                ("intermediate.dense", vec![inter, hidden]),
                ("output.dense", vec![hidden, inter]),
            ] {
                let out = s[0];
                tensors.push((w(&format!("{p}.{n}.weight")), s));
                tensors.push((w(&format!("{p}.{n}.bias")), vec![out]));
            }
            for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                tensors.push((w(&format!("{p}.{n}.weight")), vec![hidden]));
                tensors.push((w(&format!("{p}.{n}.bias")), vec![hidden]));
            }
        }
        if let Some(n) = self.labels {
            let pre = match self.arch {
                Arch::Bert => "bert.pooler.dense",
                Arch::DistilBert => "pre_classifier",
            };
            tensors.push((format!("{pre}.weight"), vec![hidden, hidden]));
            tensors.push((format!("{pre}.bias"), vec![hidden]));
            tensors.push(("classifier.weight".into(), vec![n, hidden]));
            tensors.push(("classifier.bias".into(), vec![n]));
        }
        let mut rng = handoff_onnx::rng::SplitMix64::new(self.seed);
        let scale = self.scale;
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let is_gamma = name.ends_with("LayerNorm.weight");
                let vals: Vec<f32> = (0..n)
                    .map(|_| {
                        if is_gamma {
                            1.0 + rng.uniform(-0.1, 0.1)
                        } else {
                            rng.uniform(-scale, scale)
                        }
                    })
                    .collect();
                (
                    name,
                    shape,
                    vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .expect("sizes match"),
                )
            })
            .collect();
        safetensors::serialize_to_file(
            views,
            None::<HashMap<String, String>>,
            &dir.join("model.safetensors"),
        )
        .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_err(json: &str) -> String {
        BertConfig::parse(Path::new("config.json"), json)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unsupported_configs_name_the_field() {
        assert_eq!(
            cfg_err(r#"{"model_type": "gpt2"}"#),
            "config.json: field `model_type`: `gpt2` is not supported (supported: bert, distilbert)"
        );
        assert!(
            cfg_err(r#"{"model_type": "bert", "hidden_act": "silu"}"#)
                .contains("field `hidden_act`: `silu` is not supported")
        );
        assert!(
            cfg_err(r#"{"model_type": "bert", "position_embedding_type": "relative_key"}"#)
                .contains("position_embedding_type")
        );
        assert!(
            cfg_err(r#"{"model_type": "bert", "vocab_size": 10}"#)
                .contains("field `hidden_size`: missing")
        );
        assert!(cfg_err(
            r#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 10, "num_hidden_layers": 1, "num_attention_heads": 3, "intermediate_size": 4, "max_position_embeddings": 8}"#
        )
        .contains("not divisible"));
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), 8, 1, 2, 1).unwrap();
        // A config whose intermediate size disagrees with the weights.
        let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            cfg.replace("\"intermediate_size\": 32", "\"intermediate_size\": 30"),
        )
        .unwrap();
        let out = dir.path().join("m.onnx");
        let err = convert(&HfDir::new(dir.path()), &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor `encoder.layer.0.intermediate.dense.weight` has shape [32, 8], config.json implies [30, 8]"), "{err}");
        assert!(!out.exists());
        std::fs::write(
            dir.path().join("config.json"),
            cfg.replace("\"num_hidden_layers\": 1", "\"num_hidden_layers\": 2"),
        )
        .unwrap();
        let err = convert(&HfDir::new(dir.path()), &out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor `encoder.layer.1.attention.self.query.weight` is missing"),
            "{err}"
        );
        assert!(!out.exists());
        // Weights left in Git LFS (a checkout without the objects).
        std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
        std::fs::write(
            dir.path().join("model.safetensors"),
            "version https://git-lfs.github.com/spec/v1\noid sha256:53aa51172d142c89\nsize 90868376\n",
        )
        .unwrap();
        let err = convert(&HfDir::new(dir.path()), &out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "model.safetensors: it is a Git LFS pointer (object sha256:53aa5117…, 90.9 MB)"
            ),
            "{err}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn distilbert_classifiers_convert_and_missing_tensors_are_named_as_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let model = RandomModel {
            arch: Arch::DistilBert,
            labels: Some(2),
            hidden: 8,
            layers: 1,
            heads: 2,
            vocab: 20,
            max_positions: 16,
            scale: 0.1,
            seed: 3,
        };
        model.write(dir.path()).unwrap();
        let out = dir.path().join("m.onnx");
        convert(&HfDir::new(dir.path()), &out).unwrap();
        let info = handoff_onnx::ModelInfo::load(&out).unwrap();
        let names: Vec<&str> = info.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["input_ids", "attention_mask"]);
        let outs: Vec<String> = info.outputs.iter().map(ToString::to_string).collect();
        assert_eq!(
            outs,
            [
                "last_hidden_state: f32[batch, seq, 8]",
                "logits: f32[batch, 2]"
            ]
        );
        // One layer more than the file holds: the error names the tensor
        // as DistilBERT's file does.
        let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            cfg.replace("\"n_layers\": 1", "\"n_layers\": 2"),
        )
        .unwrap();
        let err = convert(&HfDir::new(dir.path()), &out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "tensor `distilbert.transformer.layer.1.attention.q_lin.weight` is missing"
            ),
            "{err}"
        );
        assert!(
            cfg_err(r#"{"model_type": "distilbert", "vocab_size": 10, "dim": 8, "n_layers": 1, "n_heads": 2, "hidden_dim": 4, "max_position_embeddings": 8, "sinusoidal_pos_embds": true}"#)
                .contains("field `sinusoidal_pos_embds`")
        );
    }

    #[test]
    fn converted_model_has_the_promised_interface() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), 8, 2, 2, 1).unwrap();
        let out = dir.path().join("m.onnx");
        let prov = convert(&HfDir::new(dir.path()), &out).unwrap();
        let info = handoff_onnx::ModelInfo::load(&out).unwrap();
        let names: Vec<&str> = info.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"]);
        let outs: Vec<String> = info.outputs.iter().map(ToString::to_string).collect();
        assert_eq!(
            outs,
            [
                "last_hidden_state: f32[batch, seq, 8]",
                "sentence_embedding: f32[batch, 8]"
            ]
        );
        assert!(info.ops.contains("LayerNormalization"));
        assert_eq!(prov.output_sha256, info.sha256);
        assert!(Provenance::load(&out).is_some());
    }
}
