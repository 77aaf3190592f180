//! qmpctl: a command-line tool for the QEMU Machine Protocol. (Being written.)

mod bench;

fn main() {
    let _ = bench::run;
}
