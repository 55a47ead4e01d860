// Generates the Rust code of proto/plugin.proto at build time with a protoc binary taken
// from crates.io (protoc-bin-vendored), so building needs nothing but cargo.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not built into it: two checkouts sharing a target
    // directory share this script's build (its path relative to the package is the same),
    // and the one built first would read the other checkout's proto.
    let proto_dir =
        std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = proto_dir.join("plugin.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    // SAFETY: build scripts are single-threaded; the variable is for tonic-prost-build.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    // The encoded descriptor set, for gRPC server reflection (src/serve.rs).
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("plugin_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &[proto_dir])?;
    Ok(())
}
