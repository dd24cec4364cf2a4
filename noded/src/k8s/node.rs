//! The node object: startup taint, labels, the `KataRuntimeReady` condition and the `noded.io/vm-slots`
//! extended resource. Patches are computed from the node as last read, so the publisher only writes
//! what differs, and each kind of write uses the patch type that cannot clobber other writers:
//! - taints: JSON patch guarded by a `test` op on the exact taint list the patch was computed from;
//! - labels: JSON merge patch of our keys only (a merge patch on a map leaves other keys alone);
//! - condition: strategic merge patch on `nodes/status` (conditions merge by `type`, so kubelet's
//!   conditions stay untouched — a merge patch would replace the whole list);
//! - extended resource: JSON patch `add` on `nodes/status` capacity/allocatable (the documented way to
//!   advertise an extended resource).

use http::Request;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::{FIELD_MANAGER, RESOURCE_VM_SLOTS};

/// Effect of the startup taint (declared in the Karpenter NodePool's `startupTaints`).
pub const STARTUP_TAINT_EFFECT: &str = "NoSchedule";

pub const JSON_PATCH: &str = "application/json-patch+json";
pub const MERGE_PATCH: &str = "application/merge-patch+json";
pub const STRATEGIC_MERGE_PATCH: &str = "application/strategic-merge-patch+json";

/// Desired node condition (`KataRuntimeReady`, `KataWarmTemplateReady`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

/// Escapes a map key for a JSON pointer (`noded.io/vm-slots` → `noded.io~1vm-slots`).
pub fn pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

pub fn has_taint(node: &Node, key: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| {
            t.iter()
                .any(|t| t.key == key && t.effect == STARTUP_TAINT_EFFECT)
        })
}

/// JSON patch that adds (`present`) or removes the startup taint, or `None` when the node already
/// agrees. The `test` op makes the API server reject the patch (422) if the taints changed since the
/// node was read, instead of silently dropping someone else's taint.
pub fn taint_patch(node: &Node, key: &str, present: bool) -> Option<Value> {
    if has_taint(node, key) == present {
        return None;
    }
    let current = node.spec.as_ref().and_then(|s| s.taints.clone());
    let mut next: Vec<Taint> = current.clone().unwrap_or_default();
    if present {
        next.push(Taint {
            key: key.to_string(),
            effect: STARTUP_TAINT_EFFECT.to_string(),
            ..Taint::default()
        });
    } else {
        next.retain(|t| !(t.key == key && t.effect == STARTUP_TAINT_EFFECT));
    }
    Some(match current {
        Some(current) => json!([
            {"op": "test", "path": "/spec/taints", "value": current},
            {"op": "replace", "path": "/spec/taints", "value": next},
        ]),
        // No taint list to test against: guard on the whole object's version instead.
        None => json!([
            {"op": "test", "path": "/metadata/resourceVersion",
             "value": node.metadata.resource_version.clone().unwrap_or_default()},
            {"op": "add", "path": "/spec/taints", "value": next},
        ]),
    })
}

/// Merge patch setting `desired` labels, or `None` when they are all already set.
pub fn labels_patch(node: &Node, desired: &[(&str, String)]) -> Option<Value> {
    let current = node.metadata.labels.as_ref();
    let changed: serde_json::Map<String, Value> = desired
        .iter()
        .filter(|(k, v)| current.and_then(|l| l.get(*k)) != Some(v))
        .map(|(k, v)| ((*k).to_string(), Value::String(v.clone())))
        .collect();
    if changed.is_empty() {
        return None;
    }
    Some(json!({"metadata": {"labels": changed}}))
}

/// Strategic merge patch for the condition, or `None` when status, reason and message already match
/// (the heartbeat is not refreshed on its own: that would be a node write every resync for nothing).
pub fn condition_patch(node: &Node, desired: &DesiredCondition, now: &str) -> Option<Value> {
    let status = if desired.ready { "True" } else { "False" };
    let existing = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == desired.type_));
    if let Some(c) = existing
        && c.status == status
        && c.reason.as_deref() == Some(desired.reason.as_str())
        && c.message.as_deref() == Some(desired.message.as_str())
    {
        return None;
    }
    let transition = match existing {
        Some(c) if c.status == status => c
            .last_transition_time
            .as_ref()
            .map_or_else(|| now.to_string(), |t| t.0.to_string()),
        _ => now.to_string(),
    };
    Some(json!({"status": {"conditions": [{
        "type": desired.type_,
        "status": status,
        "reason": desired.reason,
        "message": desired.message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": transition,
    }]}}))
}

/// JSON patch advertising `slots` VM slots in capacity and allocatable, or `None` when both already say
/// so. kubelet zeroes extended resources it does not own when it re-registers the node; the publisher
/// re-asserts them on its next resync.
pub fn slots_patch(node: &Node, slots: u32) -> Option<Value> {
    let want = slots.to_string();
    let status = node.status.as_ref();
    let capacity = status.and_then(|s| s.capacity.as_ref());
    let allocatable = status.and_then(|s| s.allocatable.as_ref());
    let ok = |m: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >| {
        m.and_then(|m| m.get(RESOURCE_VM_SLOTS))
            .is_some_and(|q| q.0 == want)
    };
    if ok(capacity) && ok(allocatable) {
        return None;
    }
    let key = pointer_escape(RESOURCE_VM_SLOTS);
    let op = |field: &str, present: bool| {
        if present {
            json!({"op": "add", "path": format!("/status/{field}/{key}"), "value": want})
        } else {
            json!({"op": "add", "path": format!("/status/{field}"), "value": {RESOURCE_VM_SLOTS: want}})
        }
    };
    Some(json!([
        op("capacity", capacity.is_some()),
        op("allocatable", allocatable.is_some())
    ]))
}

/// Typed access to one node.
#[derive(Clone)]
pub struct NodeApi {
    client: Client,
    name: String,
}

impl NodeApi {
    pub fn new(client: Client, name: impl Into<String>) -> Self {
        Self {
            client,
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn get(&self) -> Result<Node, kube::Error> {
        Api::<Node>::all(self.client.clone()).get(&self.name).await
    }

    /// PATCH `/api/v1/nodes/{name}[/status]?fieldManager=noded` with a raw body, so every patch type
    /// (JSON patch included) goes through one path and shows up under noded in managedFields.
    pub async fn patch(
        &self,
        status: bool,
        content_type: &str,
        body: &Value,
    ) -> Result<Node, kube::Error> {
        let sub = if status { "/status" } else { "" };
        let uri = format!(
            "/api/v1/nodes/{}{sub}?fieldManager={FIELD_MANAGER}",
            self.name
        );
        let bytes = serde_json::to_vec(body).map_err(kube::Error::SerdeError)?;
        let req = Request::patch(uri)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::ACCEPT, "application/json")
            .body(bytes)
            .map_err(kube::Error::HttpError)?;
        self.client.request::<Node>(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(v: Value) -> Node {
        serde_json::from_value(v).expect("node fixture")
    }

    #[test]
    fn taint_removal_is_guarded_by_the_list_it_was_computed_from() {
        let n = node(
            json!({"metadata": {"name": "n", "resourceVersion": "7"}, "spec": {"taints": [
            {"key": "kata", "value": "true", "effect": "NoSchedule"},
            {"key": "noded.io/runtime-not-ready", "effect": "NoSchedule"}]}}),
        );
        let p = taint_patch(&n, "noded.io/runtime-not-ready", false).expect("patch");
        assert_eq!(
            p,
            json!([
                {"op": "test", "path": "/spec/taints", "value": [
                    {"key": "kata", "value": "true", "effect": "NoSchedule"},
                    {"key": "noded.io/runtime-not-ready", "effect": "NoSchedule"}]},
                {"op": "replace", "path": "/spec/taints", "value": [
                    {"key": "kata", "value": "true", "effect": "NoSchedule"}]}
            ])
        );
        assert!(taint_patch(&n, "noded.io/runtime-not-ready", true).is_none());
    }

    #[test]
    fn taint_add_without_taint_list_tests_resource_version() {
        let n = node(json!({"metadata": {"name": "n", "resourceVersion": "7"}, "spec": {}}));
        assert!(taint_patch(&n, "x", false).is_none());
        assert_eq!(
            taint_patch(&n, "x", true).expect("patch"),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "add", "path": "/spec/taints", "value": [{"key": "x", "effect": "NoSchedule"}]}
            ])
        );
    }

    #[test]
    fn labels_only_diffs() {
        let n = node(json!({"metadata": {"name": "n", "labels": {"a": "1", "b": "2"}}}));
        assert!(labels_patch(&n, &[("a", "1".into())]).is_none());
        assert_eq!(
            labels_patch(
                &n,
                &[("a", "1".into()), ("b", "3".into()), ("c", "4".into())]
            ),
            Some(json!({"metadata": {"labels": {"b": "3", "c": "4"}}}))
        );
    }

    #[test]
    fn condition_keeps_transition_time_while_status_is_unchanged() {
        let n = node(
            json!({"metadata": {"name": "n"}, "status": {"conditions": [{
            "type": "KataRuntimeReady", "status": "False", "reason": "ProbeFailed", "message": "a",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}),
        );
        let d = DesiredCondition {
            type_: super::super::CONDITION_KATA_RUNTIME_READY,
            ready: false,
            reason: "ProbeFailed".into(),
            message: "a".into(),
        };
        assert!(condition_patch(&n, &d, "2026-02-02T00:00:00Z").is_none());
        let d2 = DesiredCondition {
            type_: super::super::CONDITION_KATA_RUNTIME_READY,
            message: "b".into(),
            ..d
        };
        let p = condition_patch(&n, &d2, "2026-02-02T00:00:00Z").expect("patch");
        assert_eq!(
            p["status"]["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        let d3 = DesiredCondition {
            type_: super::super::CONDITION_KATA_RUNTIME_READY,
            ready: true,
            reason: "RuntimeProven".into(),
            message: "ok".into(),
        };
        let p = condition_patch(&n, &d3, "2026-02-02T00:00:00Z").expect("patch");
        assert_eq!(
            p["status"]["conditions"][0]["lastTransitionTime"],
            "2026-02-02T00:00:00Z"
        );
        assert_eq!(p["status"]["conditions"][0]["status"], "True");
    }

    #[test]
    fn slots_reasserted_when_zeroed() {
        let n = node(json!({"metadata": {"name": "n"}, "status": {
            "capacity": {"cpu": "4", "noded.io/vm-slots": "0"}, "allocatable": {"cpu": "4"}}}));
        assert_eq!(
            slots_patch(&n, 12),
            Some(json!([
                {"op": "add", "path": "/status/capacity/noded.io~1vm-slots", "value": "12"},
                {"op": "add", "path": "/status/allocatable/noded.io~1vm-slots", "value": "12"}
            ]))
        );
        let ok = node(json!({"metadata": {"name": "n"}, "status": {
            "capacity": {"noded.io/vm-slots": "12"}, "allocatable": {"noded.io/vm-slots": "12"}}}));
        assert!(slots_patch(&ok, 12).is_none());
    }
}
