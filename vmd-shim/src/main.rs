fn main() {
    eprintln!("vmd-shim: not implemented yet (issue 4)");
    std::process::exit(2);
}
