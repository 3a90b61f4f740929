//! Host tensors that cross the backend interface, how inputs are filled, and
//! how outputs are compared.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use handoff_onnx::rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// Element types handoff feeds to models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    /// Half precision (an fp16 export's float inputs): filled as f32 and
    /// rounded to the nearest f16.
    F16,
    I64,
    I32,
    /// Masks (`key_padding_mask` of a PyTorch Transformer): filled as an
    /// i64 input would be, non-zero is true.
    Bool,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::Bool => "bool",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    /// Values as f64, for comparisons.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::F16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| f64::from(u8::from(x))).collect(),
        }
    }

    /// The values as little-endian bytes, as ONNX raw data, safetensors and
    /// numpy's `<f4`/`<f2`/`<i8`/`<i4`/`|b1` lay them out (a bool a byte).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| u8::from(x)).collect(),
        }
    }

    /// Values of `dtype` from little-endian bytes; `None` when `raw` is not
    /// a whole number of them.
    pub fn from_le_bytes(dtype: DType, raw: &[u8]) -> Option<Self> {
        fn chunks<const N: usize, T>(raw: &[u8], f: fn([u8; N]) -> T) -> Option<Vec<T>> {
            raw.len().is_multiple_of(N).then(|| {
                raw.chunks_exact(N)
                    .map(|c| f(c.try_into().expect("N bytes")))
                    .collect()
            })
        }
        Some(match dtype {
            DType::F32 => TensorData::F32(chunks(raw, f32::from_le_bytes)?),
            DType::F16 => TensorData::F16(chunks(raw, half::f16::from_le_bytes)?),
            DType::I64 => TensorData::I64(chunks(raw, i64::from_le_bytes)?),
            DType::I32 => TensorData::I32(chunks(raw, i32::from_le_bytes)?),
            DType::Bool => TensorData::Bool(raw.iter().map(|&b| b != 0).collect()),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// How an input tensor is filled. Every fill is a pure function of the seed,
/// so the reference and every backend see identical inputs, even in
/// different processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fill {
    /// Uniform floats in [min, max).
    Random {
        min: f64,
        max: f64,
    },
    /// Uniform integers in [min, max).
    RandomInt {
        min: i64,
        max: i64,
    },
    Constant(f64),
    /// Explicit values (token ids from a tokenizer), repeated if shorter
    /// than the tensor.
    Values(Vec<i64>),
    /// A serialised `TensorProto` (ONNX test data, `input_K.pb`), checked
    /// against the spec's dtype and shape when the plan is built.
    File(std::path::PathBuf),
}

/// A concrete input: every dimension known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub fill: Fill,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Generates the tensor from a seed mixed with the input's name.
    pub fn generate(&self, seed: u64) -> Tensor {
        let mut rng = SplitMix64::new(seed ^ fnv1a(self.name.as_bytes()));
        let n = self.numel();
        // Half-precision inputs draw the same values as f32 ones, rounded;
        // masks those of i64 ones, non-zero true.
        let drawn = match self.dtype {
            DType::F16 => DType::F32,
            DType::Bool => DType::I64,
            other => other,
        };
        let data = match (drawn, &self.fill) {
            (_, Fill::File(path)) => {
                // The plan read and checked the file; failing here means it
                // changed since, which no input can stand in for.
                let t = read_pb(path).unwrap_or_else(|e| panic!("input `{}`: {e}", self.name));
                assert_eq!(
                    (t.data.dtype(), &t.shape),
                    (self.dtype, &self.shape),
                    "{} changed since the plan was built",
                    path.display()
                );
                t.data
            }
            (dtype, Fill::Values(v)) => {
                let at = |i: usize| if v.is_empty() { 0 } else { v[i % v.len()] };
                match dtype {
                    DType::F32 | DType::F16 => {
                        TensorData::F32((0..n).map(|i| at(i) as f32).collect())
                    }
                    DType::I64 | DType::Bool => TensorData::I64((0..n).map(at).collect()),
                    DType::I32 => TensorData::I32((0..n).map(|i| at(i) as i32).collect()),
                }
            }
            (DType::F32, Fill::Random { min, max }) => TensorData::F32(
                (0..n)
                    .map(|_| (*min + (*max - *min) * rng.next_f64()) as f32)
                    .collect(),
            ),
            (DType::F32, Fill::RandomInt { min, max }) => {
                TensorData::F32((0..n).map(|_| rng.range_i64(*min, *max) as f32).collect())
            }
            (DType::F32, Fill::Constant(c)) => TensorData::F32(vec![*c as f32; n]),
            (DType::I64, Fill::Constant(c)) => TensorData::I64(vec![*c as i64; n]),
            (DType::I32, Fill::Constant(c)) => TensorData::I32(vec![*c as i32; n]),
            (DType::I64, Fill::RandomInt { min, max }) => {
                TensorData::I64((0..n).map(|_| rng.range_i64(*min, *max)).collect())
            }
            (DType::I32, Fill::RandomInt { min, max }) => {
                TensorData::I32((0..n).map(|_| rng.range_i64(*min, *max) as i32).collect())
            }
            (DType::I64, Fill::Random { min, max }) => TensorData::I64(
                (0..n)
                    .map(|_| rng.range_i64(min.floor() as i64, max.ceil() as i64))
                    .collect(),
            ),
            (DType::I32, Fill::Random { min, max }) => TensorData::I32(
                (0..n)
                    .map(|_| rng.range_i64(min.floor() as i64, max.ceil() as i64) as i32)
                    .collect(),
            ),
            (DType::F16 | DType::Bool, _) => unreachable!("drawn as f32 or i64"),
        };
        let data = match data {
            TensorData::F32(v) if self.dtype == DType::F16 => {
                TensorData::F16(v.into_iter().map(half::f16::from_f32).collect())
            }
            TensorData::I64(v) if self.dtype == DType::Bool => {
                TensorData::Bool(v.into_iter().map(|x| x != 0).collect())
            }
            data => data,
        };
        Tensor {
            name: self.name.clone(),
            shape: self.shape.clone(),
            data,
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How far a backend's outputs are from the reference's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parity {
    pub reference: String,
    pub max_abs: f64,
    pub max_rel: f64,
    pub atol: f64,
    pub rtol: f64,
    pub ok: bool,
    /// Set when the outputs could not be compared at all (shape or count).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// Smallest per-row cosine similarity, when the check is by cosine
    /// (precision variants: int8 kernels of two runtimes may round a
    /// quantisation boundary differently, so allclose would flag noise).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub min_cosine: Option<f64>,
}

/// Smallest cosine similarity between matching rows (last axis) of the
/// float outputs; 1.0 when there is nothing to compare.
pub fn min_row_cosine(outputs: &[Tensor], reference: &[Tensor]) -> f64 {
    let mut worst = 1.0f64;
    for (o, r) in outputs.iter().zip(reference) {
        let (x, y) = (o.data.to_f64(), r.data.to_f64());
        let width = (*o.shape.last().unwrap_or(&1)).max(1);
        for (a, b) in x.chunks(width).zip(y.chunks(width)) {
            let dot: f64 = a.iter().zip(b).map(|(p, q)| p * q).sum();
            let n = a.iter().map(|v| v * v).sum::<f64>().sqrt()
                * b.iter().map(|v| v * v).sum::<f64>().sqrt();
            let c = if n > 0.0 {
                dot / n
            } else if a == b {
                1.0
            } else {
                0.0
            };
            worst = worst.min(if c.is_nan() { -1.0 } else { c });
        }
    }
    worst
}

/// Compares outputs pairwise, with numpy's `allclose` rule:
/// `|a - r| <= atol + rtol * |r|` for every element. NaN never matches.
pub fn compare(
    outputs: &[Tensor],
    reference: &[Tensor],
    reference_name: &str,
    atol: f64,
    rtol: f64,
) -> Parity {
    let mut parity = Parity {
        reference: reference_name.to_owned(),
        max_abs: 0.0,
        max_rel: 0.0,
        atol,
        rtol,
        ok: true,
        detail: None,
        min_cosine: None,
    };
    let fail = |mut p: Parity, why: String| {
        p.ok = false;
        p.detail = Some(why);
        p.max_abs = f64::INFINITY;
        p.max_rel = f64::INFINITY;
        p
    };
    if outputs.len() != reference.len() {
        return fail(
            parity,
            format!(
                "{} outputs, reference has {}",
                outputs.len(),
                reference.len()
            ),
        );
    }
    for (o, r) in outputs.iter().zip(reference) {
        if o.shape != r.shape {
            return fail(
                parity,
                format!(
                    "output `{}` has shape {:?}, reference `{}` has {:?}",
                    o.name, o.shape, r.name, r.shape
                ),
            );
        }
        for (a, b) in o.data.to_f64().into_iter().zip(r.data.to_f64()) {
            let abs = (a - b).abs();
            if abs.is_nan() {
                parity.ok = false;
                parity.max_abs = f64::NAN;
                parity.detail = Some(format!("output `{}` has NaN", o.name));
                continue;
            }
            let rel = abs / b.abs().max(f64::MIN_POSITIVE);
            parity.max_abs = parity.max_abs.max(abs);
            if b.abs() > atol {
                parity.max_rel = parity.max_rel.max(rel);
            }
            if abs > atol + rtol * b.abs() {
                parity.ok = false;
            }
        }
    }
    parity
}

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("cannot read/write tensors at {path}: {detail}")]
    Io { path: String, detail: String },
}

/// Reads a serialised ONNX `TensorProto` (`input_0.pb`, `output_0.pb` of
/// the ONNX test-data layout) of f32, f16, i64, i32 or bool.
pub fn read_pb(path: &Path) -> Result<Tensor, TensorFileError> {
    let err = |detail: String| TensorFileError::Io {
        path: path.display().to_string(),
        detail,
    };
    let t = handoff_onnx::inspect::read_tensor(path).map_err(|e| err(e.to_string()))?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    use handoff_onnx::ElemType;
    let dtype = match ElemType::from_onnx(t.data_type) {
        ElemType::F32 => DType::F32,
        ElemType::F16 => DType::F16,
        ElemType::I64 => DType::I64,
        ElemType::I32 => DType::I32,
        ElemType::Bool => DType::Bool,
        other => {
            return Err(err(format!(
                "{other} tensors are not supported (f32, f16, i64, i32, bool)"
            )));
        }
    };
    let data = if t.raw_data.is_empty() {
        match dtype {
            DType::F32 => TensorData::F32(t.float_data),
            // Without raw data, ONNX keeps f16 bit patterns in `int32_data`.
            DType::F16 => TensorData::F16(
                t.int32_data
                    .iter()
                    .map(|&b| half::f16::from_bits(b as u16))
                    .collect(),
            ),
            DType::I64 => TensorData::I64(t.int64_data),
            DType::I32 => TensorData::I32(t.int32_data),
            DType::Bool => TensorData::Bool(t.int32_data.iter().map(|&b| b != 0).collect()),
        }
    } else {
        TensorData::from_le_bytes(dtype, &t.raw_data)
            .ok_or_else(|| err(format!("{} raw bytes of {dtype}", t.raw_data.len())))?
    };
    Ok(Tensor {
        name: t.name,
        shape,
        data,
    })
}

/// Writes `tensor` as a serialised ONNX `TensorProto` (raw data).
pub fn write_pb(path: &Path, tensor: &Tensor) -> Result<(), TensorFileError> {
    use handoff_onnx::ElemType;
    let elem = match tensor.data.dtype() {
        DType::F32 => ElemType::F32,
        DType::F16 => ElemType::F16,
        DType::I64 => ElemType::I64,
        DType::I32 => ElemType::I32,
        DType::Bool => ElemType::Bool,
    };
    let dims: Vec<i64> = tensor.shape.iter().map(|&d| d as i64).collect();
    let proto = handoff_onnx::builder::tensor(&tensor.name, elem, &dims, tensor.data.to_le_bytes());
    std::fs::write(path, proto.encode_to_bytes()).map_err(|e| TensorFileError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Saves tensors (safetensors format) so a reference computed in one process
/// can be compared in another.
pub fn save_tensors(path: &Path, tensors: &[Tensor]) -> Result<(), TensorFileError> {
    use safetensors::tensor::{Dtype, TensorView};
    let err = |detail: String| TensorFileError::Io {
        path: path.display().to_string(),
        detail,
    };
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let dtype = match t.data.dtype() {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                DType::I64 => Dtype::I64,
                DType::I32 => Dtype::I32,
                DType::Bool => Dtype::BOOL,
            };
            let raw = t.data.to_le_bytes();
            // Position first so order survives the format's sorted keys.
            (format!("{i:04}:{}", t.name), dtype, t.shape.clone(), raw)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, dtype, shape, raw)| {
            TensorView::new(*dtype, shape.clone(), raw)
                .map(|v| (name.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &tmp)
        .map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

pub fn load_tensors(path: &Path) -> Result<Vec<Tensor>, TensorFileError> {
    use safetensors::tensor::Dtype;
    let err = |detail: String| TensorFileError::Io {
        path: path.display().to_string(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    names
        .into_iter()
        .map(|key| {
            let view = st.tensor(&key).map_err(|e| err(e.to_string()))?;
            let raw = view.data();
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::I64 => DType::I64,
                Dtype::I32 => DType::I32,
                Dtype::BOOL => DType::Bool,
                other => return Err(err(format!("unexpected dtype {other:?}"))),
            };
            let data = TensorData::from_le_bytes(dtype, raw)
                .ok_or_else(|| err(format!("`{key}`: {} bytes of {dtype}", raw.len())))?;
            let name = key
                .split_once(':')
                .map_or(key.clone(), |(_, n)| n.to_owned());
            Ok(Tensor {
                name,
                shape: view.shape().to_vec(),
                data,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: Vec<f32>) -> Tensor {
        Tensor {
            name: "y".into(),
            shape: vec![data.len()],
            data: TensorData::F32(data),
        }
    }

    #[test]
    fn generation_is_deterministic_and_seeded() {
        let spec = TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![2, 3],
            fill: Fill::Random {
                min: -1.0,
                max: 1.0,
            },
        };
        assert_eq!(spec.generate(7), spec.generate(7));
        assert_ne!(spec.generate(7), spec.generate(8));
        let TensorData::F32(v) = spec.generate(7).data else {
            panic!("dtype")
        };
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        // Half precision draws the same values, rounded to the nearest f16.
        let half = TensorSpec {
            dtype: DType::F16,
            ..spec
        };
        let TensorData::F16(h) = half.generate(7).data else {
            panic!("dtype")
        };
        let rounded: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
        assert_eq!(h, rounded);
        assert_ne!(h.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), v);
        // Masks draw as i64 inputs do, non-zero true.
        let ints = TensorSpec {
            dtype: DType::I64,
            fill: Fill::RandomInt { min: 0, max: 2 },
            ..half
        };
        let mask = TensorSpec {
            dtype: DType::Bool,
            ..ints.clone()
        };
        let (TensorData::I64(i), TensorData::Bool(b)) =
            (ints.generate(7).data, mask.generate(7).data)
        else {
            panic!("dtype")
        };
        assert_eq!(b, i.iter().map(|&x| x != 0).collect::<Vec<_>>());
        assert!(b.contains(&true) && b.contains(&false), "{b:?}");
    }

    #[test]
    fn compare_uses_allclose_rule() {
        let p = compare(
            &[t(vec![1.0, 2.0])],
            &[t(vec![1.0, 2.0005])],
            "r",
            1e-4,
            1e-3,
        );
        assert!(p.ok, "{p:?}");
        let p = compare(&[t(vec![1.0, 2.1])], &[t(vec![1.0, 2.0])], "r", 1e-4, 1e-3);
        assert!(!p.ok);
        assert!((p.max_abs - 0.1).abs() < 1e-6);
        let p = compare(&[t(vec![f32::NAN])], &[t(vec![1.0])], "r", 1.0, 1.0);
        assert!(!p.ok);
        let p = compare(&[t(vec![1.0])], &[t(vec![1.0, 2.0])], "r", 1.0, 1.0);
        assert!(!p.ok && p.detail.is_some());
    }

    #[test]
    fn tensors_round_trip_through_files() {
        let dir = std::env::temp_dir().join(format!("handoff-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        let ts = vec![
            t(vec![1.0, 2.0]),
            Tensor {
                name: "ids".into(),
                shape: vec![1, 2],
                data: TensorData::I64(vec![3, 4]),
            },
            Tensor {
                name: "x16".into(),
                shape: vec![3],
                data: TensorData::F16([0.5, -1.25, 65504.0].map(half::f16::from_f32).to_vec()),
            },
            Tensor {
                name: "mask".into(),
                shape: vec![2, 2],
                data: TensorData::Bool(vec![true, false, false, true]),
            },
        ];
        save_tensors(&path, &ts).unwrap();
        assert_eq!(load_tensors(&path).unwrap(), ts);
        // ONNX test data (`input_0.pb`) of every dtype.
        for (i, tensor) in ts.iter().enumerate() {
            let pb = dir.join(format!("input_{i}.pb"));
            write_pb(&pb, tensor).unwrap();
            assert_eq!(read_pb(&pb).unwrap(), *tensor);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
