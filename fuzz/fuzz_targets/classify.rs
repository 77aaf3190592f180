//! Message classification on any bytes: no panic, consistent answers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmpkit::fuzzing::classify_message(data);
});
