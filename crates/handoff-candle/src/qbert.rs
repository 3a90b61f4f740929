//! BERT with candle's own quantised matmuls (GGML block formats, e.g. Q8_0:
//! blocks of 32 int8 weights sharing one f16 scale), quantised from the fp32
//! safetensors at load. candle has no int8 tensor type, so an ONNX int8 graph
//! is `unsupported` on candle; this is candle's int8 answer. Embeddings,
//! LayerNorm, softmax and the attention products stay fp32, as in
//! candle-transformers' quantised models.

use crate::models::bert::{Config, HiddenAct};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

/// Linear layer with a quantised weight.
struct QLinear {
    weight: QMatMul,
    bias: Tensor,
}

impl QLinear {
    fn load(vb: VarBuilder, inp: usize, out: usize, dtype: GgmlDType) -> Result<Self> {
        let w = vb.get((out, inp), "weight")?;
        let weight = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
        Ok(Self {
            weight,
            bias: vb.get(out, "bias")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.forward(x)?.broadcast_add(&self.bias)
    }
}

struct Layer {
    q: QLinear,
    k: QLinear,
    v: QLinear,
    attn_out: QLinear,
    attn_norm: LayerNorm,
    up: QLinear,
    down: QLinear,
    out_norm: LayerNorm,
}

pub struct QBert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    act: HiddenAct,
}

fn norm(vb: VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        eps,
    ))
}

impl QBert {
    /// `vb` at the model root (the one holding `embeddings` and `encoder`,
    /// or `bert.` prefixed ones).
    pub fn load(vb: VarBuilder, config: &Config, dtype: GgmlDType) -> Result<Self> {
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let h = config.hidden_size;
        let e = vb.pp("embeddings");
        let emb = |name: &str, n: usize| -> Result<Embedding> {
            Ok(Embedding::new(e.pp(name).get((n, h), "weight")?, h))
        };
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                Ok(Layer {
                    q: QLinear::load(a.pp("self.query"), h, h, dtype)?,
                    k: QLinear::load(a.pp("self.key"), h, h, dtype)?,
                    v: QLinear::load(a.pp("self.value"), h, h, dtype)?,
                    attn_out: QLinear::load(a.pp("output.dense"), h, h, dtype)?,
                    attn_norm: norm(a.pp("output.LayerNorm"), h, eps)?,
                    up: QLinear::load(
                        l.pp("intermediate.dense"),
                        h,
                        config.intermediate_size,
                        dtype,
                    )?,
                    down: QLinear::load(l.pp("output.dense"), config.intermediate_size, h, dtype)?,
                    out_norm: norm(l.pp("output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: emb("word_embeddings", config.vocab_size)?,
            position: emb("position_embeddings", config.max_position_embeddings)?,
            token_type: emb("token_type_embeddings", config.type_vocab_size)?,
            embed_norm: norm(e.pp("LayerNorm"), h, eps)?,
            layers,
            heads: config.num_attention_heads,
            act: config.hidden_act,
        })
    }

    /// Last hidden state `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let mut x = self
            .word
            .forward(ids)?
            .add(&self.token_type.forward(types)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        x = self.embed_norm.forward(&x)?;
        // Additive mask: 0 where attended, f32::MIN where padded.
        let m = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
        let bias = ((m.ones_like()? - &m)? * f64::from(f32::MIN))?;
        let hidden = x.dim(D::Minus1)?;
        let hd = hidden / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, seq, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        for l in &self.layers {
            let q = split(l.q.forward(&x)?)?;
            let k = split(l.k.forward(&x)?)?;
            let v = split(l.v.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((batch, seq, hidden))?;
            x = l.attn_norm.forward(&(l.attn_out.forward(&ctx)? + &x)?)?;
            let up = l.up.forward(&x)?;
            let up = match self.act {
                HiddenAct::Gelu => up.gelu_erf()?,
                HiddenAct::GeluApproximate => up.gelu()?,
                HiddenAct::Relu => up.relu()?,
            };
            x = l.out_norm.forward(&(l.down.forward(&up)? + &x)?)?;
        }
        Ok(x)
    }
}

/// The GGML block format for a variant name (`candle-q8` -> Q8_0, blocks
/// of 32: every BERT width is a multiple of it; K-quants need 256).
pub fn ggml_dtype(variant: &str) -> Option<GgmlDType> {
    match variant {
        "candle-q8" => Some(GgmlDType::Q8_0),
        _ => None,
    }
}
