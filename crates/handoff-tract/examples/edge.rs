//! The edge story: the smallest program that runs an ONNX model, with tract
//! alone (no ONNX Runtime shared library, no candle, no Python). Its size
//! is what a device would ship; `scripts/edge-size.sh` builds and measures
//! it beside the full `handoff` binary.
//!
//!   cargo run --release -p handoff-tract --example edge -- model.onnx f32:1x256
//!
//! Each input is `dtype:dims` (f32 or i64, dims joined by `x`), filled with
//! zeros; prints each output's shape and the time of one run.

use tract_onnx::prelude::*;

fn main() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| TractError::msg("usage: edge MODEL.onnx dtype:dims ..."))?;
    let inputs: TVec<TValue> = args
        .map(|spec| -> TractResult<TValue> {
            let (dt, dims) = spec.split_once(':').ok_or_else(|| {
                TractError::msg(format!(
                    "input `{spec}`: expected dtype:dims, e.g. f32:1x256"
                ))
            })?;
            let shape: Vec<usize> = dims
                .split('x')
                .map(|d| {
                    d.parse()
                        .map_err(|_| TractError::msg(format!("input `{spec}`: bad dim `{d}`")))
                })
                .collect::<TractResult<_>>()?;
            let dt = match dt {
                "f32" => f32::datum_type(),
                "i64" => i64::datum_type(),
                other => {
                    return Err(TractError::msg(format!(
                        "input `{spec}`: dtype {other} (use f32 or i64)"
                    )));
                }
            };
            Ok(Tensor::zero_dt(dt, &shape)?.into_tvalue())
        })
        .collect::<TractResult<_>>()?;
    let model = tract_onnx::onnx()
        .model_for_path(&path)?
        .into_typed()?
        .into_optimized()?
        .into_runnable()?;
    let t = std::time::Instant::now();
    let outputs = model.run(inputs)?;
    let elapsed = t.elapsed();
    for (i, o) in outputs.iter().enumerate() {
        println!("output {i}: {:?} {:?}", o.datum_type(), o.shape());
    }
    println!("one run: {:.3} ms", elapsed.as_secs_f64() * 1e3);
    Ok(())
}
