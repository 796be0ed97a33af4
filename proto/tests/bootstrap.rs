//! Regenerates the checked-in code from the `.proto` files and fails if it differs.
//!
//! On a difference the fresh files are written over the checked-in ones, so a second run
//! passes and `git diff` shows what to commit.

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;

/// Every `.proto` file in `root/dir`, relative to `root`, sorted.
fn proto_files(root: &Path, dir: &str) -> Vec<String> {
    let mut files: Vec<String> = fs::read_dir(root.join(dir))
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .map(|entry| entry.expect("directory entry").file_name())
        .filter_map(|name| name.to_str().map(str::to_owned))
        .filter(|name| name.ends_with(".proto"))
        .map(|name| format!("{dir}/{name}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .proto files in {dir}");
    files
}

fn compile(root: &Path, files: &[String]) -> prost_types::FileDescriptorSet {
    protox::Compiler::new([root])
        .expect("protox compiler")
        .include_imports(true)
        .include_source_info(true)
        .open_files(files)
        .expect("compile .proto files")
        .file_descriptor_set()
}

/// Generates the Rust code and the descriptor set of `proxy.v1` into `out`.
fn generate_proxy_api(proto_root: &Path, out: &Path) {
    let fds = compile(proto_root, &proto_files(proto_root, "proxy/v1"));
    fs::write(out.join("proxy.v1.fds.bin"), fds.encode_to_vec()).expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .out_dir(out)
        .compile_fds(fds)
        .expect("generate Rust code");
}

/// Generates the echo service of proxyd's gRPC forwarding tests (client and server).
fn generate_testing(proto_root: &Path, out: &Path) {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .out_dir(out)
        .compile_fds(compile(
            proto_root,
            &proto_files(proto_root, "proxy/testing"),
        ))
        .expect("generate Rust code");
}

/// Generates the etcd client code (packages `etcdserverpb` and `mvccpb`) into `out`: clients
/// only, proxyd never serves etcd's API.
fn generate_etcd_client(etcd_root: &Path, out: &Path) {
    let files = [
        proto_files(etcd_root, "etcdserverpb"),
        proto_files(etcd_root, "mvccpb"),
    ]
    .concat();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .build_transport(true)
        .out_dir(out)
        .compile_fds(compile(etcd_root, &files))
        .expect("generate Rust code");
}

#[test]
fn generated_code_is_current() {
    let crate_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let checked_in = crate_root.join("src/gen");
    let fresh = tempfile::tempdir().expect("temporary directory");
    generate_proxy_api(&crate_root.join("proto"), fresh.path());
    generate_etcd_client(&crate_root.join("etcd-api"), fresh.path());
    generate_testing(&crate_root.join("proto"), fresh.path());

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
