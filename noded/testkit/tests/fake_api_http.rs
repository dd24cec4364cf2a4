//! The fake Kubernetes API server over real HTTP: a kube client in ANOTHER process, configured only by
//! `KUBECONFIG` (the way noded's `Client::try_default` finds it in the node-in-a-box), patches the node
//! and applies a RuntimeClass; the fake's request log and state show exactly that.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use testkit::fake_api::{FakeApi, Fault, NODE, TOKEN, fresh_node};

const CHILD_ENV: &str = "TESTKIT_FAKE_API_CHILD";

/// Runs in a child process started by `kubeconfig_client_in_another_process` (ignored otherwise): what
/// noded does at start, through `Client::try_default` and nothing but the environment.
#[tokio::test]
#[ignore = "child of kubeconfig_client_in_another_process"]
async fn child_client_from_env() {
    assert!(
        std::env::var_os(CHILD_ENV).is_some(),
        "run only as the child of kubeconfig_client_in_another_process"
    );
    let client = kube::Client::try_default()
        .await
        .expect("client from KUBECONFIG");
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(NODE).await.expect("GET node");
    assert_eq!(node.metadata.name.as_deref(), Some(NODE));
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"noded.io/child": "yes"}}})),
        )
        .await
        .expect("merge patch of the node");
    let rcs: Api<RuntimeClass> = Api::all(client);
    let rc: RuntimeClass = serde_json::from_value(json!({
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": "kata-qemu"},
        "handler": "kata-qemu"
    }))
    .expect("RuntimeClass");
    rcs.patch(
        "kata-qemu",
        &PatchParams::apply("child").force(),
        &Patch::Apply(rc),
    )
    .await
    .expect("server-side apply of the RuntimeClass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_client_in_another_process() {
    let fake = FakeApi::new(fresh_node());
    let server = fake.serve_http().expect("listener");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.kubeconfig(dir.path()).expect("kubeconfig written");

    let exe = std::env::current_exe().expect("test binary");
    // The child's own runtime blocks nothing here: the server runs on this runtime's workers.
    let out = tokio::process::Command::new(exe)
        .args([
            "child_client_from_env",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .env("KUBECONFIG", &kubeconfig)
        // In-cluster variables must not win over KUBECONFIG (kube's `Config::infer` order).
        .env("KUBERNETES_SERVICE_HOST", "192.0.2.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .env("HOME", dir.path())
        .output()
        .await
        .expect("child runs");
    assert!(
        out.status.success(),
        "child failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "child ran no test: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let s = fake.state();
    let lines: Vec<String> = s
        .log
        .iter()
        .map(|r| format!("{} [{}] -> {}", r.line(), r.content_type, r.status))
        .collect();
    assert_eq!(
        lines,
        vec![
            format!("GET /api/v1/nodes/{NODE} [] -> 200"),
            format!("PATCH /api/v1/nodes/{NODE} [application/merge-patch+json] -> 200"),
            "PATCH /apis/node.k8s.io/v1/runtimeclasses/kata-qemu?&force=true&fieldManager=child \
             [application/apply-patch+yaml] -> 200"
                .to_string(),
        ],
        "exact requests"
    );
    for r in &s.log {
        assert_eq!(r.authorization, format!("Bearer {TOKEN}"), "{}", r.line());
    }
    assert_eq!(s.label("noded.io/child").as_deref(), Some("yes"));
    assert_eq!(s.node["metadata"]["resourceVersion"], "2");
    assert_eq!(s.runtime_classes["kata-qemu"]["handler"], "kata-qemu");
}

/// In process, the same listener: faults and down mode reach an HTTP client too, and dropping the
/// server closes the port.
#[tokio::test]
async fn faults_down_mode_and_drop_over_http() {
    let fake = FakeApi::new(fresh_node());
    let server = fake.serve_http().expect("listener");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.kubeconfig(dir.path()).expect("kubeconfig written");
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig parses"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    let client = kube::Client::try_from(config).expect("client");
    let nodes: Api<Node> = Api::all(client);

    fake.inject(Fault {
        method: "PATCH",
        path: format!("/api/v1/nodes/{NODE}"),
        content_type: None,
        status: 409,
        message: "conflict injected".into(),
    });
    let patch = Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}}));
    let err = nodes
        .patch(NODE, &PatchParams::default(), &patch)
        .await
        .expect_err("injected 409");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.message == "conflict injected"),
        "{err:?}"
    );
    nodes
        .patch(NODE, &PatchParams::default(), &patch)
        .await
        .expect("fault used up: the next patch applies");
    assert_eq!(fake.state().label("a").as_deref(), Some("b"));

    fake.set_down(true);
    let err = nodes.get(NODE).await.expect_err("down");
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "no answer while down: {err:?}"
    );
    fake.set_down(false);
    nodes.get(NODE).await.expect("up again");
    {
        let s = fake.state();
        let statuses: Vec<u16> = s.log.iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![409, 200, 0, 200]);
    }

    let addr = server.addr();
    drop(server);
    // The abort lands at the accept task's next poll.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "{addr} still accepts after drop: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
