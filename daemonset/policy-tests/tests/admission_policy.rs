//! daemonset/admission-policy.yaml, its CEL run by a CEL interpreter against admission requests built
//! as the API server builds them: the real publisher's writes (replayed from the fake API's log) are
//! allowed for its own node and denied for another; hostile writes with noded's token are denied;
//! other users are not matched.

use std::path::{Path, PathBuf};

use daemonset_policy_tests::{Decision, PolicySet, Request};
use serde_json::{Value, json};
use testkit::fake_api::{self as k8s, FakeApi, NODE, STARTUP_TAINT};

const NODED: &str = "system:serviceaccount:noded-system:noded";
const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";
const OTHER_NODE: &str = "kata-node-2";

fn policy_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../admission-policy.yaml")
}

fn policies() -> PolicySet {
    PolicySet::load(&policy_file()).expect("admission-policy.yaml compiles")
}

/// The extra a bound token of a pod on `node` carries (TokenReview of such a token).
fn bound_token_extra(node: &str) -> Vec<(String, Vec<String>)> {
    vec![
        (
            "authentication.kubernetes.io/credential-id".into(),
            vec!["JTI=4b1e8c7a-0000-4000-8000-000000000001".into()],
        ),
        (NODE_NAME_KEY.into(), vec![node.into()]),
        (
            "authentication.kubernetes.io/node-uid".into(),
            vec!["8f0c6a8e-0000-4000-8000-000000000001".into()],
        ),
        (
            "authentication.kubernetes.io/pod-name".into(),
            vec!["noded-x7k2p".into()],
        ),
        (
            "authentication.kubernetes.io/pod-uid".into(),
            vec!["c7d2a1b3-0000-4000-8000-000000000002".into()],
        ),
    ]
}

fn sa_groups(ns: &str) -> Vec<String> {
    vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ]
}

/// A PATCH of `old` into `new` on `nodes` (or `nodes/status`), by noded's token from a pod on `claim`.
fn node_update(claim: &str, status: bool, old: &Value, new: &Value) -> Request {
    Request {
        operation: "UPDATE".into(),
        group: String::new(),
        version: "v1".into(),
        resource: "nodes".into(),
        sub_resource: if status {
            "status".into()
        } else {
            String::new()
        },
        kind: "Node".into(),
        name: new["metadata"]["name"].as_str().expect("name").into(),
        username: NODED.into(),
        groups: sa_groups("noded-system"),
        extra: bound_token_extra(claim),
        object: new.clone(),
        old_object: old.clone(),
    }
}

fn runtime_class_write(operation: &str, old: Option<&Value>, new: &Value) -> Request {
    Request {
        operation: operation.into(),
        group: "node.k8s.io".into(),
        version: "v1".into(),
        resource: "runtimeclasses".into(),
        sub_resource: String::new(),
        kind: "RuntimeClass".into(),
        name: new["metadata"]["name"].as_str().expect("name").into(),
        username: NODED.into(),
        groups: sa_groups("noded-system"),
        extra: bound_token_extra(NODE),
        object: new.clone(),
        old_object: old.cloned().unwrap_or(Value::Null),
    }
}

/// The node as a real API server holds it: what kubelet and Karpenter put there besides the fake's
/// fields (annotations, addresses, kubelet endpoint, node info, provider ID, pod CIDRs).
fn kubelet_node(name: &str) -> Value {
    let mut n = k8s::fresh_node();
    n["metadata"]["name"] = json!(name);
    n["metadata"]["labels"]["kubernetes.io/hostname"] = json!(name);
    n["metadata"]["annotations"] = json!({
        "node.alpha.kubernetes.io/ttl": "0",
        "karpenter.sh/nodepool-hash": "1234567890",
    });
    n["spec"]["providerID"] = json!("aws:///eu-west-1a/i-0123456789abcdef0");
    n["spec"]["podCIDRs"] = json!(["10.0.3.0/24"]);
    n["status"]["addresses"] = json!([
        {"type": "InternalIP", "address": "10.0.1.17"},
        {"type": "Hostname", "address": name},
    ]);
    n["status"]["daemonEndpoints"] = json!({"kubeletEndpoint": {"Port": 10250}});
    n["status"]["nodeInfo"] = json!({
        "kubeletVersion": "v1.33.1-eks-1234567", "containerRuntimeVersion": "containerd://1.7.27",
        "kernelVersion": "6.1.132-147.221.amzn2023.x86_64", "osImage": "Amazon Linux 2023",
        "architecture": "amd64", "operatingSystem": "linux",
    });
    n
}

fn assert_allowed(d: &Decision, what: &str) {
    assert_eq!(*d, Decision::Allowed, "{what}");
}

fn assert_denied(d: &Decision, what: &str, says: &str) {
    match d {
        Decision::Denied(msgs) => assert!(
            msgs.iter().any(|m| m.contains(says)),
            "{what}: denied, but not for {says:?}: {msgs:?}"
        ),
        other => panic!("{what}: expected a denial ({says}), got {other:?}"),
    }
}

/// Drives the real publisher (noded::k8s) through readiness, capacity, the warm-template condition,
/// a runtime failure that re-taints and a recovery, against the fake API; returns its log.
async fn publisher_log() -> Vec<k8s::Recorded> {
    let fake = FakeApi::new(k8s::fresh_node());
    let run = k8s::start(&fake, k8s::settings());
    run.probe("runc", true, None);
    fake.wait_for("ready", |s| !s.has_startup_taint()).await;
    let mut c = k8s::capacity(12, 10);
    c.warm_condition = Some(noded::observe::warm::WarmCondition {
        ready: true,
        reason: "TemplateRestored",
        message: "a probe sandbox was restored from the template".into(),
    });
    c.vm_cost_bytes
        .insert("kata-qemu".into(), 400 * 1024 * 1024);
    run.capacity(c);
    fake.wait_for("slots, labels, warm condition", |s| {
        s.capacity(noded::k8s::RESOURCE_VM_SLOTS).as_deref() == Some("12")
            && s.label(noded::k8s::LABEL_VM_SLOTS_FREE).is_some()
            && s.condition(noded::k8s::CONDITION_KATA_WARM_TEMPLATE_READY)
                .is_some()
    })
    .await;
    for _ in 0..3 {
        run.probe("runc", false, Some("shim died"));
    }
    fake.wait_for("tainted again", |s| s.has_startup_taint())
        .await;
    run.probe("runc", true, None);
    fake.wait_for("ready again", |s| !s.has_startup_taint())
        .await;
    run.stop().await;
    fake.state().log.clone()
}

/// (sub-resource is status, node before, node after) for every node write the fake accepted, replayed
/// from the fresh node with the fake's own patch semantics.
fn node_writes(log: &[k8s::Recorded]) -> Vec<(bool, Value, Value)> {
    let node_path = format!("/api/v1/nodes/{NODE}");
    let mut node = k8s::fresh_node();
    let mut out = Vec::new();
    for r in log
        .iter()
        .filter(|r| r.method == "PATCH" && r.status == 200 && r.path.starts_with(&node_path))
    {
        let mut next = node.clone();
        match r.content_type.as_str() {
            "application/json-patch+json" => {
                k8s::json_patch(&mut next, &r.body).expect("replayed JSON patch applies")
            }
            "application/merge-patch+json" => k8s::merge_patch(&mut next, &r.body),
            "application/strategic-merge-patch+json" => k8s::strategic_merge(&mut next, &r.body),
            other => panic!("unexpected patch type {other}"),
        }
        out.push((r.path.ends_with("/status"), node, next.clone()));
        node = next;
    }
    out
}

#[tokio::test]
async fn the_publishers_own_writes_pass_for_its_node_and_fail_for_another() {
    let set = policies();
    let log = publisher_log().await;
    let writes = node_writes(&log);
    // Every kind of write the publisher makes was exercised.
    let kinds: Vec<&str> = log
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.contains("/nodes/"))
        .map(|r| r.content_type.as_str())
        .collect();
    for k in [
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
    ] {
        assert!(kinds.contains(&k), "{k} not exercised: {kinds:?}");
    }
    assert!(writes.iter().any(|(status, _, _)| *status));
    assert!(writes.iter().any(|(status, _, _)| !*status));
    assert!(writes.len() >= 8, "{} node writes", writes.len());

    for (status, old, new) in &writes {
        let what = format!("publisher write (status={status}) {old} -> {new}");
        assert_allowed(&set.admit(&node_update(NODE, *status, old, new)), &what);
        // The same write from noded on another node: node A's token patching node B.
        assert_denied(
            &set.admit(&node_update(OTHER_NODE, *status, old, new)),
            &what,
            &format!("may modify only the node its pod runs on ({OTHER_NODE}), not {NODE}"),
        );
    }

    // The RuntimeClasses exactly as the publisher applied them, created and then updated.
    let applies: Vec<&k8s::Recorded> = log
        .iter()
        .filter(|r| r.path.starts_with("/apis/node.k8s.io/v1/runtimeclasses/"))
        .collect();
    assert!(applies.len() >= 3, "{applies:?}");
    let mut seen: std::collections::BTreeMap<String, Value> = Default::default();
    for r in applies {
        let obj = r.body.clone();
        let name = obj["metadata"]["name"].as_str().expect("name").to_owned();
        let d = match seen.get(&name) {
            None => set.admit(&runtime_class_write("CREATE", None, &obj)),
            Some(old) => set.admit(&runtime_class_write("UPDATE", Some(old), &obj)),
        };
        assert_allowed(&d, &format!("publisher's apply {obj}"));
        seen.insert(name, obj);
    }
}

#[test]
fn node_scope_denies_hostile_writes_and_ignores_other_users() {
    let set = policies();
    let old = kubelet_node(NODE);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut n = old.clone();
        f(&mut n);
        n
    };

    // noded's own kinds of change on its own node.
    let own = with(&|n| {
        n["metadata"]["labels"]["noded.io/kata-ready"] = json!("true");
        n["spec"]["taints"] = json!([{"key": "kata", "value": "true", "effect": "NoSchedule"}]);
        n["status"]["capacity"][noded::k8s::RESOURCE_VM_SLOTS] = json!("12");
        n["status"]["allocatable"][noded::k8s::RESOURCE_VM_SLOTS] = json!("12");
        n["status"]["conditions"]
            .as_array_mut()
            .expect("conditions")
            .push(json!({"type": "KataRuntimeReady", "status": "True", "reason": "RuntimeProven"}));
    });
    assert_allowed(&set.admit(&node_update(NODE, false, &old, &own)), "own");
    assert_allowed(
        &set.admit(&node_update(NODE, true, &old, &own)),
        "own status",
    );

    // Node A's token on node B.
    let b_old = kubelet_node(OTHER_NODE);
    let mut b_new = b_old.clone();
    b_new["spec"]["taints"] = json!([]);
    assert_denied(
        &set.admit(&node_update(NODE, false, &b_old, &b_new)),
        "node A patching node B",
        "may modify only the node its pod runs on (kata-node-1), not kata-node-2",
    );

    // A token without the node claim (legacy Secret token, or an API server without it).
    let mut legacy = node_update(NODE, false, &old, &own);
    legacy.extra.clear();
    assert_denied(
        &set.admit(&legacy),
        "no claim",
        "no authentication.kubernetes.io/node-name claim",
    );
    let mut two = node_update(NODE, false, &old, &own);
    two.extra = vec![(NODE_NAME_KEY.into(), vec![NODE.into(), OTHER_NODE.into()])];
    assert!(set.admit(&two).is_denied(), "two node names");

    let hostile: Vec<(&str, Value, &str)> = vec![
        (
            "drop the NodePool's kata taint",
            with(&|n| {
                n["spec"]["taints"] = json!([{"key": STARTUP_TAINT, "effect": "NoSchedule"}])
            }),
            "only its taint noded.io/runtime-not-ready",
        ),
        (
            "add a foreign NoExecute taint",
            with(&|n| {
                n["spec"]["taints"]
                    .as_array_mut()
                    .expect("taints")
                    .push(json!({"key": "evict-all", "effect": "NoExecute"}))
            }),
            "only its taint",
        ),
        (
            "remove the kata-runtime label",
            with(&|n| {
                n["metadata"]["labels"]
                    .as_object_mut()
                    .expect("labels")
                    .remove("katacontainers.io/kata-runtime");
            }),
            "only noded.io/* labels",
        ),
        (
            "set a label kubelet may not",
            with(&|n| {
                n["metadata"]["labels"]["node-restriction.kubernetes.io/pci"] = json!("true")
            }),
            "only noded.io/* labels",
        ),
        (
            "change the hostname label",
            with(&|n| n["metadata"]["labels"]["kubernetes.io/hostname"] = json!("kata-node-2")),
            "only noded.io/* labels",
        ),
        (
            "annotate",
            with(&|n| n["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] = json!("true")),
            "annotations",
        ),
        (
            "cordon",
            with(&|n| n["spec"]["unschedulable"] = json!(true)),
            "cordon",
        ),
        (
            "kubelet's Ready condition",
            with(&|n| n["status"]["conditions"][0]["status"] = json!("False")),
            "only the KataRuntimeReady and KataWarmTemplateReady conditions",
        ),
        (
            "drop kubelet's Ready condition",
            with(&|n| n["status"]["conditions"] = json!([])),
            "conditions",
        ),
        (
            "raise cpu capacity",
            with(&|n| n["status"]["capacity"]["cpu"] = json!("960")),
            "only the noded.io/vm-slots extended resource",
        ),
        (
            "advertise another extended resource",
            with(&|n| n["status"]["allocatable"]["nvidia.com/gpu"] = json!("8")),
            "only the noded.io/vm-slots extended resource",
        ),
        (
            "redirect the API server's kubelet traffic",
            with(&|n| n["status"]["addresses"][0]["address"] = json!("203.0.113.9")),
            "addresses",
        ),
        (
            "kubelet port",
            with(&|n| n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] = json!(10255)),
            "kubelet endpoint",
        ),
    ];
    for (what, new, says) in &hostile {
        for status in [false, true] {
            assert_denied(
                &set.admit(&node_update(NODE, status, &old, new)),
                what,
                says,
            );
        }
        // The same change by another identity is not this policy's business.
        for (user, groups) in [
            ("system:node:kata-node-1", vec!["system:nodes".to_string()]),
            (
                "system:serviceaccount:kube-system:node-controller",
                sa_groups("kube-system"),
            ),
            ("kubernetes-admin", vec!["system:masters".to_string()]),
        ] {
            let mut r = node_update(NODE, false, &old, new);
            r.username = user.into();
            r.groups = groups;
            assert_eq!(set.admit(&r), Decision::NotMatched, "{what} by {user}");
        }
    }

    // A service account named noded in another namespace is held to the same rules.
    let mut elsewhere = node_update(OTHER_NODE, false, &old, &own);
    elsewhere.username = "system:serviceaccount:kata-ops:noded".into();
    assert!(set.admit(&elsewhere).is_denied());
    // Not a node: untouched.
    let mut pod = node_update(NODE, false, &old, &own);
    pod.resource = "pods".into();
    assert_eq!(set.admit(&pod), Decision::NotMatched);
}

/// The memory overhead as the API server serialises it (canonical: 2048Mi is 2Gi).
fn canonical_mib(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{}Gi", mib / 1024)
    } else {
        format!("{mib}Mi")
    }
}

#[test]
fn runtime_classes_keep_handler_scheduling_and_bounded_overhead() {
    use noded::k8s::signals::{MAX_OVERHEAD_MIB, MIN_OVERHEAD_MIB};
    let set = policies();
    let class = |name: &str, mib: u64| {
        let mut c = noded::k8s::runtimeclass::runtime_class(name, mib);
        c["overhead"]["podFixed"]["memory"] = json!(canonical_mib(mib));
        c
    };
    // Every class noded can own, at every bound noded publishes.
    for h in noded::containerd::handler::KataHandler::ALL {
        for mib in [
            MIN_OVERHEAD_MIB,
            160,
            1000,
            1024,
            1536,
            2047,
            MAX_OVERHEAD_MIB,
        ] {
            let c = class(h.name(), mib);
            assert_allowed(
                &set.admit(&runtime_class_write("CREATE", None, &c)),
                &c.to_string(),
            );
        }
    }
    let good = class("kata-qemu", 170);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        c
    };
    let hostile: Vec<(&str, Value, &str)> = vec![
        (
            "a class noded does not own",
            with(&|c| {
                c["metadata"]["name"] = json!("kata-evil");
                c["handler"] = json!("kata-evil");
            }),
            "manages only the RuntimeClasses",
        ),
        (
            "no VM: handler runc",
            with(&|c| c["handler"] = json!("runc")),
            "handler of its own name",
        ),
        (
            "steer Kata pods to one node",
            with(&|c| c["scheduling"]["nodeSelector"]["kubernetes.io/hostname"] = json!(NODE)),
            "scheduling only",
        ),
        (
            "tolerate everything",
            with(&|c| c["scheduling"]["tolerations"] = json!([{"operator": "Exists"}])),
            "scheduling only",
        ),
        (
            "no scheduling",
            with(&|c| {
                c.as_object_mut().expect("class").remove("scheduling");
            }),
            "scheduling only",
        ),
        (
            "overhead below the floor",
            with(&|c| c["overhead"]["podFixed"]["memory"] = json!("63Mi")),
            "overhead only",
        ),
        (
            "overhead above the cap",
            with(&|c| c["overhead"]["podFixed"]["memory"] = json!("2049Mi")),
            "overhead only",
        ),
        (
            "every Kata pod unschedulable",
            with(&|c| c["overhead"]["podFixed"]["memory"] = json!("3Gi")),
            "overhead only",
        ),
        (
            "cpu overhead",
            with(&|c| c["overhead"]["podFixed"]["cpu"] = json!("64")),
            "overhead only",
        ),
        (
            "another overhead resource",
            with(&|c| c["overhead"]["podFixed"]["nvidia.com/gpu"] = json!("1")),
            "overhead only",
        ),
    ];
    for (what, c, says) in &hostile {
        assert_denied(
            &set.admit(&runtime_class_write("CREATE", None, c)),
            what,
            says,
        );
        if c["metadata"]["name"] == good["metadata"]["name"] && c["handler"] == good["handler"] {
            assert_denied(
                &set.admit(&runtime_class_write("UPDATE", Some(&good), c)),
                what,
                says,
            );
        }
        let mut admin = runtime_class_write("CREATE", None, c);
        admin.username = "kubernetes-admin".into();
        admin.extra.clear();
        assert_eq!(
            set.admit(&admin),
            Decision::NotMatched,
            "{what} by an admin"
        );
    }
    // What noded's apply leaves unchanged is not its doing: an operator's extra selector key, or an
    // overhead an operator set outside the bounds, survive noded's updates.
    let mut operator = good.clone();
    operator["scheduling"]["nodeSelector"]["topology.kubernetes.io/zone"] = json!("eu-west-1a");
    operator["overhead"]["podFixed"]["memory"] = json!("4Gi");
    assert_allowed(
        &set.admit(&runtime_class_write("UPDATE", Some(&operator), &operator)),
        "unchanged operator edits",
    );
    // But noded making them on CREATE is not.
    assert!(
        set.admit(&runtime_class_write("CREATE", None, &operator))
            .is_denied()
    );
}

/// `kubectl kustomize` of the base with `components`, as an operator's kustomization adds them.
fn kustomize(components: &[&str]) -> String {
    testkit::scenario::kustomize(components).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `daemonset/examples/kata-canary` rendered with the base as an operator renders it: the canary
/// handler's class kata-qemu-328 is admitted (created and updated) and still held to the handler,
/// scheduling and overhead checks; the presets stay admitted; any other name is still refused, with a
/// message naming the canary. The base alone refuses kata-qemu-328.
#[test]
fn kata_canary_component_admits_its_class_and_no_other() {
    const CANARY: &str = "kata-qemu-328";
    if testkit::require::require("kubectl").is_none() {
        return;
    }
    let base = PolicySet::parse("kustomize base", &kustomize(&[])).expect("base");
    let canary = PolicySet::parse("kustomize base + kata-canary", &kustomize(&["kata-canary"]))
        .expect("base + kata-canary");
    for set in [&base, &canary] {
        for p in ["noded-own-node", "noded-runtimeclasses"] {
            assert!(set.policy(p).is_some(), "{p} not bound");
        }
    }
    let class = |name: &str| {
        let mut c = noded::k8s::runtimeclass::runtime_class(name, 170);
        c["overhead"]["podFixed"]["memory"] = json!(canonical_mib(170));
        c
    };

    for h in noded::containerd::handler::KataHandler::ALL {
        let c = class(h.name());
        for (set, what) in [(&base, "base"), (&canary, "kata-canary")] {
            assert_allowed(
                &set.admit(&runtime_class_write("CREATE", None, &c)),
                &format!("{what}: {c}"),
            );
        }
    }

    let c = class(CANARY);
    assert_denied(
        &base.admit(&runtime_class_write("CREATE", None, &c)),
        "base: the canary's class",
        "noded manages only the RuntimeClasses kata-qemu, kata-qemu-warm, kata-clh and kata-fc",
    );
    assert_allowed(
        &canary.admit(&runtime_class_write("CREATE", None, &c)),
        "kata-canary: create the canary's class",
    );
    let mut resized = c.clone();
    resized["overhead"]["podFixed"]["memory"] = json!(canonical_mib(400));
    assert_allowed(
        &canary.admit(&runtime_class_write("UPDATE", Some(&c), &resized)),
        "kata-canary: update the canary's class",
    );
    let mut runc = c.clone();
    runc["handler"] = json!("runc");
    assert_denied(
        &canary.admit(&runtime_class_write("CREATE", None, &runc)),
        "kata-canary: the canary's class on runc",
        "handler of its own name",
    );
    let mut steered = c.clone();
    steered["scheduling"]["nodeSelector"]["kubernetes.io/hostname"] = json!(NODE);
    assert_denied(
        &canary.admit(&runtime_class_write("CREATE", None, &steered)),
        "kata-canary: the canary's class steered to one node",
        "scheduling only",
    );

    // Names the component does not add, including near misses of the canary's.
    for other in ["kata-evil", "kata-qemu-32", "kata-qemu-3280", "runc"] {
        assert_denied(
            &canary.admit(&runtime_class_write("CREATE", None, &class(other))),
            &format!("kata-canary: {other}"),
            "noded manages only the RuntimeClasses kata-qemu, kata-qemu-warm, kata-clh, kata-fc and kata-qemu-328",
        );
    }
}

/// The policy names what noded really writes: change a constant in noded/src/k8s without the policy
/// and this fails (the publisher replay above catches the behaviour; this names the culprit).
#[test]
fn policy_names_nodeds_taint_labels_conditions_and_resource() {
    let set = policies();
    let text = set
        .policy("noded-own-node")
        .expect("noded-own-node is bound")
        .expressions()
        .join("\n");
    let default_taint = noded::config::KubernetesSection::default().startup_taint;
    assert_eq!(default_taint, STARTUP_TAINT);
    assert!(text.contains(&format!("'{default_taint}'")), "{text}");
    for c in [
        noded::k8s::CONDITION_KATA_RUNTIME_READY,
        noded::k8s::CONDITION_KATA_WARM_TEMPLATE_READY,
        noded::k8s::RESOURCE_VM_SLOTS,
    ] {
        assert!(text.contains(&format!("'{c}'")), "{c} not in the policy");
    }
    for l in [
        noded::k8s::LABEL_KATA_READY,
        noded::k8s::LABEL_VM_SLOTS_FREE,
        noded::k8s::LABEL_BOOT_P50_MS,
        noded::k8s::LABEL_WARM_TEMPLATES,
    ] {
        assert!(l.starts_with("noded.io/"), "{l} is outside noded.io/*");
    }
    assert!(set.policy("noded-runtimeclasses").is_some());
}

/// The evaluator itself can fail: a broken expression is refused with the file and field named, an
/// unbound policy is not applied, and a policy that errors at run time denies (failurePolicy Fail).
#[test]
fn evaluator_rejects_broken_policies_and_fails_closed() {
    let text = std::fs::read_to_string(policy_file()).expect("read");
    let broken = text.replacen("size(variables.claim) == 1", "size(variables.claim) ==", 1);
    assert_ne!(broken, text);
    let e = PolicySet::parse("admission-policy.yaml", &broken).expect_err("broken CEL");
    let msg = e.to_string();
    assert!(
        msg.contains("admission-policy.yaml: noded-own-node: validations[0].expression"),
        "{msg}"
    );

    let unbound = text.replace("policyName: noded-own-node", "policyName: nothing");
    let set = PolicySet::parse("x", &unbound).expect("parses");
    assert!(set.policy("noded-own-node").is_none());
    let old = kubelet_node(OTHER_NODE);
    assert_eq!(
        set.admit(&node_update(NODE, false, &old, &old)),
        Decision::NotMatched
    );

    // A typo'd field is an evaluation error: the request is denied, not waved through.
    let typo = text.replace("object.metadata.name]", "object.metadata.nmae]");
    let set = PolicySet::parse("x", &typo).expect("parses");
    let node = kubelet_node(NODE);
    assert_denied(
        &set.admit(&node_update(NODE, false, &node, &node)),
        "typo",
        "evaluation error",
    );
}
