//! Compiles proto/ with protox (pure Rust), so building Weft needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["weft/agent/v1/agent.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::ControlCodec")
        .compile_fds(files)?;
    Ok(())
}
