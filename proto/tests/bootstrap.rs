//! Regenerates the checked-in code from the `.proto` files and fails if it differs.
//!
//! On a difference the fresh files are written over the checked-in ones, so a second run
//! passes and `git diff` shows what to commit.

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;

/// Every `.proto` file under `proto/`, relative to it, sorted.
fn proto_files(root: &Path) -> Vec<String> {
    let dir = root.join("proxy/v1");
    let mut files: Vec<String> = fs::read_dir(&dir)
        .expect("read proto/proxy/v1")
        .map(|entry| entry.expect("directory entry").file_name())
        .filter_map(|name| name.to_str().map(str::to_owned))
        .filter(|name| name.ends_with(".proto"))
        .map(|name| format!("proxy/v1/{name}"))
        .collect();
    files.sort();
    files
}

/// Generates the Rust code and the descriptor set into `out`.
fn generate(proto_root: &Path, out: &Path) {
    let files = proto_files(proto_root);
    assert!(!files.is_empty(), "no .proto files found");
    let fds = protox::Compiler::new([proto_root])
        .expect("protox compiler")
        .include_imports(true)
        .include_source_info(true)
        .open_files(&files)
        .expect("compile .proto files")
        .file_descriptor_set();
    fs::write(out.join("proxy.v1.fds.bin"), fds.encode_to_vec()).expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .out_dir(out)
        .compile_fds(fds)
        .expect("generate Rust code");
}

#[test]
fn generated_code_is_current() {
    let crate_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let checked_in = crate_root.join("src/gen");
    let fresh = tempfile::tempdir().expect("temporary directory");
    generate(&crate_root.join("proto"), fresh.path());

    let mut stale = Vec::new();
    for entry in fs::read_dir(fresh.path()).expect("read generated files") {
        let entry = entry.expect("directory entry");
        let target = checked_in.join(entry.file_name());
        let new = fs::read(entry.path()).expect("read generated file");
        if fs::read(&target).ok().as_deref() != Some(new.as_slice()) {
            fs::write(&target, &new).expect("update checked-in file");
            stale.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    assert!(
        stale.is_empty(),
        "generated code was stale and has been rewritten: {stale:?}; commit src/gen/"
    );
}
