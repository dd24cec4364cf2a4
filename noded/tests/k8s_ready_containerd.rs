//! The publisher driven by REAL probes: a private containerd 1.6 + runc probed through CRI, the
//! Kubernetes API faked at request level.

mod common;
use testkit::fake_api as k8s;

use k8s::{FakeApi, cri_probe, fresh_node, settings, start};

#[tokio::test]
async fn taint_lifted_only_after_a_real_runc_probe_sandbox_succeeded() {
    let Some(ctrd) = common::containerd::start().await else {
        return;
    };
    let fake = FakeApi::new(fresh_node());
    let run = start(&fake, settings());
    fake.wait_for("initial node read", |s| {
        s.log.iter().any(|r| r.method == "GET")
    })
    .await;

    let outcome = cri_probe(ctrd.socket(), "runc").await;
    // The probe sandbox really ran; until its outcome is recorded nothing touched the taint.
    assert_eq!(outcome, Ok(()));
    {
        let s = fake.state();
        assert!(s.has_startup_taint());
        assert!(
            s.writes()
                .iter()
                .all(|r| !r.path.starts_with("/api/v1/nodes"))
        );
    }
    run.probe("runc", outcome.is_ok(), outcome.err().as_deref());
    fake.wait_for("taint removed", |s| !s.has_startup_taint())
        .await;
    let s = fake.state();
    assert_eq!(
        s.condition("KataRuntimeReady").expect("condition")["status"],
        "True"
    );
    assert_eq!(s.label("noded.io/kata-ready").as_deref(), Some("true"));
}

#[tokio::test]
async fn unconfigured_handler_keeps_the_taint_with_containerds_error() {
    let Some(ctrd) = common::containerd::start().await else {
        return;
    };
    let fake = FakeApi::new(fresh_node());
    let mut st = settings();
    st.handlers = vec!["runc".into(), "kata-qemu".into()];
    let run = start(&fake, st);

    let ok = cri_probe(ctrd.socket(), "runc").await;
    assert_eq!(ok, Ok(()));
    run.probe("runc", true, None);
    // The private containerd has no kata-qemu handler: the kata-deploy race, caught by the probe.
    let err = cri_probe(ctrd.socket(), "kata-qemu")
        .await
        .expect_err("kata-qemu is not configured in this containerd");
    assert!(
        err.contains("no runtime for \"kata-qemu\" is configured"),
        "{err}"
    );
    run.probe("kata-qemu", false, Some(&err));
    fake.wait_for("condition False", |s| {
        s.condition("KataRuntimeReady")
            .is_some_and(|c| c["status"] == "False")
    })
    .await;
    let s = fake.state();
    assert!(
        s.has_startup_taint(),
        "one handler failing keeps the node tainted"
    );
    let msg = s.condition("KataRuntimeReady").expect("condition")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("kata-qemu") && msg.contains(&err), "{msg}");
}
