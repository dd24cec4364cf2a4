//! daemonset/ with the real tools: `kubectl kustomize` | `kubernetes-validate --strict` (Kubernetes
//! 1.33, EKS), the PrometheusRule's groups through `promtool check rules`, and the fields of the
//! Karpenter examples and the DaemonSet that the design relies on.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const K8S_VERSION: &str = "1.33.0";

fn daemonset_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset")
}

fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// The base with daemonset/examples Components, as an operator's kustomization renders it.
fn with_components(components: &[&str]) -> String {
    testkit::scenario::kustomize(components).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`with_components`], validated strictly: every document, and the DaemonSet among them.
fn validated_with_components(components: &[&str]) -> (Vec<serde_json::Value>, serde_json::Value) {
    let rendered = with_components(components);
    let out = validate(&rendered);
    assert!(
        out.status.success(),
        "{components:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let docs = yaml_docs(&rendered);
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .cloned()
        .expect("DaemonSet");
    (docs, ds)
}

fn run_stdin(cmd: &mut Command, input: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    child.wait_with_output().expect("wait")
}

/// Multi-document YAML -> JSON documents, with PyYAML (installed alongside kubernetes-validate).
fn yaml_docs(yaml: &str) -> Vec<serde_json::Value> {
    let out = run_stdin(
        Command::new("python3").args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ]),
        yaml,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn tools() -> bool {
    ["kubectl", "kubernetes-validate", "python3"]
        .iter()
        .all(|t| common::require(t).is_some())
}

fn validate(yaml: &str) -> std::process::Output {
    run_stdin(
        Command::new("kubernetes-validate").args(["--strict", "-k", K8S_VERSION, "-"]),
        yaml,
    )
}

#[test]
fn kustomize_output_validates_strictly_and_a_broken_field_fails() {
    if !tools() {
        return;
    }
    let rendered = kustomize(&daemonset_dir());
    let out = validate(&rendered);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for kind in [
        "daemonset/noded",
        "runtimeclass/kata-qemu",
        "runtimeclass/kata-qemu-warm",
        "clusterrole/noded",
        "role/noded-events",
        "validatingadmissionpolicy/noded-own-node",
        "validatingadmissionpolicybinding/noded-own-node",
        "validatingadmissionpolicy/noded-runtimeclasses",
        "validatingadmissionpolicybinding/noded-runtimeclasses",
        "configmap/noded-grafana-dashboard",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind} not validated:\n{text}"
        );
    }
    // The same check rejects an unknown field: it can fail.
    let broken = rendered.replacen("hostPID: true", "hostPID: true\n      hostPIDs: true", 1);
    assert_ne!(broken, rendered);
    assert!(!validate(&broken).status.success());
}

#[test]
fn daemonset_has_the_contracted_shape() {
    if !tools() {
        return;
    }
    let docs = yaml_docs(&kustomize(&daemonset_dir()));
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name} missing"))
    };
    // Everything in noded-system except the events Role + RoleBinding, which live where noded posts.
    for d in docs
        .iter()
        .filter(|d| d["metadata"]["namespace"].is_string())
    {
        let events = d["metadata"]["name"] == "noded-events"
            && (d["kind"] == "Role" || d["kind"] == "RoleBinding");
        let want = if events { "default" } else { "noded-system" };
        assert_eq!(d["metadata"]["namespace"], want, "{}", d["metadata"]);
    }
    assert!(
        docs.iter()
            .filter(|d| d["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("admissionregistration.k8s.io/")))
            .all(|d| d["metadata"]["namespace"].is_null()),
        "admission policies are cluster-scoped"
    );
    let ds = find("DaemonSet", "noded");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        pod["nodeSelector"]["katacontainers.io/kata-runtime"],
        "true"
    );
    let tolerations = pod["tolerations"].as_array().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["key"] == "kata" && t["value"] == "true" && t["effect"] == "NoSchedule")
    );
    assert!(
        tolerations
            .iter()
            .any(|t| t["key"] == "noded.io/runtime-not-ready" && t["effect"] == "NoSchedule")
    );
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["ports"][0]["containerPort"], 9464);
    assert!(
        c["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    assert!(c["resources"]["requests"]["memory"].is_string());
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| m["mountPath"].as_str().expect("path"))
        .collect();
    assert_eq!(
        mounts,
        [
            "/etc/noded",
            "/etc/containerd",
            "/run/containerd",
            "/opt/kata",
            "/var/lib/noded",
            "/run/noded",
            "/run/vc",
            "/run/dbus/system_bus_socket"
        ],
        "only the mounts noded needs (documented in daemonset.yaml)"
    );
    for rc in ["kata-qemu", "kata-qemu-warm"] {
        let r = find("RuntimeClass", rc);
        assert_eq!(r["handler"], rc);
        assert_eq!(
            r["scheduling"]["nodeSelector"]["katacontainers.io/kata-runtime"],
            "true"
        );
    }
    let cm = find("ConfigMap", "noded-grafana-dashboard");
    let dash: serde_json::Value =
        serde_json::from_str(cm["data"]["noded.json"].as_str().expect("dashboard"))
            .expect("dashboard JSON");
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["title"].as_str().expect("title"))
        .collect();
    for want in [
        "VM density",
        "Host memory per VM",
        "Boot latency: template vs cold (p50 / p90)",
        "Template hit ratio",
        "VM slots",
        "Restarts",
    ] {
        assert!(titles.contains(&want), "panel {want} missing: {titles:?}");
    }
    // Every metric the dashboard and rules name is in noded's contract (DESIGN section 8).
    let rules = serde_json::to_string(&find("PrometheusRule", "noded")["spec"]).expect("rules");
    let text = format!("{dash}{rules}");
    let mut named: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("noded_"))
        .map(|w| w.trim_end_matches("_bucket").to_owned())
        .collect();
    named.sort();
    named.dedup();
    for m in &named {
        assert!(
            noded::metrics::FAMILIES.contains(&m.as_str()),
            "{m} is not a noded metric"
        );
    }
    assert!(named.len() >= 10, "{named:?}");
}

#[test]
fn prometheus_rule_groups_pass_promtool() {
    if !tools() || common::require("promtool").is_none() {
        return;
    }
    let docs = yaml_docs(
        &std::fs::read_to_string(daemonset_dir().join("prometheusrule.yaml")).expect("read"),
    );
    let groups = serde_json::json!({ "groups": docs[0]["spec"]["groups"] });
    let dir = tempfile::tempdir().expect("tempdir");
    // JSON is YAML: promtool reads it as a rules file.
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, groups.to_string()).expect("write");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("promtool");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS: 6 rules found"), "{text}");
    let alerts: Vec<&str> = docs[0]["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| r["alert"].as_str().expect("alert"))
        .collect();
    for a in [
        "NodedRuntimeNotReady",
        "NodedTemplateMisses",
        "NodedBootLatencyP90High",
        "NodedVmSlotsExhausted",
    ] {
        assert!(alerts.contains(&a), "{a} missing: {alerts:?}");
    }
    // promtool can fail: a broken expression is rejected.
    std::fs::write(
        &file,
        groups
            .to_string()
            .replace("noded_runtime_ready) == 0", "noded_runtime_ready) == "),
    )
    .expect("write");
    assert!(
        !Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&file)
            .output()
            .expect("promtool")
            .status
            .success()
    );
}

/// Both seed pools: kata-metal (bare metal, on-demand) and kata-nested (c8i/m8i with EC2 nested
/// virtualization, spot + on-demand, preferred by weight). Each carries the label, the kata taint and
/// noded's startup taint, and points at its own node class on the baked AMI.
#[test]
fn karpenter_examples_declare_startup_taint_label_taint_and_baked_ami() {
    if !tools() {
        return;
    }
    let docs = yaml_docs(&kustomize(&daemonset_dir().join("examples/karpenter")));
    let of_kind = |kind: &str| -> Vec<&serde_json::Value> {
        docs.iter().filter(|d| d["kind"] == kind).collect()
    };
    let pools = of_kind("NodePool");
    let classes = of_kind("EC2NodeClass");
    let names = |v: &[&serde_json::Value]| -> Vec<String> {
        let mut n: Vec<String> = v
            .iter()
            .map(|d| d["metadata"]["name"].as_str().expect("name").to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&pools), ["kata-metal", "kata-nested"]);
    assert_eq!(names(&classes), ["kata-metal", "kata-nested"]);
    let packer = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ami/noded-kata.pkr.hcl"),
    )
    .expect("packer");
    assert!(packer.contains("\"noded.io/kata\"") && packer.contains("\"noded.io/k8s\""));
    let requirement = |pool: &serde_json::Value, key: &str| -> serde_json::Value {
        pool["spec"]["template"]["spec"]["requirements"]
            .as_array()
            .expect("reqs")
            .iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("no requirement {key}: {pool}"))
            .clone()
    };
    for pool in &pools {
        assert_eq!(pool["apiVersion"], "karpenter.sh/v1");
        let t = &pool["spec"]["template"];
        assert_eq!(
            t["metadata"]["labels"]["katacontainers.io/kata-runtime"],
            "true"
        );
        assert_eq!(
            t["spec"]["startupTaints"],
            serde_json::json!([{"key": "noded.io/runtime-not-ready", "effect": "NoSchedule"}])
        );
        assert_eq!(
            t["spec"]["taints"],
            serde_json::json!([{"key": "kata", "value": "true", "effect": "NoSchedule"}])
        );
        let class = classes
            .iter()
            .find(|c| c["metadata"]["name"] == t["spec"]["nodeClassRef"]["name"])
            .unwrap_or_else(|| panic!("nodeClassRef resolves: {pool}"));
        assert_eq!(class["apiVersion"], "karpenter.k8s.aws/v1");
        assert_eq!(class["spec"]["amiFamily"], "AL2023");
        // The AMI the Packer template tags (noded.io/kata, noded.io/k8s).
        let ami = &class["spec"]["amiSelectorTerms"][0];
        assert!(
            ami["tags"]["noded.io/kata"].is_string() && ami["tags"]["noded.io/k8s"].is_string(),
            "{ami}"
        );
        let nested = &class["spec"]["cpuOptions"]["nestedVirtualization"];
        if pool["metadata"]["name"] == "kata-metal" {
            assert_eq!(
                requirement(pool, "karpenter.k8s.aws/instance-size"),
                serde_json::json!({"key": "karpenter.k8s.aws/instance-size", "operator": "In", "values": ["metal"]})
            );
            assert!(
                nested.is_null(),
                "metal needs no nested virtualization: {class}"
            );
        } else {
            // EC2 offers NestedVirtualization only on the 8th-generation Intel families.
            let fam = requirement(pool, "karpenter.k8s.aws/instance-family");
            assert_eq!(fam["operator"], "In");
            assert_eq!(fam["values"], serde_json::json!(["c8i", "m8i"]));
            assert_eq!(
                requirement(pool, "karpenter.sh/capacity-type")["values"],
                serde_json::json!(["spot", "on-demand"])
            );
            assert_eq!(nested, "enabled", "{class}");
        }
    }
    // kata-nested is the default, kata-metal the fallback: Karpenter prefers the higher weight.
    let weight = |name: &str| {
        pools
            .iter()
            .find(|p| p["metadata"]["name"] == name)
            .and_then(|p| p["spec"]["weight"].as_i64())
            .unwrap_or(0)
    };
    assert!(weight("kata-nested") > weight("kata-metal"));
}

/// The RBAC is exactly what noded/src/k8s calls (the fake API's recorded requests in
/// noded/tests/k8s_publisher.rs): no list/watch, RuntimeClasses by name, events only in `default`.
#[test]
fn rbac_grants_exactly_what_noded_calls() {
    if !tools() {
        return;
    }
    let docs = yaml_docs(&kustomize(&daemonset_dir()));
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name} missing"))
    };
    let handlers: Vec<&str> = noded::containerd::handler::KataHandler::ALL
        .iter()
        .map(|h| h.name())
        .collect();
    assert_eq!(
        find("ClusterRole", "noded")["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
            {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"],
             "resourceNames": handlers, "verbs": ["patch", "create"]},
        ])
    );
    let events = noded::k8s::events::EVENT_NAMESPACE;
    let role = find("Role", "noded-events");
    assert_eq!(role["metadata"]["namespace"], events);
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}])
    );
    let sa = find("ServiceAccount", "noded");
    let ds = find("DaemonSet", "noded");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "noded"
    );
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": "noded",
        "namespace": sa["metadata"]["namespace"]}]);
    assert_eq!(find("ClusterRoleBinding", "noded")["subjects"], subject);
    let rb = find("RoleBinding", "noded-events");
    assert_eq!(rb["metadata"]["namespace"], events);
    assert_eq!(rb["subjects"], subject);
    // Each policy is bound, denies, and matches the service account the DaemonSet runs as.
    for policy in ["noded-own-node", "noded-runtimeclasses"] {
        let p = find("ValidatingAdmissionPolicy", policy);
        assert_eq!(p["spec"]["failurePolicy"], "Fail");
        let cond = p["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .expect("matchCondition");
        assert!(
            cond.contains("'system:serviceaccount:'") && cond.contains("':noded')"),
            "{cond}"
        );
        let b = find("ValidatingAdmissionPolicyBinding", policy);
        assert_eq!(b["spec"]["policyName"], policy);
        assert_eq!(b["spec"]["validationActions"], serde_json::json!(["Deny"]));
    }
}

/// The k3s/rke2 components (`daemonset/examples/{k3s,rke2}`): added to the base in a kustomization of
/// the operator's, they move the containerd mounts to the distribution's paths, exactly the paths
/// noded's `[containerd] flavour` uses (its template dir and socket), at the same path in the
/// container; the result still validates strictly.
#[test]
fn k3s_and_rke2_components_mount_the_paths_their_flavour_uses() {
    use noded::containerd::embedded::Flavour;
    if !tools() {
        return;
    }
    for (name, flavour) in [("k3s", Flavour::K3s), ("rke2", Flavour::Rke2)] {
        let (_, ds) = validated_with_components(&[name]);
        let spec = &ds["spec"]["template"]["spec"];
        let host_path = |volume: &str| {
            spec["volumes"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["name"] == volume))
                .and_then(|v| v["hostPath"]["path"].as_str())
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{name}: volume {volume}"))
        };
        let mount_path = |volume: &str| {
            spec["containers"][0]["volumeMounts"]
                .as_array()
                .and_then(|v| v.iter().find(|m| m["name"] == volume))
                .and_then(|m| m["mountPath"].as_str())
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{name}: mount {volume}"))
        };
        let config_dir = flavour
            .default_config()
            .and_then(|c| c.parent().map(Path::to_path_buf))
            .expect("flavour has a config dir");
        let socket_dir = flavour
            .default_socket()
            .and_then(|s| s.parent().map(Path::to_path_buf))
            .expect("flavour has a socket");
        for (volume, want) in [
            ("etc-containerd", config_dir),
            ("run-containerd", socket_dir),
        ] {
            assert_eq!(host_path(volume), want, "{name}: {volume} hostPath");
            assert_eq!(mount_path(volume), want, "{name}: {volume} mountPath");
        }
    }
}

/// `daemonset/examples/kata-canary`: a second Kata root (`installer bake --kata-root`) mounted into
/// the pod at its own path, hostPath type Directory (a node without the release fails the pod's
/// mount instead of running noded without it); the base's /opt/kata mount is kept; still strict.
/// Its handler's RuntimeClass (kata-qemu-328) is added to the ClusterRole's runtimeclasses rule and
/// to the noded-runtimeclasses policy's name check (what that policy then admits is evaluated in
/// daemonset/policy-tests/tests/admission_policy.rs).
#[test]
fn kata_canary_component_mounts_the_second_root_at_its_own_path() {
    if !tools() {
        return;
    }
    let (docs, ds) = validated_with_components(&["kata-canary"]);
    let spec = &ds["spec"]["template"]["spec"];
    for (volume, path) in [
        ("opt-kata", "/opt/kata"),
        ("opt-kata-canary", "/opt/kata-3.28"),
    ] {
        let v = spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == volume))
            .unwrap_or_else(|| panic!("volume {volume}"));
        assert_eq!(v["hostPath"]["path"], path, "{v}");
        assert_eq!(v["hostPath"]["type"], "Directory", "{v}");
        let m = spec["containers"][0]["volumeMounts"]
            .as_array()
            .and_then(|v| v.iter().find(|m| m["name"] == volume))
            .unwrap_or_else(|| panic!("mount {volume}"));
        assert_eq!(m["mountPath"], path, "{m}");
        assert!(m.get("readOnly").is_none_or(|r| r == false), "{m}");
    }

    // RBAC: the presets plus the canary's class, nothing else, and the other rules untouched.
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name} missing"))
    };
    let mut names: Vec<&str> = noded::containerd::handler::KataHandler::ALL
        .iter()
        .map(|h| h.name())
        .collect();
    names.push(CANARY_CLASS);
    assert_eq!(
        find("ClusterRole", "noded")["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
            {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"],
             "resourceNames": names, "verbs": ["patch", "create"]},
        ])
    );
    // Admission: the name check lists the same names, and its message says so.
    let check =
        &find("ValidatingAdmissionPolicy", "noded-runtimeclasses")["spec"]["validations"][0];
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    assert_eq!(
        check["expression"],
        format!("object.metadata.name in [{}]", quoted.join(", ")),
        "{check}"
    );
    let (last, presets) = names.split_last().expect("names");
    assert_eq!(
        check["message"],
        format!(
            "noded manages only the RuntimeClasses {} and {last}",
            presets.join(", ")
        ),
        "{check}"
    );
}

/// The canary handler's name in `daemonset/examples/kata-canary` (noded.toml `[[handlers]]`).
const CANARY_CLASS: &str = "kata-qemu-328";
