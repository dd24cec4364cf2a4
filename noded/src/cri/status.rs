//! CRI `Status` and `Version` as every CRI runtime answers them. The verbose `info` map is the runtime's
//! own (containerd puts the config its CRI plugin loaded there, as JSON), so it is kept verbatim here and
//! read by that runtime's module: [`crate::containerd::cri_plugin`] for containerd.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeCondition {
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// CRI `Status(verbose=true)`.
#[derive(Debug, Clone, PartialEq)]
pub struct CriStatus {
    /// `RuntimeReady`, `NetworkReady` (false without CNI config; host-network pods still work).
    pub conditions: Vec<RuntimeCondition>,
    /// Names of the handlers the runtime lists in `StatusResponse.runtime_handlers` (containerd 2.x;
    /// empty on 1.x). The default handler appears as `""`.
    pub runtime_handlers: Vec<String>,
    /// The verbose info, verbatim: its keys and JSON values are the runtime's own.
    pub info: HashMap<String, String>,
}

impl CriStatus {
    pub fn runtime_ready(&self) -> bool {
        runtime_ready(&self.conditions)
    }
}

/// Whether `conditions` hold a true `RuntimeReady`.
pub fn runtime_ready(conditions: &[RuntimeCondition]) -> bool {
    conditions
        .iter()
        .any(|c| c.kind == "RuntimeReady" && c.status)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriVersion {
    pub runtime_name: String,
    pub runtime_version: String,
    pub runtime_api_version: String,
}
