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
