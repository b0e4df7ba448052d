//! Compiles `proto/fleet/v1/*.proto` with protox (pure Rust), so building Fleet
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/fleet/v1/agent.proto",
        "proto/fleet/v1/controller.proto",
        "proto/fleet/v1/join.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("fleet_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small first buffers (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
