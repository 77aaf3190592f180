//! `tour`: being written.
use std::process::ExitCode;
pub async fn run(_a: crate::cli::TourArgs, _g: &crate::cli::Globals) -> anyhow::Result<ExitCode> { Ok(ExitCode::SUCCESS) }
