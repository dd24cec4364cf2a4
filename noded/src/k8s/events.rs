//! Kubernetes Events (events.k8s.io/v1) about the node: what an operator sees in `kubectl describe node`.
//! Posted best-effort: an event that cannot be delivered is retried a few times and then dropped, it
//! never holds up the taint or the condition.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

/// Events for cluster-scoped objects go to `default`, as kubelet's node events do.
pub const EVENT_NAMESPACE: &str = "default";
pub const REPORTING_CONTROLLER: &str = "noded.io/noded";
/// `note` is limited to 1 kB by the API server.
const NOTE_MAX: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// One event to post about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    pub type_: EventType,
    /// CamelCase machine reason, e.g. `ProbeFailed`.
    pub reason: &'static str,
    /// What noded did, e.g. `Probe`.
    pub action: &'static str,
    pub note: String,
}

/// Builds the Event object (name `<node>.<hex nanos>` like client-go's recorder).
pub fn build(
    node: &str,
    node_uid: Option<&str>,
    ev: &NodeEvent,
    now: std::time::SystemTime,
) -> Event {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let micros = i64::try_from(since.as_micros()).unwrap_or(i64::MAX);
    let event_time = k8s_openapi::jiff::Timestamp::from_microsecond(micros)
        .map(MicroTime)
        .ok();
    let mut note = ev.note.clone();
    if note.len() > NOTE_MAX {
        let mut cut = NOTE_MAX;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{node}.{:x}", since.as_nanos())),
            namespace: Some(EVENT_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        event_time,
        action: Some(ev.action.into()),
        reason: Some(ev.reason.into()),
        note: Some(note),
        type_: Some(
            match ev.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(format!("noded-{node}")),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            uid: node_uid.map(str::to_string),
            ..ObjectReference::default()
        }),
        ..Event::default()
    }
}

pub async fn post(client: &Client, event: &Event) -> Result<Event, kube::Error> {
    Api::<Event>::namespaced(client.clone(), EVENT_NAMESPACE)
        .create(&PostParams::default(), event)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_fields() {
        let ev = NodeEvent {
            type_: EventType::Warning,
            reason: "ProbeFailed",
            action: "Probe",
            note: "x".repeat(2000),
        };
        let e = build("node-a", Some("uid-1"), &ev, std::time::SystemTime::now());
        assert_eq!(e.note.as_ref().map(String::len), Some(NOTE_MAX));
        assert!(
            e.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("node-a."))
        );
        assert_eq!(
            e.regarding.as_ref().and_then(|r| r.uid.as_deref()),
            Some("uid-1")
        );
        assert!(e.event_time.is_some());
        assert_eq!(e.type_.as_deref(), Some("Warning"));
    }
}
