//! The kubelet stand-in: renders a DaemonSet's pod into CRI configs and runs it on a REAL private
//! containerd (every series the harness offers) through CRI, the way kubelet runs a DaemonSet pod.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::{ContainerState, MountPropagation, NamespaceMode};
use noded::containerd::image::{self, K8S_NAMESPACE, PAUSE_IMAGE};
use noded::cri::CriClient;
use testkit::containerd::{self as series_ctrd, Series};
use testkit::kubelet::{self, HostPathCheck, KubeletError, PodOptions, PodRunner};

const IMAGE: &str = "testkit.local/kubelet-busybox:1";
const NODE: &str = "kubelet-node-1";

fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../daemonset/daemonset.yaml")
}

/// The real DaemonSet, rendered: every volumeMount of the manifest (read here independently, as plain
/// YAML) is a CRI mount from its hostPath (mapped), with readOnly and propagation as the manifest says;
/// the pod runs privileged in the node's network and PID namespaces.
#[test]
fn real_daemonset_renders_into_cri_configs() {
    let ds =
        kubelet::read_daemonset(&manifest_path()).expect("daemonset.yaml parses as a DaemonSet");
    let text = std::fs::read_to_string(manifest_path()).expect("manifest");
    let raw: serde_json::Value = serde_norway::from_str(&text).expect("plain YAML");
    let pod_spec = &raw["spec"]["template"]["spec"];
    let container = &pod_spec["containers"][0];

    let opts = PodOptions::new(NODE)
        .host_path(|p| Path::new("/box").join(p.strip_prefix("/").expect("absolute")))
        .env("KUBECONFIG", "/etc/noded-test/kubeconfig")
        .mount(
            Path::new("/outside/kubeconfig"),
            Path::new("/etc/noded-test/kubeconfig"),
            true,
        );
    let pod = kubelet::render(&ds, &opts, Path::new("/var/log/pods")).expect("renders");

    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    assert!(!mounts.is_empty());
    for vm in mounts {
        let name = vm["name"].as_str().expect("name");
        let mount_path = vm["mountPath"].as_str().expect("mountPath");
        let volume = pod_spec["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"));
        let host = volume["hostPath"]["path"].as_str().expect("hostPath.path");
        let m = pod
            .mount(mount_path)
            .unwrap_or_else(|| panic!("no CRI mount for volumeMount {name} at {mount_path}"));
        assert_eq!(
            m.host_path,
            format!("/box{host}"),
            "{name}: hostPath mapped"
        );
        assert_eq!(m.readonly, vm["readOnly"] == true, "{name}: readOnly");
        let want = match vm["mountPropagation"].as_str() {
            None => MountPropagation::PropagationPrivate,
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => MountPropagation::PropagationBidirectional,
            Some(other) => panic!("{name}: unexpected propagation {other}"),
        };
        assert_eq!(m.propagation, want as i32, "{name}: propagation");
        let check = pod
            .host_paths
            .iter()
            .find(|h| h.volume == name)
            .unwrap_or_else(|| panic!("no hostPath check for {name}"));
        assert_eq!(check.node_path, Path::new(host), "{name}");
        assert_eq!(
            check.type_,
            volume["hostPath"]["type"].as_str().unwrap_or_default(),
            "{name}: hostPath type"
        );
    }
    // The manifest's own reasons for Bidirectional (noded's template tmpfs, Kata's factory) hold.
    for p in ["/run/noded", "/run/vc"] {
        assert_eq!(
            pod.mount(p).expect(p).propagation,
            MountPropagation::PropagationBidirectional as i32,
            "{p}"
        );
    }
    let extra = pod
        .mount("/etc/noded-test/kubeconfig")
        .expect("extra mount");
    assert_eq!(
        extra.host_path, "/outside/kubeconfig",
        "extra mounts are not remapped"
    );
    assert!(extra.readonly);
    assert_eq!(
        pod.container.mounts.len(),
        mounts.len() + 1,
        "every volumeMount + the extra one, nothing else"
    );

    let linux = pod.container.linux.as_ref().expect("linux");
    let sc = linux.security_context.as_ref().expect("security context");
    assert!(sc.privileged);
    let ns = sc.namespace_options.as_ref().expect("namespaces");
    assert_eq!(ns.network, NamespaceMode::Node as i32);
    assert_eq!(ns.pid, NamespaceMode::Node as i32);
    let sandbox_sc = pod
        .sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .expect("sandbox security context");
    assert!(sandbox_sc.privileged);
    let sns = sandbox_sc
        .namespace_options
        .as_ref()
        .expect("sandbox namespaces");
    assert_eq!(sns.network, NamespaceMode::Node as i32);
    assert_eq!(sns.pid, NamespaceMode::Node as i32);
    assert_eq!(
        linux
            .resources
            .as_ref()
            .expect("resources")
            .memory_limit_in_bytes,
        2 << 30,
        "limits.memory 2Gi"
    );

    assert_eq!(pod.env("NODE_NAME"), Some(NODE), "fieldRef spec.nodeName");
    assert_eq!(pod.env("RUST_LOG"), container["env"][1]["value"].as_str());
    assert_eq!(pod.env("KUBECONFIG"), Some("/etc/noded-test/kubeconfig"));
    let image = pod.container.image.as_ref().expect("image");
    assert_eq!(Some(image.image.as_str()), container["image"].as_str());
    let command: Vec<&str> = container["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(pod.container.command, command);

    let readiness = pod.readiness.as_ref().expect("readinessProbe");
    assert_eq!(
        Some(readiness.path.as_str()),
        container["readinessProbe"]["httpGet"]["path"].as_str()
    );
    let port_name = container["readinessProbe"]["httpGet"]["port"]
        .as_str()
        .expect("named port");
    let port = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == port_name)
        .and_then(|p| p["containerPort"].as_u64())
        .expect("port of that name");
    assert_eq!(u64::from(readiness.port), port, "named port resolved");
    assert_eq!(
        Some(pod.grace.as_secs()),
        pod_spec["terminationGracePeriodSeconds"].as_u64()
    );

    let meta = pod.sandbox.metadata.as_ref().expect("metadata");
    assert_eq!(
        Some(meta.namespace.as_str()),
        raw["metadata"]["namespace"].as_str()
    );
    assert!(
        meta.name.starts_with("noded-") && meta.name.len() == "noded-".len() + 5,
        "{}",
        meta.name
    );
    for (k, v) in raw["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("labels")
    {
        assert_eq!(
            pod.sandbox.labels.get(k).map(String::as_str),
            v.as_str(),
            "label {k}"
        );
    }
    assert_eq!(
        pod.sandbox.labels.get("io.kubernetes.pod.uid"),
        Some(&meta.uid)
    );
    assert!(
        pod.sandbox
            .log_directory
            .starts_with("/var/log/pods/noded-system_noded-")
    );
    assert_eq!(pod.container.log_path, "noded/0.log");
}

#[test]
fn manifest_errors_name_the_field() {
    let ds = kubelet::parse_daemonset(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  selector: {}\n  template:\n    spec:\n      containers:\n        - name: c\n          image: i\n          volumeMounts: [{name: v, mountPath: /v, mountPropagation: Bidirectional}]\n      volumes: [{name: v, hostPath: {path: /v}}]\n",
    )
    .expect("parses");
    let err = kubelet::render(&ds, &PodOptions::new(NODE), Path::new("/logs"))
        .expect_err("unprivileged Bidirectional");
    assert!(
        err.to_string()
            .contains("containers[c].volumeMounts[0] (v).mountPropagation")
            && err.to_string().contains("privileged"),
        "{err}"
    );
    let err = kubelet::parse_daemonset("kind: DaemonSet\nspec: [").expect_err("bad YAML");
    assert!(matches!(err, KubeletError::Parse { .. }), "{err}");
}

#[test]
fn host_path_types_are_checked_and_created_like_kubelet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |type_: &str, p: &Path| {
        kubelet::check_host_path(
            &HostPathCheck {
                volume: "v".into(),
                node_path: p.into(),
                type_: type_.into(),
            },
            p,
        )
    };
    let d = dir.path().join("a/b");
    let err = check("Directory", &d).expect_err("missing Directory");
    assert!(err.to_string().contains("does not exist"), "{err}");
    check("DirectoryOrCreate", &d).expect("created");
    assert!(d.is_dir());
    check("Directory", &d).expect("now a directory");
    let f = dir.path().join("c/file");
    check("FileOrCreate", &f).expect("created");
    assert!(f.is_file());
    let err = check("Socket", &f).expect_err("a file is no socket");
    assert!(err.to_string().contains("is not a socket file"), "{err}");
    let err = check("Directory", &f).expect_err("a file is no directory");
    assert!(err.to_string().contains("is not a directory"), "{err}");
    let s = dir.path().join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&s).expect("socket");
    check("Socket", &s).expect("socket");
    check("", &dir.path().join("nothing")).expect("no type: no check");
    assert!(check("Whatever", &s).is_err());
}

/// root, containerd's runtime and busybox; None = skip (failing under CI=true).
fn available() -> bool {
    let missing: Vec<&str> = [
        ("root", nix::unistd::geteuid().is_root()),
        ("runc", which("runc")),
        ("unshare", which("unshare")),
        (
            image::DEFAULT_BUSYBOX,
            Path::new(image::DEFAULT_BUSYBOX).is_file(),
        ),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(n, _)| n)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "missing {missing:?} (CI=true: failing instead of skipping)"
    );
    eprintln!("SKIP: missing {missing:?}");
    false
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn test_daemonset(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: writer
  namespace: kubelet-test
spec:
  selector:
    matchLabels: {{app: writer}}
  template:
    metadata:
      labels: {{app: writer}}
    spec:
      hostPID: true
      hostNetwork: true
      terminationGracePeriodSeconds: 5
      containers:
        - name: writer
          image: {IMAGE}
          command: ["/bin/sh", "-c"]
          # `$$$$` is kubelet's escape for the shell's `$$`.
          args:
            - |
              trap 'echo "term $$$$" >> /out/events; exit 0' TERM
              {{
                echo "node=$NODE_NAME"
                echo "pod=$POD_NAME"
                echo "ns=$POD_NAMESPACE"
                echo "greeting=$GREETING"
                echo "extra_env=$EXTRA"
                echo "hostname=$(hostname)"
                echo "pid=$$$$"
                echo "pidns=$(/bin/busybox readlink /proc/self/ns/pid)"
                echo "netns=$(/bin/busybox readlink /proc/self/ns/net)"
                echo "input=$(cat /in/input.txt)"
                echo "extra=$(cat /extra/extra.txt)"
                if echo x > /in/written 2>/dev/null; then echo "in_ro=no"; else echo "in_ro=yes"; fi
                if [ -S /sock/api.sock ]; then echo "socket=yes"; else echo "socket=no"; fi
              }} > /out/report.tmp
              /bin/busybox mv /out/report.tmp /out/report-$$$$
              echo "report written by $$$$"
              while :; do sleep 1; done
          env:
            - name: NODE_NAME
              valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}
            - name: POD_NAME
              valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
            - name: POD_NAMESPACE
              valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
            - name: GREETING
              value: "hello $(NODE_NAME)"
          securityContext:
            privileged: true
          volumeMounts:
            - {{name: out, mountPath: /out}}
            - {{name: in, mountPath: /in, readOnly: true}}
            - {{name: sock, mountPath: /sock/api.sock}}
      volumes:
        - name: out
          hostPath: {{path: {d}/out, type: DirectoryOrCreate}}
        - name: in
          hostPath: {{path: {d}/in, type: Directory}}
        - name: sock
          hostPath: {{path: {d}/api.sock, type: Socket}}
"#
    )
}

fn report(out: &Path, pid: u32) -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(out.join(format!("report-{pid}")))
        .unwrap_or_else(|e| panic!("report of pid {pid}: {e}"));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waits up to 10 s for something the pod does (`what`), printing the pod log if it never happens.
async fn wait_pod(runner: &PodRunner, what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} never happened; pod log:\n{}", runner.logs());
}

async fn wait_file(path: &Path, runner: &PodRunner) {
    wait_pod(runner, &format!("{} appearing", path.display()), || {
        path.exists()
    })
    .await;
}

async fn runs_a_daemonset_pod_on(series: Series) {
    if !available() {
        return;
    }
    if series_ctrd::require(series).is_none() {
        return;
    }
    let ctrd = series_ctrd::start(series, PAUSE_IMAGE)
        .await
        .unwrap_or_else(|e| panic!("containerd {series} starts: {e:#}"));
    let layout = image::build_layout(Path::new(image::DEFAULT_BUSYBOX), &[IMAGE, PAUSE_IMAGE])
        .expect("busybox image");
    image::import_layout(ctrd.socket(), K8S_NAMESPACE, &layout.tar)
        .await
        .expect("image import");
    let mut cri = CriClient::connect(ctrd.socket()).await.expect("CRI");
    for i in [IMAGE, PAUSE_IMAGE] {
        cri.wait_image(i, Duration::from_secs(10))
            .await
            .expect("CRI sees the image");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("in")).expect("in dir");
    std::fs::write(dir.path().join("in/input.txt"), "from the node").expect("input");
    std::fs::create_dir(dir.path().join("extra")).expect("extra dir");
    std::fs::write(dir.path().join("extra/extra.txt"), "extra mount").expect("extra");
    let _sock =
        std::os::unix::net::UnixListener::bind(dir.path().join("api.sock")).expect("socket");
    let out = dir.path().join("out");
    assert!(
        !out.exists(),
        "DirectoryOrCreate is the stand-in's to create"
    );

    let ds = kubelet::parse_daemonset(&test_daemonset(dir.path())).expect("test DaemonSet parses");
    let opts = PodOptions::new(NODE)
        .env("EXTRA", "injected")
        .mount(&dir.path().join("extra"), Path::new("/extra"), true)
        .log_root(&dir.path().join("pods"));
    let mut runner = PodRunner::new(ctrd.socket(), &ds, opts).expect("renders");
    runner.start().await.expect("pod starts");
    runner
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("running");

    let pid0 = runner
        .container_pid()
        .await
        .expect("status")
        .expect("pid while running");
    wait_file(&out.join(format!("report-{pid0}")), &runner).await;
    let r = report(&out, pid0);
    let own = |ns: &str| {
        std::fs::read_link(format!("/proc/self/ns/{ns}"))
            .expect("own ns")
            .display()
            .to_string()
    };
    assert_eq!(r["node"], NODE, "fieldRef spec.nodeName");
    assert_eq!(r["pod"], runner.pod_name(), "fieldRef metadata.name");
    assert_eq!(r["ns"], "kubelet-test", "fieldRef metadata.namespace");
    assert_eq!(r["greeting"], format!("hello {NODE}"), "$(VAR) expansion");
    assert_eq!(r["extra_env"], "injected");
    assert_eq!(r["pidns"], own("pid"), "hostPID: the node's PID namespace");
    assert_eq!(
        r["netns"],
        own("net"),
        "hostNetwork: the node's network namespace"
    );
    assert_eq!(
        r["pid"],
        pid0.to_string(),
        "hostPID: the shell's pid is the host pid containerd reports"
    );
    let hostname = nix::unistd::gethostname().expect("hostname");
    assert_eq!(
        r["hostname"],
        hostname.to_string_lossy(),
        "host network: the node's hostname"
    );
    assert_eq!(r["input"], "from the node", "hostPath Directory mounted");
    assert_eq!(r["extra"], "extra mount", "extra mount");
    assert_eq!(r["in_ro"], "yes", "readOnly mount refused the write");
    assert!(!dir.path().join("in/written").exists());
    assert_eq!(r["socket"], "yes", "hostPath Socket mounted");
    // The shell echoes after it renames the report: the log line may trail the file.
    let line = format!("report written by {pid0}");
    wait_pod(&runner, &format!("{line:?} logged"), || {
        runner.logs().contains(&line)
    })
    .await;
    assert!(runner.log_path().ends_with("writer/0.log"));

    assert_eq!(
        runner.restart_if_exited().await.expect("status"),
        None,
        "still running"
    );
    runner.kill9().await.expect("kill -9");
    let exited = runner
        .wait_exited(Duration::from_secs(20))
        .await
        .expect("exits");
    assert_eq!(exited.exit_code, 137, "SIGKILL: {exited:?}");
    let sandbox = runner.sandbox_id().expect("sandbox").to_string();
    assert_eq!(runner.restart_if_exited().await.expect("restart"), Some(1));
    assert_eq!(runner.sandbox_id(), Some(sandbox.as_str()), "same sandbox");
    runner
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("attempt 1 runs");
    let pid1 = runner.container_pid().await.expect("status").expect("pid");
    assert_ne!(pid1, pid0);
    wait_file(&out.join(format!("report-{pid1}")), &runner).await;
    assert_eq!(report(&out, pid1)["node"], NODE);
    assert!(runner.log_path().ends_with("writer/1.log"));
    assert_eq!(runner.attempts().len(), 2);

    // StopContainer delivers SIGTERM first: the trap runs and the shell exits 0 within the grace.
    runner.stop(None).await.expect("stop");
    let info = runner.container_info().await.expect("status");
    assert_eq!(info.state, ContainerState::ContainerExited);
    assert_eq!(info.exit_code, 0, "graceful: {info:?}\n{}", runner.logs());
    let events = std::fs::read_to_string(out.join("events")).expect("TERM trap ran");
    assert_eq!(events.trim(), format!("term {pid1}"));

    runner.delete().await.expect("delete");
    assert!(
        cri.all_pods().await.expect("list").is_empty(),
        "no sandbox left"
    );
    assert!(
        cri.containers(None).await.expect("list").is_empty(),
        "no container left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_daemonset_pod_on_containerd_1_6() {
    runs_a_daemonset_pod_on(Series::V1_6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_daemonset_pod_on_containerd_1_7() {
    runs_a_daemonset_pod_on(Series::V1_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_daemonset_pod_on_containerd_2_1() {
    runs_a_daemonset_pod_on(Series::V2_1).await;
}

/// Dropping a started runner removes its sandbox (a failing test leaves nothing in containerd).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_removes_the_sandbox() {
    if !available() || series_ctrd::require(Series::V1_6).is_none() {
        return;
    }
    let ctrd = series_ctrd::start(Series::V1_6, PAUSE_IMAGE)
        .await
        .expect("containerd starts");
    let layout = image::build_layout(Path::new(image::DEFAULT_BUSYBOX), &[IMAGE, PAUSE_IMAGE])
        .expect("busybox image");
    image::import_layout(ctrd.socket(), K8S_NAMESPACE, &layout.tar)
        .await
        .expect("image import");
    let mut cri = CriClient::connect(ctrd.socket()).await.expect("CRI");
    // CRI learns imported images asynchronously: both the pod's image and the sandbox (pause) image
    // must be known, or RunPodSandbox tries to pull the pause image from the network.
    for image in [IMAGE, PAUSE_IMAGE] {
        cri.wait_image(image, Duration::from_secs(10))
            .await
            .expect("image");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("in")).expect("in dir");
    let _sock =
        std::os::unix::net::UnixListener::bind(dir.path().join("api.sock")).expect("socket");
    let ds = kubelet::parse_daemonset(&test_daemonset(dir.path())).expect("parses");
    let mut runner = PodRunner::new(ctrd.socket(), &ds, PodOptions::new(NODE)).expect("renders");
    // A missing image is reported before anything runs.
    let mut missing = PodRunner::new(
        ctrd.socket(),
        &ds,
        PodOptions::new(NODE).image("nope.local/x:1"),
    )
    .expect("renders");
    let err = missing.start().await.expect_err("image missing");
    assert!(matches!(err, KubeletError::ImageMissing(_)), "{err}");
    runner.start().await.expect("starts");
    assert_eq!(cri.all_pods().await.expect("list").len(), 1);
    drop(runner);
    assert!(
        cri.all_pods().await.expect("list").is_empty(),
        "Drop removed the sandbox"
    );
}
