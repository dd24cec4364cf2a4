//! Process exit codes shared by every subcommand (DESIGN section 4).

/// Success, changed or not.
pub const OK: u8 = 0;
/// The command was valid but failed at runtime (containerd did not come back, a probe failed, ...).
pub const RUNTIME_FAILURE: u8 = 1;
/// Bad input: invalid TOML, unsupported version, wrong types, missing files. Nothing was written.
pub const BAD_INPUT: u8 = 2;

/// Errors that know which exit code they map to.
pub trait ExitStatus {
    fn exit_code(&self) -> u8;
}

/// The command line of `program`, parsed. A usage error (unknown flag, bad value) is one line on
/// stderr naming the flag, and exit code [`BAD_INPUT`], like every other bad input; `--help` and
/// `--version` print as clap prints them.
pub fn parse_args<C: clap::Parser>(program: &str) -> Result<C, u8> {
    use clap::error::ErrorKind;
    match C::try_parse() {
        Ok(c) => Ok(c),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("{program}: {}", first.trim_start_matches("error: "));
            Err(BAD_INPUT)
        }
    }
}
