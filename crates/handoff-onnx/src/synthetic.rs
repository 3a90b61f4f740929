//! Synthetic models generated from a seed: real graphs with real compute
//! (MLP, conv net, transformer encoder block), small enough to generate in
//! milliseconds and never committed.
//!
//! All weights are drawn uniformly in ±sqrt(3/fan_in) (variance 1/fan_in), so
//! activations keep a unit scale through the layers and parity tolerances
//! mean the same thing for every model.

use crate::builder::{D, GraphBuilder, attr_float, attr_int, attr_ints};
use crate::inspect::ElemType;
use crate::proto::ModelProto;
use crate::rng::SplitMix64;

/// The synthetic model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Mlp,
    Conv,
    Encoder,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Mlp, Kind::Conv, Kind::Encoder];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mlp => "mlp",
            Kind::Conv => "conv",
            Kind::Encoder => "encoder",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Size knobs; `width` is the hidden size (MLP, encoder) or base channel
/// count (conv), `depth` the number of hidden layers or blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SyntheticSpec {
    pub kind: Kind,
    pub width: i64,
    pub depth: i64,
    pub seed: u64,
}

impl SyntheticSpec {
    /// A stable text identity, used in cache file names.
    pub fn id(&self) -> String {
        format!(
            "{}-w{}-d{}-s{}",
            self.kind.name(),
            self.width,
            self.depth,
            self.seed
        )
    }

    pub fn build(&self) -> ModelProto {
        match self.kind {
            Kind::Mlp => mlp(self.width, self.depth, self.seed),
            Kind::Conv => conv(self.width, self.depth, self.seed),
            Kind::Encoder => encoder(self.width, self.depth, self.seed),
        }
    }
}

struct Weights(SplitMix64);

impl Weights {
    fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    fn fan_in(&mut self, fan_in: i64, n: usize) -> Vec<f32> {
        let a = (3.0 / fan_in as f32).sqrt();
        (0..n).map(|_| self.0.uniform(-a, a)).collect()
    }

    fn small(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.0.uniform(-0.1, 0.1)).collect()
    }
}

fn linear(
    g: &mut GraphBuilder,
    w: &mut Weights,
    x: &str,
    name: &str,
    din: i64,
    dout: i64,
) -> String {
    let wn = g.init_f32(
        &format!("{name}.weight"),
        &[din, dout],
        w.fan_in(din, (din * dout) as usize),
    );
    let bn = g.init_f32(&format!("{name}.bias"), &[dout], w.small(dout as usize));
    let mm = g.node("MatMul", &[x, &wn], vec![]);
    g.node("Add", &[&mm, &bn], vec![])
}

/// `x[batch, width] -> (Linear, Relu) x depth -> Linear -> y[batch, width]`,
/// hidden layers 4x wider.
fn mlp(width: i64, depth: i64, seed: u64) -> ModelProto {
    let mut g = GraphBuilder::new("mlp");
    let mut w = Weights::new(seed);
    let mut x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(width)]);
    let hidden = width * 4;
    let mut din = width;
    for i in 0..depth {
        let h = linear(&mut g, &mut w, &x, &format!("fc{i}"), din, hidden);
        x = g.node("Relu", &[&h], vec![]);
        din = hidden;
    }
    let y = linear(&mut g, &mut w, &x, "head", din, width);
    g.node_to("Identity", &[&y], vec![], "y");
    g.output("y", ElemType::F32, &[D::Sym("batch"), D::Fixed(width)]);
    g.finish(17)
}

/// `y = x[n, n] @ W[n, n]`: one square matrix product, the machine's
/// attainable peak for the roofline (2n^3 FLOPs per run).
pub fn matmul(n: i64, seed: u64) -> ModelProto {
    let mut g = GraphBuilder::new("matmul");
    let mut w = Weights::new(seed);
    let x = g.input("x", ElemType::F32, &[D::Fixed(n), D::Fixed(n)]);
    let weight = g.init_f32("w", &[n, n], w.fan_in(n, (n * n) as usize));
    g.node_to("MatMul", &[&x, &weight], vec![], "y");
    g.output("y", ElemType::F32, &[D::Fixed(n), D::Fixed(n)]);
    g.finish(17)
}

/// `image[batch, 3, 64, 64] -> (Conv3x3, Relu, MaxPool2) x depth ->
/// mean over H, W -> Linear -> logits[batch, 10]`. The spatial mean is a
/// ReduceMean rather than GlobalAveragePool, which candle-onnx lacks.
fn conv(width: i64, depth: i64, seed: u64) -> ModelProto {
    let mut g = GraphBuilder::new("conv");
    let mut w = Weights::new(seed);
    let mut x = g.input(
        "image",
        ElemType::F32,
        &[D::Sym("batch"), D::Fixed(3), D::Fixed(64), D::Fixed(64)],
    );
    let mut cin = 3;
    for i in 0..depth {
        let cout = width << i;
        let fan_in = cin * 9;
        let wn = g.init_f32(
            &format!("conv{i}.weight"),
            &[cout, cin, 3, 3],
            w.fan_in(fan_in, (cout * fan_in) as usize),
        );
        let bn = g.init_f32(&format!("conv{i}.bias"), &[cout], w.small(cout as usize));
        let c = g.node(
            "Conv",
            &[&x, &wn, &bn],
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ],
        );
        let r = g.node("Relu", &[&c], vec![]);
        x = g.node(
            "MaxPool",
            &[&r],
            vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
            ],
        );
        cin = cout;
    }
    let pooled = g.node(
        "ReduceMean",
        &[&x],
        vec![attr_ints("axes", &[2, 3]), attr_int("keepdims", 0)],
    );
    let logits = linear(&mut g, &mut w, &pooled, "head", cin, 10);
    g.node_to("Identity", &[&logits], vec![], "logits");
    g.output("logits", ElemType::F32, &[D::Sym("batch"), D::Fixed(10)]);
    g.finish(17)
}

/// `hidden[batch, seq, width] -> pre-LN transformer encoder blocks x depth`
/// (4 heads, MLP 4x, GELU via Erf, LayerNormalization), the shape of a BERT
/// layer. Uses LayerNormalization on purpose: a backend that lacks it must say
/// so in its result cell.
fn encoder(width: i64, depth: i64, seed: u64) -> ModelProto {
    let heads = 4;
    let head_dim = width / heads;
    let mut g = GraphBuilder::new("encoder");
    let mut w = Weights::new(seed);
    let mut x = g.input(
        "hidden",
        ElemType::F32,
        &[D::Sym("batch"), D::Sym("seq"), D::Fixed(width)],
    );
    let split_shape = g.init_i64("split_heads_shape", &[4], vec![0, 0, heads, head_dim]);
    let merge_shape = g.init_i64("merge_heads_shape", &[3], vec![0, 0, width]);
    let scale = g.init_f32("attn_scale", &[], vec![1.0 / (head_dim as f32).sqrt()]);
    let sqrt2 = g.init_f32("sqrt2", &[], vec![std::f32::consts::SQRT_2]);
    let one = g.init_f32("one", &[], vec![1.0]);
    let half = g.init_f32("half", &[], vec![0.5]);
    for l in 0..depth {
        let ln = |g: &mut GraphBuilder, x: &str, name: &str| {
            let gamma = g.init_f32(
                &format!("{name}.gamma"),
                &[width],
                vec![1.0; width as usize],
            );
            let beta = g.init_f32(&format!("{name}.beta"), &[width], vec![0.0; width as usize]);
            g.node(
                "LayerNormalization",
                &[x, &gamma, &beta],
                vec![attr_int("axis", -1), attr_float("epsilon", 1e-5)],
            )
        };
        let h = ln(&mut g, &x, &format!("l{l}.ln1"));
        let heads_of = |g: &mut GraphBuilder, w: &mut Weights, name: &str, perm: &[i64]| {
            let p = linear(g, w, &h, &format!("l{l}.{name}"), width, width);
            let r = g.node("Reshape", &[&p, &split_shape], vec![]);
            g.node("Transpose", &[&r], vec![attr_ints("perm", perm)])
        };
        let q = heads_of(&mut g, &mut w, "q", &[0, 2, 1, 3]);
        let k = heads_of(&mut g, &mut w, "k", &[0, 2, 3, 1]);
        let v = heads_of(&mut g, &mut w, "v", &[0, 2, 1, 3]);
        let scores = g.node("MatMul", &[&q, &k], vec![]);
        let scaled = g.node("Mul", &[&scores, &scale], vec![]);
        let probs = g.node("Softmax", &[&scaled], vec![attr_int("axis", -1)]);
        let ctx = g.node("MatMul", &[&probs, &v], vec![]);
        let ctx = g.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let ctx = g.node("Reshape", &[&ctx, &merge_shape], vec![]);
        let attn = linear(&mut g, &mut w, &ctx, &format!("l{l}.o"), width, width);
        let x1 = g.node("Add", &[&x, &attn], vec![]);
        let h2 = ln(&mut g, &x1, &format!("l{l}.ln2"));
        let up = linear(&mut g, &mut w, &h2, &format!("l{l}.up"), width, width * 4);
        // GELU(x) = 0.5 x (1 + erf(x / sqrt 2))
        let d = g.node("Div", &[&up, &sqrt2], vec![]);
        let e = g.node("Erf", &[&d], vec![]);
        let e1 = g.node("Add", &[&e, &one], vec![]);
        let m = g.node("Mul", &[&up, &e1], vec![]);
        let gelu = g.node("Mul", &[&m, &half], vec![]);
        let down = linear(
            &mut g,
            &mut w,
            &gelu,
            &format!("l{l}.down"),
            width * 4,
            width,
        );
        x = g.node("Add", &[&x1, &down], vec![]);
    }
    g.node_to("Identity", &[&x], vec![], "out");
    g.output(
        "out",
        ElemType::F32,
        &[D::Sym("batch"), D::Sym("seq"), D::Fixed(width)],
    );
    g.finish(17)
}
