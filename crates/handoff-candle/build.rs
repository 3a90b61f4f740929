// Intentionally empty. `protoc-bin-vendored` is a build-dependency only so
// that cargo downloads it: candle-onnx's build script then finds its protoc
// through scripts/protoc (see .cargo/config.toml), with no apt-get needed.
fn main() {}
