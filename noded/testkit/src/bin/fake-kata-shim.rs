//! `containerd-shim-kata-v2` of the fake Kata release: see `testkit::shim`.

fn main() {
    testkit::shim::main();
}
