// Rebuild when the linker changes (it is not a rustc input cargo would notice).
fn main() {
    println!("cargo:rerun-if-env-changed=BPF_LINKER");
}
