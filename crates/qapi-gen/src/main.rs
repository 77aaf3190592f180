//! `qapi-gen`: writes qmpkit-qapi's generated files from QEMU's schema.
//!
//! ```text
//! qapi-gen --schema qapi/qapi-schema.json --profile conditions.txt \
//!          --qemu-version 10.0.2 --build "x86_64 ..." --out crates/qmpkit-qapi/src
//! qapi-gen --schema qapi/qapi-schema.json --symbols     # the condition symbols used
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use qapi_gen::cond::Profile;
use qapi_gen::gen::{generate, Options};
use qapi_gen::schema::Schema;

fn usage() -> ExitCode {
    eprintln!(
        "usage: qapi-gen --schema FILE (--symbols | --profile FILE --out DIR [--qemu-version V] [--build TEXT] [--doc-base URL])"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut schema, mut profile, mut out, mut symbols) = (None, None, None, false);
    let mut opts = Options::default();
    while let Some(a) = args.next() {
        let mut val = || args.next();
        match a.as_str() {
            "--schema" => schema = val().map(PathBuf::from),
            "--profile" => profile = val().map(PathBuf::from),
            "--out" => out = val().map(PathBuf::from),
            "--qemu-version" => opts.qemu_version = val().unwrap_or_default(),
            "--build" => opts.build = val().unwrap_or_default(),
            "--doc-base" => opts.doc_base = val().unwrap_or_default(),
            "--symbols" => symbols = true,
            _ => return usage(),
        }
    }
    let Some(schema_path) = schema else {
        return usage();
    };
    let run = || -> Result<(), String> {
        if symbols {
            for s in Schema::load(&schema_path, &Profile::everything())?.symbols {
                println!("{s}");
            }
            return Ok(());
        }
        let (Some(profile), Some(out)) = (profile, out) else {
            return Err("--profile and --out are needed".into());
        };
        let text = std::fs::read_to_string(&profile).map_err(|e| format!("{}: {e}", profile.display()))?;
        let profile = Profile::parse(&text).map_err(|e| format!("{}: {e}", profile.display()))?;
        let schema = Schema::load(&schema_path, &profile)?;
        for (path, text) in generate(&schema, &opts)? {
            let path = out.join(path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qapi-gen: {e}");
            ExitCode::FAILURE
        }
    }
}
