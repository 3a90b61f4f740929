// Records the compiler version for the environment fingerprint.
fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    if let Ok(out) = std::process::Command::new(rustc).arg("--version").output() {
        let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!("cargo:rustc-env=HANDOFF_RUSTC_VERSION={v}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
