//! What a package installs besides the binary: shell completions and the
//! manual page, generated from the same command-line definition.

use std::io::Write as _;

use clap::CommandFactory as _;

use crate::cli::Cli;

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "qmpctl", &mut out);
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out)?;
    stdout.flush()?;
    Ok(())
}

/// Prints the manual page (roff, section 1) on stdout, or with `dir`
/// writes a page per subcommand there (`qmpctl.1`, `qmpctl-block.1`, ...).
pub fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::Error::new(e).context(format!("cannot create {}", dir.display())))?;
        clap_mangen::generate_to(cmd, dir).map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot write the pages in {}", dir.display()))
        })?;
        return Ok(());
    }
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out)?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // Catches clashing argument names (a subcommand's `json` and the
        // global `--json`, say) before a user meets them as a panic.
        Cli::command().debug_assert();
    }
}
