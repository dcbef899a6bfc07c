include!("../build/pack_relocs.rs");
include!("build/seccomp_profile.rs");
include!("build/seccomp.rs");

fn main() {
    pack_relocs("../build/pack_relocs.rs");
    println!("cargo:rerun-if-changed=build/seccomp.rs");
    println!("cargo:rerun-if-changed=build/seccomp_profile.rs");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("seccomp.bpf");
    compile_seccomp(&std::env::var("CARGO_CFG_TARGET_ARCH").unwrap(), &out);
}
