//! Model compilation steps that need no runtime: HF BERT-family safetensors
//! to ONNX ([`bert`]), graph rewrites that lower ops a backend lacks into
//! primitives ([`lower`]), and the provenance sidecar every produced model
//! carries ([`provenance`]).

pub mod bert;
pub mod fetch;
pub mod isa;
pub mod lower;
pub mod normalize;
pub mod provenance;
pub mod quantize;

/// Converter version, recorded in provenance; bump when output changes.
pub const CONVERTER_VERSION: &str =
    concat!("handoff-convert ", env!("CARGO_PKG_VERSION"), "+bert2.q4");
