//! The node-in-a-box: one machine's worth of an EKS AL2023 Kata node, on this host, for one test.
//!
//! A holder process owns a private mount namespace in which the node's paths are the box's: `/etc` is
//! an overlay (host `/etc` below, the box's writes above, so `/etc/noded` or `/etc/eks` appear without
//! touching the host), and `/opt`, `/usr/local`, `/var` and `/run` are the box's own directories; the
//! series' `containerd`, `containerd-shim-runc-v2` and `ctr` are bind-mounted over `/usr/bin`. Every
//! node-side program — `installer bake|boot|uninstall`, the node's containerd, everything containerd
//! starts (shims, runc, the DaemonSet's container) — runs in that namespace with `--root /` and the
//! manifest's literal hostPaths, exactly as on a node. The harness itself stays outside and reaches
//! node paths through `/proc/<holder>/root` ([`NodeBox::path`]).
//!
//! The node's containerd is a "unit" run by a shell script (`start|stop|restart`), which the stand-in
//! systemd on the box's D-Bus calls for `RestartUnit("containerd.service")`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::containerd::{Binaries, Series};

/// The pause image the node's containerd holds (EKS AMIs cache theirs; kubelet never pulls it).
pub const PAUSE_IMAGE: &str = noded::containerd::image::PAUSE_IMAGE;

/// Node directories that are the box's own inside the namespace (bind mounts, made shared so that
/// Bidirectional hostPath mounts of the DaemonSet — /run/noded, /run/vc — work as on a node).
const BOUND: [&str; 4] = ["/opt", "/usr/local", "/var", "/run"];
/// Binaries of the series laid over the host's Debian 1.6 ones.
const SERIES_BINARIES: [&str; 3] = [
    "/usr/bin/containerd",
    "/usr/bin/containerd-shim-runc-v2",
    "/usr/bin/ctr",
];

pub struct NodeBox {
    pub series: Series,
    bins: Binaries,
    dir: tempfile::TempDir,
    holder: Child,
}

impl NodeBox {
    /// Creates the box: directories, the namespace with its mounts, and the containerd config nodeadm
    /// would have rendered for this series. containerd is not started.
    pub fn new(series: Series, bins: Binaries) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("nodebox-{}-", series.name()))
            .tempdir_in("/tmp")
            .context("create the box dir")?;
        let d = dir.path();
        for sub in [
            "etc-upper/containerd",
            "etc-work",
            "opt",
            "usr/local/bin",
            "usr/local/sbin",
            "var/lib/containerd",
            "var/lib/kubelet",
            "var/log/pods",
            "run",
        ] {
            std::fs::create_dir_all(d.join(sub)).with_context(|| format!("mkdir {sub}"))?;
        }
        // nodeadm (EKS AL2023) renders this before containerd starts; containerd 2.x nodes read
        // drop-ins from config.d.
        if series.version().major >= 2 {
            std::fs::create_dir_all(d.join("etc-upper/containerd/config.d"))?;
        }
        std::fs::write(
            d.join("etc-upper/containerd/config.toml"),
            nodeadm_config(series),
        )?;
        // A node has `/usr/bin/nodeadm`; bake then writes its NodeConfig drop-in. The box keeps the
        // host's /usr/bin, so nodeadm's presence is left to the test (`installer bake --nodeadm`).
        let mut script = String::from("set -e\n");
        script.push_str(&format!(
            "mount -t overlay overlay -o lowerdir=/etc,upperdir={0}/etc-upper,workdir={0}/etc-work /etc\n",
            d.display()
        ));
        for node in BOUND {
            let src = d.join(node.trim_start_matches('/'));
            script.push_str(&format!(
                "mount --bind {} {node}\nmount --make-rshared {node}\n",
                src.display()
            ));
        }
        for (node, real) in SERIES_BINARIES
            .iter()
            .zip([&bins.containerd, &bins.shim, &bins.ctr])
        {
            script.push_str(&format!("mount --bind {} {node}\n", real.display()));
        }
        script.push_str("echo ready\nexec sleep infinity\n");
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn the box's namespace holder (unshare)")?;
        let ready = wait_line(&mut holder, "ready", Duration::from_secs(10));
        let me = Self {
            series,
            bins,
            dir,
            holder,
        };
        if let Err(e) = ready {
            bail!("box namespace did not come up: {e:#}");
        }
        me.write_service_script()?;
        Ok(me)
    }

    /// The box's own directory (outside the namespace): logs, scripts, test inputs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// The box's mount namespace (what `/proc/1/ns/mnt` is on a real node).
    pub fn mount_namespace(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.holder_pid()))
    }

    fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// A node path (e.g. `/etc/containerd/config.toml`) as the harness reaches it from outside.
    pub fn path(&self, node_path: impl AsRef<Path>) -> PathBuf {
        let rel = node_path
            .as_ref()
            .strip_prefix("/")
            .unwrap_or(node_path.as_ref());
        PathBuf::from(format!("/proc/{}/root", self.holder_pid())).join(rel)
    }

    /// The node's containerd socket, reachable from outside.
    pub fn containerd_socket(&self) -> PathBuf {
        self.path("/run/containerd/containerd.sock")
    }

    /// A command that runs `program` inside the box's mount namespace (cwd `/`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", self.holder_pid()))
            .arg("--wd=/")
            .arg("--")
            .arg(program);
        c
    }

    /// Runs a command in the box and fails with its stderr when it does not exit 0.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("box: run {program}"))?;
        if !out.status.success() {
            bail!(
                "box: {program} {} exited {}: {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// The shell "unit" of the node's containerd: `start|stop|restart`, run inside the namespace.
    pub fn service_script(&self) -> PathBuf {
        self.dir().join("containerd-unit.sh")
    }

    /// What the stand-in systemd runs for `RestartUnit("containerd.service")`.
    pub fn restart_command(&self) -> String {
        format!(
            "nsenter --mount=/proc/{}/ns/mnt --wd=/ -- /bin/sh {} restart",
            self.holder_pid(),
            self.service_script().display()
        )
    }

    fn write_service_script(&self) -> Result<()> {
        let log = self.dir().join("containerd.log");
        // A unit's PATH on AL2023 (systemd's default) has /usr/local/bin first: the per-handler shim
        // links `installer bake` writes there are found by name, as containerd 1.6 requires.
        let script = format!(
            r#"#!/bin/sh
# The node's containerd.service, for the box: start|stop|restart. Runs inside the box's namespace.
pidfile=/run/containerd-unit.pid
sock=/run/containerd/containerd.sock
start() {{
  rm -f "$sock"
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin setsid containerd --config /etc/containerd/config.toml >>{log} 2>&1 </dev/null &
  echo $! > "$pidfile"
  i=0
  while [ ! -S "$sock" ]; do
    i=$((i+1)); [ $i -gt 600 ] && {{ echo "containerd did not create $sock" >&2; exit 1; }}
    kill -0 "$(cat "$pidfile")" 2>/dev/null || {{ echo "containerd exited; see {log}" >&2; exit 1; }}
    sleep 0.05
  done
}}
stop() {{
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  i=0
  while kill -0 "$pid" 2>/dev/null; do
    i=$((i+1)); [ $i -gt 300 ] && kill -KILL "$pid" 2>/dev/null
    sleep 0.05
  done
  rm -f "$pidfile"
}}
case "$1" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|restart" >&2; exit 2 ;;
esac
"#,
            log = log.display()
        );
        let p = self.service_script();
        std::fs::write(&p, script)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// The node's containerd log (outside the namespace).
    pub fn containerd_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }

    pub fn containerd_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.path("/run/containerd-unit.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// `systemctl start containerd` on the node, then waits until CRI answers.
    pub async fn start_containerd(&self) -> Result<()> {
        self.run(
            "/bin/sh",
            &[&self.service_script().to_string_lossy(), "start"],
        )?;
        self.wait_cri(Duration::from_secs(30)).await
    }

    pub fn stop_containerd(&self) -> Result<()> {
        self.run(
            "/bin/sh",
            &[&self.service_script().to_string_lossy(), "stop"],
        )?;
        Ok(())
    }

    /// Waits until the CRI plugin serves (it answers "not initialized" for a while after the socket).
    pub async fn wait_cri(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match noded::cri::CriClient::connect(&self.containerd_socket()).await {
                Ok(mut c) => match c.status_verbose().await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "box containerd's CRI did not serve within {timeout:?}: {last}\n{}",
            tail(&self.containerd_log(), 30)
        )
    }

    /// `ctr` inside the box, on the node's containerd socket, in CRI's namespace `k8s.io`.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec![
            "--address",
            "/run/containerd/containerd.sock",
            "-n",
            "k8s.io",
        ];
        all.extend_from_slice(args);
        self.run("ctr", &all)
    }

    /// `ctr images import` inside the box (the image then is "on the node").
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        self.ctr(&["images", "import", &archive.to_string_lossy()])?;
        Ok(())
    }

    /// `installer <args…> --root /` inside the box, with the given installer binary.
    pub fn installer(&self, installer: &Path, args: &[&str]) -> Result<serde_json::Value> {
        let mut all: Vec<&str> = vec!["--root", "/", "--output", "json"];
        all.extend_from_slice(args);
        let out = self
            .command(installer)
            .args(&all)
            .output()
            .context("box: run installer")?;
        if !out.status.success() {
            bail!(
                "installer {} exited {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "installer {}: not JSON: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Every process whose mount namespace is the box's (containerd, shims, runc children of the
    /// fake Kata shim…), but not the holder.
    pub fn processes(&self) -> Vec<i32> {
        let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/mnt", self.holder_pid())) else {
            return Vec::new();
        };
        let me = i32::try_from(self.holder_pid()).unwrap_or(-1);
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid != me
                && std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                    .ok()
                    .as_ref()
                    == Some(&ns)
            {
                out.push(pid);
            }
        }
        out
    }

    /// Kills every container runc runs for the box (the DaemonSet pod, probe and test sandboxes, the
    /// fake Kata shim's containers): containers have mount namespaces of their own, so they are found
    /// through runc's state roots under the box's /run.
    fn kill_containers(&self) {
        let run = self.dir().join("run");
        let mut roots = Vec::new();
        find_runc_roots(&run, 0, &mut roots);
        for root in roots {
            let node_root = Path::new("/run").join(root.strip_prefix(&run).unwrap_or(&root));
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                let r = node_root.to_string_lossy().into_owned();
                let _ = self
                    .command("runc")
                    .args(["--root", &r, "kill", "--all", &id, "KILL"])
                    .stderr(Stdio::null())
                    .status();
                let _ = self
                    .command("runc")
                    .args(["--root", &r, "delete", "--force", &id])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Directories that look like a runc `--root` (children holding `state.json`).
fn find_runc_roots(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    if depth > 6 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut is_root = false;
    for e in entries.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_dir() || ft.is_symlink() {
            continue;
        }
        if p.join("state.json").is_file() {
            is_root = true;
        } else {
            find_runc_roots(&p, depth + 1, out);
        }
    }
    if is_root {
        out.push(dir.to_path_buf());
    }
}

impl Drop for NodeBox {
    fn drop(&mut self) {
        self.kill_containers();
        let _ = self.stop_containerd();
        for _ in 0..3 {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill_containers();
        // The namespace, and every mount in it, goes with its last process.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The containerd config nodeadm renders on an EKS AL2023 node for this series, with what this kind
/// of machine needs (DESIGN §10): no AppArmor, no oom_score_adj below containerd's own, cgroupfs
/// (no systemd in the box), the pause image the node holds.
pub fn nodeadm_config(series: Series) -> String {
    if series.version().major >= 2 {
        format!(
            r#"# rendered by nodeadm (box)
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
imports = ["/etc/containerd/config.d/*.toml"]

[grpc]
address = "/run/containerd/containerd.sock"

[metrics]
address = ""

[plugins.'io.containerd.cri.v1.images']
discard_unpacked_layers = true

[plugins.'io.containerd.cri.v1.images'.pinned_images]
sandbox = "{PAUSE_IMAGE}"

[plugins.'io.containerd.cri.v1.runtime']
disable_apparmor = true
restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.containerd]
default_runtime_name = "runc"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
SystemdCgroup = false
"#
        )
    } else {
        format!(
            r#"# rendered by nodeadm (box)
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
address = "/run/containerd/containerd.sock"

[metrics]
address = ""

[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "{PAUSE_IMAGE}"
disable_apparmor = true
restrict_oom_score_adj = true

[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "runc"
discard_unpacked_layers = true

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
SystemdCgroup = false
"#
        )
    }
}

fn wait_line(child: &mut Child, want: &str, timeout: Duration) -> Result<()> {
    use std::io::BufRead;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(timeout) {
        Ok(line) if line.trim() == want => Ok(()),
        Ok(line) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = child.kill();
                let _ = e.read_to_string(&mut err);
            }
            bail!("expected `{want}`, got `{}`: {}", line.trim(), err.trim())
        }
        Err(_) => bail!("no `{want}` within {timeout:?}"),
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The sandbox exists and is READY (its shim, and for Kata its VM, still up).
pub async fn sandbox_ready(cri: &mut noded::cri::CriClient, id: &str) -> Result<bool> {
    let r = cri
        .runtime_service()
        .pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        })
        .await?
        .into_inner();
    Ok(r.status
        .is_some_and(|s| s.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32))
}
