fn main() {
    eprintln!("vmd-logstream: not implemented yet (issue 6)");
    std::process::exit(2);
}
