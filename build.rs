include!("build/pack_relocs.rs");

fn main() {
    pack_relocs("build/pack_relocs.rs");
}
