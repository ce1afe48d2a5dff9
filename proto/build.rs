//! Compiles `proto/pbus/v1/pbus.proto` with protox (pure Rust, no system
//! `protoc`) and prost-build, and writes the file descriptor set so tools can
//! decode payloads by type name at run time.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/pbus/v1/pbus.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_bytes = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("pbus_descriptor.bin"), descriptor_bytes)?;
    prost_build::Config::new()
        .enable_type_names()
        .compile_fds(descriptors)?;
    Ok(())
}
