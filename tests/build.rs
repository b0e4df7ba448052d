//! Compiles the example app's `proto/fleet/example/v1/echo.proto` with protox (pure
//! Rust), as `proto/build.rs` does for Fleet's own services: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/fleet/example/v1/echo.proto";
    println!("cargo:rerun-if-changed={file}");
    let descriptors = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
