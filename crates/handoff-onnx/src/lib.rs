//! ONNX models as handoff sees them: hand-written protobuf types ([`proto`]),
//! reading a model's interface and op set with errors that name the file
//! ([`inspect`]), weights in external data files ([`external`]), Git LFS pointers in place of a file ([`lfs`]), a small graph builder ([`builder`]) and the synthetic models
//! the quickstart suite and tests generate ([`synthetic`]).

pub mod builder;
pub mod external;
pub mod inspect;
pub mod lfs;
pub mod proto;
pub mod rng;
pub mod synthetic;

pub use inspect::{Dim, ElemType, IoInfo, ModelInfo, OnnxError};
