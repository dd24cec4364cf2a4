//! Kubernetes publisher against a request-level fake API server that asserts the exact requests.

use testkit::fake_api as k8s;

use std::time::Duration;

use k8s::{FakeApi, Fault, NODE, STARTUP_TAINT, capacity, fresh_node, settings, start};
use noded::k8s::{Notice, Readiness};
use serde_json::json;

const NODE_PATH: &str = "/api/v1/nodes/kata-node-1";
const STATUS_PATH: &str = "/api/v1/nodes/kata-node-1/status";

fn lines(fake: &FakeApi, from: usize) -> Vec<String> {
    fake.state().log[from..]
        .iter()
        .map(|r| format!("{} [{}] -> {}", r.line(), r.content_type, r.status))
        .collect()
}

fn startup_patch_remove() -> serde_json::Value {
    json!([
        {"op": "test", "path": "/spec/taints", "value": [
            {"key": "kata", "value": "true", "effect": "NoSchedule"},
            {"key": STARTUP_TAINT, "effect": "NoSchedule"}]},
        {"op": "replace", "path": "/spec/taints", "value": [
            {"key": "kata", "value": "true", "effect": "NoSchedule"}]}
    ])
}

#[tokio::test]
async fn happy_path_taint_lifted_only_after_probe_succeeded() {
    let fake = FakeApi::new(fresh_node());
    let run = start(&fake, settings());

    // Start-up: RuntimeClasses by server-side apply, then a read of the node — and no node write.
    fake.wait_for("initial node read", |s| {
        s.log.iter().any(|r| r.method == "GET")
    })
    .await;
    assert_eq!(
        lines(&fake, 0),
        vec![
            "PATCH /apis/node.k8s.io/v1/runtimeclasses/kata-qemu?&force=true&fieldManager=noded [application/apply-patch+yaml] -> 200",
            "PATCH /apis/node.k8s.io/v1/runtimeclasses/kata-qemu-warm?&force=true&fieldManager=noded [application/apply-patch+yaml] -> 200",
            "GET /api/v1/nodes/kata-node-1 [] -> 200",
        ]
    );
    {
        let s = fake.state();
        assert_eq!(
            s.log[0].body,
            json!({
                "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                "metadata": {"name": "kata-qemu", "labels": {"app.kubernetes.io/managed-by": "noded"}},
                "handler": "kata-qemu",
                "overhead": {"podFixed": {"memory": "160Mi", "cpu": "250m"}},
                "scheduling": {
                    "nodeSelector": {"katacontainers.io/kata-runtime": "true"},
                    "tolerations": [{"key": "kata", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
                }
            })
        );
        assert_eq!(s.log[1].body["handler"], "kata-qemu-warm");
        assert!(s.has_startup_taint(), "no probe yet: the taint must stay");
    }

    let before = fake.state().log.len();
    run.probe("runc", true, None);
    fake.wait_for("taint removed and event posted", |s| {
        !s.has_startup_taint() && s.event_reasons().contains(&"KataRuntimeReady".to_string())
    })
    .await;

    assert_eq!(
        lines(&fake, before),
        vec![
            "GET /api/v1/nodes/kata-node-1 [] -> 200",
            "PATCH /api/v1/nodes/kata-node-1?fieldManager=noded [application/merge-patch+json] -> 200",
            "PATCH /api/v1/nodes/kata-node-1/status?fieldManager=noded [application/strategic-merge-patch+json] -> 200",
            "PATCH /api/v1/nodes/kata-node-1?fieldManager=noded [application/json-patch+json] -> 200",
            "POST /apis/events.k8s.io/v1/namespaces/default/events [application/json] -> 201",
        ]
    );
    let s = fake.state();
    let log = &s.log[before..];
    assert_eq!(
        log[1].body,
        json!({"metadata": {"labels": {"noded.io/kata-ready": "true"}}})
    );
    let cond = &log[2].body["status"]["conditions"][0];
    assert_eq!(cond["type"], "KataRuntimeReady");
    assert_eq!(cond["status"], "True");
    assert_eq!(cond["reason"], "RuntimeProven");
    assert_eq!(cond["message"], "runtime handlers passed their probe: runc");
    assert_eq!(log[3].body, startup_patch_remove());
    assert_eq!(log[4].body["regarding"]["name"], NODE);
    assert_eq!(
        log[4].body["regarding"]["uid"],
        "8f0c6a8e-0000-4000-8000-000000000001"
    );
    assert_eq!(log[4].body["reportingController"], "noded.io/noded");
    // Other taints and kubelet's own condition are untouched.
    assert_eq!(s.taint_keys(), vec!["kata".to_string()]);
    assert_eq!(
        s.condition("Ready").expect("kubelet condition kept")["status"],
        "True"
    );
    assert_eq!(s.label("noded.io/kata-ready").as_deref(), Some("true"));
    assert_eq!(
        s.label("katacontainers.io/kata-runtime").as_deref(),
        Some("true")
    );
    drop(s);
    assert_eq!(run.status.borrow().readiness, Readiness::Ready);
}

#[tokio::test]
async fn probe_failure_keeps_taint_sets_condition_false_and_posts_event() {
    let fake = FakeApi::new(fresh_node());
    let run = start(&fake, settings());
    fake.wait_for("initial node read", |s| {
        s.log.iter().any(|r| r.method == "GET")
    })
    .await;
    let err = "failed to create containerd task: no runtime for \"runc\" is configured";
    run.probe("runc", false, Some(err));
    fake.wait_for("condition False and event", |s| {
        s.condition("KataRuntimeReady")
            .is_some_and(|c| c["status"] == "False")
            && s.event_reasons().contains(&"ProbeFailed".to_string())
    })
    .await;
    let s = fake.state();
    assert!(s.has_startup_taint());
    assert!(
        !s.log
            .iter()
            .any(|r| r.content_type == "application/json-patch+json"),
        "no taint patch may be sent before a successful probe"
    );
    let c = s.condition("KataRuntimeReady").expect("condition");
    assert_eq!(c["reason"], "ProbeFailed");
    assert_eq!(
        c["message"],
        format!("runtime handler runc: probe failed 1 time(s) in a row: {err}")
    );
    assert_eq!(s.label("noded.io/kata-ready").as_deref(), Some("false"));
    let ev = s
        .events
        .iter()
        .find(|e| e["reason"] == "ProbeFailed")
        .expect("event");
    assert_eq!(ev["type"], "Warning");
    assert!(ev["note"].as_str().is_some_and(|n| n.contains(err)), "{ev}");
}

#[tokio::test]
async fn runtime_breaking_later_puts_the_taint_back_after_threshold() {
    let fake = FakeApi::new(fresh_node());
    let run = start(&fake, settings());
    run.probe("runc", true, None);
    fake.wait_for("ready", |s| !s.has_startup_taint()).await;

    // One failure on a proven node: an event, but the node stays schedulable (threshold is 3).
    run.probe("runc", false, Some("shim died"));
    fake.wait_for("probe failure event", |s| {
        s.event_reasons().contains(&"ProbeFailed".to_string())
    })
    .await;
    {
        let s = fake.state();
        assert!(!s.has_startup_taint());
        assert_eq!(
            s.condition("KataRuntimeReady").expect("condition")["status"],
            "True"
        );
    }

    let before = fake.state().log.len();
    run.probe("runc", false, Some("shim died"));
    run.probe("runc", false, Some("shim died"));
    fake.wait_for("taint back and condition False", |s| {
        s.has_startup_taint()
            && s.condition("KataRuntimeReady")
                .is_some_and(|c| c["status"] == "False")
            && s.event_reasons()
                .contains(&"KataRuntimeNotReady".to_string())
    })
    .await;
    let s = fake.state();
    let log = &s.log[before..];
    // Tainting goes first.
    let first_write = log.iter().find(|r| r.method == "PATCH").expect("a write");
    assert_eq!(first_write.content_type, "application/json-patch+json");
    assert_eq!(
        first_write.body,
        json!([
            {"op": "test", "path": "/spec/taints", "value": [{"key": "kata", "value": "true", "effect": "NoSchedule"}]},
            {"op": "replace", "path": "/spec/taints", "value": [
                {"key": "kata", "value": "true", "effect": "NoSchedule"},
                {"key": STARTUP_TAINT, "effect": "NoSchedule"}]}
        ])
    );
    let c = s.condition("KataRuntimeReady").expect("condition");
    assert_eq!(c["reason"], "ProbeFailed");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("3 time(s) in a row: shim died")),
        "{c}"
    );
    assert_eq!(s.label("noded.io/kata-ready").as_deref(), Some("false"));
}

#[tokio::test]
async fn kubelet_wiping_the_extended_resource_gets_it_reasserted() {
    let fake = FakeApi::new(fresh_node());
    let mut st = settings();
    st.resync = Duration::from_millis(50);
    let run = start(&fake, st);
    run.capacity(capacity(12, 12));
    run.probe("runc", true, None);
    fake.wait_for("slots advertised", |s| {
        s.capacity("noded.io/vm-slots").as_deref() == Some("12")
            && s.allocatable("noded.io/vm-slots").as_deref() == Some("12")
    })
    .await;

    // kubelet re-registers the node and zeroes extended resources it does not own.
    fake.mutate_node(|n| {
        n["status"]["capacity"]["noded.io/vm-slots"] = json!("0");
        n["status"]["allocatable"]
            .as_object_mut()
            .expect("allocatable")
            .remove("noded.io/vm-slots");
    });
    let before = fake.state().log.len();
    fake.wait_for("slots re-asserted", |s| {
        s.capacity("noded.io/vm-slots").as_deref() == Some("12")
            && s.allocatable("noded.io/vm-slots").as_deref() == Some("12")
    })
    .await;
    let s = fake.state();
    let patch = s.log[before..]
        .iter()
        .find(|r| r.path == STATUS_PATH && r.content_type == "application/json-patch+json")
        .expect("status JSON patch");
    assert_eq!(patch.query, "fieldManager=noded");
    assert_eq!(
        patch.body,
        json!([
            {"op": "add", "path": "/status/capacity/noded.io~1vm-slots", "value": "12"},
            {"op": "add", "path": "/status/allocatable/noded.io~1vm-slots", "value": "12"}
        ])
    );
    assert!(!s.has_startup_taint());
}

fn label_patches(fake: &FakeApi) -> Vec<serde_json::Value> {
    fake.state()
        .log
        .iter()
        .filter(|r| r.content_type == "application/merge-patch+json")
        .map(|r| r.body.clone())
        .collect()
}

/// Sends a notice and waits for its event: every input sent before it has been handled by then.
async fn barrier(fake: &FakeApi, run: &k8s::Running, n: usize) {
    run.handles
        .notices
        .send(Notice::ConfigApplied {
            detail: format!("barrier {n}"),
        })
        .await
        .expect("publisher alive");
    fake.wait_for("barrier event", |s| {
        s.events
            .iter()
            .filter(|e| e["reason"] == "ContainerdConfigApplied")
            .count()
            >= n
    })
    .await;
}

#[tokio::test]
async fn label_flapping_is_suppressed_by_the_hysteresis_band() {
    let fake = FakeApi::new(fresh_node());
    let run = start(&fake, settings());
    run.capacity(capacity(48, 40));
    fake.wait_for("labels published", |s| {
        s.label("noded.io/vm-slots-free").as_deref() == Some("40")
    })
    .await;
    assert_eq!(
        label_patches(&fake),
        vec![json!({"metadata": {"labels": {
            "noded.io/vm-slots-free": "40", "noded.io/boot-p50-ms": "300", "noded.io/warm-templates": "1"}}})]
    );
    // Within the band (|Δ| < max(2, 10%)): no write, however often it wiggles.
    for free in [38, 41, 37, 39, 40] {
        run.capacity(capacity(48, free));
    }
    barrier(&fake, &run, 1).await;
    assert_eq!(label_patches(&fake).len(), 1, "{:?}", label_patches(&fake));
    assert_eq!(
        fake.state().label("noded.io/vm-slots-free").as_deref(),
        Some("40")
    );

    // Past the band: written, only the label that moved.
    run.capacity(capacity(48, 30));
    fake.wait_for("moved label", |s| {
        s.label("noded.io/vm-slots-free").as_deref() == Some("30")
    })
    .await;
    assert_eq!(
        label_patches(&fake)[1],
        json!({"metadata": {"labels": {"noded.io/vm-slots-free": "30"}}})
    );
}

#[tokio::test]
async fn label_rate_limit_holds_changes_within_the_interval() {
    let fake = FakeApi::new(fresh_node());
    let mut st = settings();
    st.label_interval = Duration::from_secs(3600);
    let run = start(&fake, st);
    run.capacity(capacity(48, 40));
    fake.wait_for("labels published", |s| {
        s.label("noded.io/vm-slots-free").as_deref() == Some("40")
    })
    .await;
    run.capacity(capacity(48, 3));
    run.capacity(capacity(48, 45));
    run.capacity(capacity(48, 10));
    barrier(&fake, &run, 1).await;
    assert_eq!(label_patches(&fake).len(), 1);
    assert_eq!(
        fake.state().label("noded.io/vm-slots-free").as_deref(),
        Some("40")
    );
}

#[tokio::test]
async fn taint_patch_conflicts_are_reread_and_retried() {
    let fake = FakeApi::new(fresh_node());
    fake.inject(Fault {
        method: "PATCH",
        path: NODE_PATH.into(),
        content_type: Some("application/json-patch+json"),
        status: 409,
        message:
            "Operation cannot be fulfilled on nodes \"kata-node-1\": the object has been modified"
                .into(),
    });
    fake.inject(Fault {
        method: "PATCH",
        path: NODE_PATH.into(),
        content_type: Some("application/json-patch+json"),
        status: 422,
        message: "the server rejected our request due to an error in our request: testing value /spec/taints failed".into(),
    });
    let run = start(&fake, settings());
    fake.wait_for("initial node read", |s| {
        s.log.iter().any(|r| r.method == "GET")
    })
    .await;
    let before = fake.state().log.len();
    run.probe("runc", true, None);
    fake.wait_for("taint removed", |s| !s.has_startup_taint())
        .await;
    let taint_and_reads: Vec<String> = fake.state().log[before..]
        .iter()
        .filter(|r| r.method == "GET" || r.content_type == "application/json-patch+json")
        .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
        .collect();
    assert_eq!(
        taint_and_reads,
        vec![
            format!("GET {NODE_PATH} -> 200"),
            format!("PATCH {NODE_PATH} -> 409"),
            format!("GET {NODE_PATH} -> 200"),
            format!("PATCH {NODE_PATH} -> 422"),
            format!("GET {NODE_PATH} -> 200"),
            format!("PATCH {NODE_PATH} -> 200"),
        ]
    );
    let s = fake.state();
    let patches: Vec<_> = s.log[before..]
        .iter()
        .filter(|r| r.content_type == "application/json-patch+json")
        .collect();
    for p in patches {
        assert_eq!(p.body, startup_patch_remove());
    }
}

#[tokio::test]
async fn api_down_at_start_keeps_node_tainted_then_converges() {
    let fake = FakeApi::new(fresh_node());
    fake.set_down(true);
    let mut run = start(&fake, settings());
    run.probe("runc", true, None);
    fake.wait_for("three failed attempts", |s| {
        s.log.iter().filter(|r| r.status == 0).count() >= 3
    })
    .await;
    {
        let s = fake.state();
        assert!(s.has_startup_taint());
        assert!(s.writes().is_empty());
    }
    {
        let st = run.status.borrow_and_update();
        assert!(!st.synced);
        assert!(
            st.last_error
                .as_deref()
                .is_some_and(|e| e.contains("connection refused")),
            "{st:?}"
        );
    }
    // 429 and 503 while coming back are retried too.
    fake.inject(Fault {
        method: "GET",
        path: NODE_PATH.into(),
        content_type: None,
        status: 503,
        message: "etcdserver: leader changed".into(),
    });
    fake.inject(Fault {
        method: "GET",
        path: NODE_PATH.into(),
        content_type: None,
        status: 429,
        message: "too many requests".into(),
    });
    fake.set_down(false);
    fake.wait_for("converged", |s| {
        !s.has_startup_taint() && s.runtime_classes.len() == 2
    })
    .await;
    {
        let s = fake.state();
        let statuses: Vec<u16> = s
            .log
            .iter()
            .filter(|r| r.method == "GET")
            .map(|r| r.status)
            .collect();
        assert!(
            statuses.contains(&503) && statuses.contains(&429),
            "{statuses:?}"
        );
        assert_eq!(
            s.condition("KataRuntimeReady").expect("condition")["status"],
            "True"
        );
    }
    run.status
        .wait_for(|st| st.synced && st.readiness == Readiness::Ready)
        .await
        .expect("publisher alive");
}

#[tokio::test]
async fn shutdown_leaves_the_node_alone() {
    let fake = FakeApi::new(fresh_node());
    let run = start(&fake, settings());
    run.probe("runc", true, None);
    fake.wait_for("ready", |s| !s.has_startup_taint()).await;
    fake.wait_for("ready event", |s| {
        s.event_reasons().contains(&"KataRuntimeReady".to_string())
    })
    .await;
    let before = fake.state().log.len();
    run.stop().await;
    assert_eq!(
        lines(&fake, before),
        Vec::<String>::new(),
        "no request after shutdown"
    );
    assert!(
        !fake.state().has_startup_taint(),
        "SIGTERM must not re-taint the node"
    );
}

#[tokio::test]
async fn runtimeclass_overhead_follows_measured_cost_outside_a_10_percent_band() {
    let fake = FakeApi::new(fresh_node());
    let run = start(&fake, settings());
    fake.wait_for("initial apply", |s| s.runtime_classes.len() == 2)
        .await;
    let mut c = capacity(8, 8);
    c.vm_cost_bytes
        .insert("kata-qemu-warm".into(), 100 * 1024 * 1024 + 5);
    c.vm_cost_bytes
        .insert("kata-qemu".into(), 150 * 1024 * 1024);
    run.capacity(c.clone());
    fake.wait_for("overhead updated", |s| {
        s.runtime_classes["kata-qemu-warm"]["overhead"]["podFixed"]["memory"] == "101Mi"
    })
    .await;
    {
        let s = fake.state();
        // kata-qemu measured 150 MiB against its 160 MiB start: inside the 10% band, not rewritten.
        assert_eq!(
            s.runtime_classes["kata-qemu"]["overhead"]["podFixed"]["memory"],
            "160Mi"
        );
    }
    let applies = |f: &FakeApi| {
        f.state()
            .log
            .iter()
            .filter(|r| r.path.starts_with("/apis/node.k8s.io/"))
            .count()
    };
    assert_eq!(
        applies(&fake),
        3,
        "only the class whose cost moved is re-applied"
    );
    c.vm_cost_bytes
        .insert("kata-qemu-warm".into(), 106 * 1024 * 1024);
    run.capacity(c);
    barrier(&fake, &run, 1).await;
    assert_eq!(
        applies(&fake),
        3,
        "a 5% move must not rewrite the RuntimeClasses"
    );
}

/// A `[[handlers]]` class the cluster refuses (the shipped RBAC and admission policy name only the
/// presets: 403) does not hold the node tainted: the presets' classes are written, the refused one is
/// asked for once (not in a loop), and the taint goes once the probe passed. A refused preset class
/// still blocks (it is part of the install).
#[tokio::test]
async fn a_refused_custom_runtimeclass_does_not_hold_the_taint() {
    let fake = FakeApi::new(fresh_node());
    const CUSTOM: &str = "/apis/node.k8s.io/v1/runtimeclasses/kata-qemu-big";
    for _ in 0..20 {
        fake.inject(Fault {
            method: "PATCH",
            path: CUSTOM.into(),
            content_type: None,
            status: 403,
            message: "runtimeclasses.node.k8s.io \"kata-qemu-big\" is forbidden".into(),
        });
    }
    let mut s = settings();
    s.runtime_classes.push("kata-qemu-big".into());
    let run = start(&fake, s);
    run.probe("runc", true, None);
    fake.wait_for("taint removed", |s| !s.has_startup_taint())
        .await;
    {
        let s = fake.state();
        assert!(s.runtime_classes.contains_key("kata-qemu"));
        assert!(s.runtime_classes.contains_key("kata-qemu-warm"));
        assert!(!s.runtime_classes.contains_key("kata-qemu-big"));
        let asked = s.log.iter().filter(|r| r.path.starts_with(CUSTOM)).count();
        assert_eq!(asked, 1, "refused class asked once, not retried in a loop");
    }

    // The same refusal for a preset keeps the node tainted.
    let fake = FakeApi::new(fresh_node());
    for _ in 0..20 {
        fake.inject(Fault {
            method: "PATCH",
            path: "/apis/node.k8s.io/v1/runtimeclasses/kata-qemu".into(),
            content_type: None,
            status: 403,
            message: "forbidden".into(),
        });
    }
    let run2 = start(&fake, settings());
    run2.probe("runc", true, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fake.state().has_startup_taint(),
        "a preset class is part of the install"
    );
    drop(run);
}
