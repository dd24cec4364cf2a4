fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/noded.proto");
    tonic_prost_build::configure().compile_protos(&["../proto/noded.proto"], &["../proto"])?;
    Ok(())
}
