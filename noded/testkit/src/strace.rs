//! kill -9 at an exact step of a real run, with no hook in the binary: strace's fault injection
//! delivers SIGKILL on entry to the Nth call of a syscall. A clean traced run lists the steps
//! ([`Strace::steps`]); a crash-consistency test then kills a fresh run at each of them
//! ([`Strace::kill_at`]) and checks what the next run makes of the leftovers.
//!
//! Only the traced command's main thread is traced (no `-f`): strace counts calls per thread, so a
//! count is only reproducible on one thread. Work that moves to another thread drops out of the
//! step list, which the tests notice (they assert which syscalls the list holds).

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};

/// The syscalls that change the filesystem or make a change durable.
pub const PERSISTENCE: &str = "mkdir,mkdirat,rename,renameat,renameat2,symlink,symlinkat,link,linkat,unlink,unlinkat,rmdir,fsync,fdatasync,syncfs";

/// The [`PERSISTENCE`] syscalls plus file creation and writes: a kill between creating a temp
/// file and filling it is a step too.
pub const PERSISTENCE_AND_WRITES: &str = "mkdir,mkdirat,rename,renameat,renameat2,symlink,symlinkat,link,linkat,unlink,unlinkat,rmdir,fsync,fdatasync,syncfs,openat,write,fchmod,fchown";

/// The Nth call (from 1) of one syscall in a run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Step {
    pub syscall: String,
    pub nth: usize,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} #{}", self.syscall, self.nth)
    }
}

/// The strace binary, with the syscall set that counts as a step.
#[derive(Debug, Clone)]
pub struct Strace {
    bin: PathBuf,
    syscalls: String,
}

impl Strace {
    /// strace from PATH, or None (skip; a failure under `CI=true`).
    pub fn require(syscalls: &str) -> Option<Self> {
        let bin = crate::require::require("strace")?;
        Some(Self {
            bin,
            syscalls: syscalls.to_owned(),
        })
    }

    /// `strace <options> <cmd>` with `cmd`'s environment and working directory.
    fn wrap(&self, options: &[String], cmd: &Command) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(options)
            .arg("--")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// Runs `cmd` once, traced, and lists its steps in order; `log` keeps strace's output. The run
    /// must succeed.
    pub fn steps(&self, cmd: &Command, log: &Path) -> Result<Vec<Step>> {
        let options = vec![
            "-qq".to_owned(),
            "-e".to_owned(),
            format!("trace={}", self.syscalls),
            "-o".to_owned(),
            log.display().to_string(),
        ];
        let out = self.wrap(&options, cmd).output().context("run strace")?;
        ensure!(
            out.status.success(),
            "traced run failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let text =
            std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut steps = Vec::new();
        for line in text.lines() {
            let Some(name) = line.split('(').next().filter(|n| !n.contains(' ')) else {
                continue;
            };
            let n = seen.entry(name.to_owned()).or_default();
            *n += 1;
            steps.push(Step {
                syscall: name.to_owned(),
                nth: *n,
            });
        }
        Ok(steps)
    }

    /// Runs `cmd` and kills it (SIGKILL) on entry to `step`; an error if it was not killed there.
    pub fn kill_at(&self, cmd: &Command, step: &Step) -> Result<Output> {
        let options = vec![
            "-qq".to_owned(),
            "-o".to_owned(),
            "/dev/null".to_owned(),
            "-e".to_owned(),
            format!("trace={}", step.syscall),
            "-e".to_owned(),
            format!("inject={}:signal=KILL:when={}", step.syscall, step.nth),
        ];
        let out = self.wrap(&options, cmd).output().context("run strace")?;
        // strace ends itself with the signal that killed its tracee.
        if out.status.signal() != Some(libc::SIGKILL) {
            bail!(
                "not killed at {step} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }
}
