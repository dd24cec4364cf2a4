//! Test processes killed with their process group on drop (also when the test fails), and
//! processes that only look like something (`exec -a`), for the process scan's tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use noded::observe::procscan::{ScanReport, Scanner};

/// A child process (group) killed and reaped when dropped, also when the test fails.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Own process group so helpers the child starts die with it.
        cmd.process_group(0);
        Proc(cmd.spawn().expect("spawn test process"))
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).expect("pid fits i32")
    }

    pub fn kill(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `bash -c 'exec -a ARGV0 sleep 600'`-like: a process whose command line starts with `argv0` and
/// carries `args`, that does nothing. A script (`script`) runs instead of sleeping when given.
pub fn named_process(argv0: &str, args: &[&str], script: &str) -> Proc {
    let body = if script.is_empty() {
        "sleep 600; true"
    } else {
        script
    };
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("exec -a {argv0} bash -c '{body}' \"$@\""))
        .arg("bash")
        .args(args);
    Proc::spawn(&mut cmd)
}

/// Scans until `done` holds for a scan (test processes take a moment to exec), for at most 30 s;
/// the last scan otherwise.
pub fn scan_until(scanner: &Scanner, done: impl Fn(&ScanReport) -> bool) -> ScanReport {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = scanner.scan().expect("scan of /proc");
        if done(&r) || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
