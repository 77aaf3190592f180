//! The stream splitter on any bytes, in any pieces, under a small size
//! limit: no panic, and a well-formed reply after the input comes through.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first bytes choose how the rest arrives: piece sizes, and the limit.
    let (head, data) = input.split_at(input.len().min(8));
    let limit = 1024 + head.first().map_or(0, |&b| usize::from(b) * 64);
    qmpkit::fuzzing::split(data, head, limit);
});
