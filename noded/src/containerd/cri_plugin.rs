//! containerd's CRI plugin as CRI shows it: the config the plugin loaded (runtime handlers, default
//! handler, sandbox image), which containerd reports as JSON under `info["config"]` of a verbose CRI
//! `Status`. That JSON is containerd's own shape, so it is read here, not in [`crate::cri`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use crate::cri::{CriClient, CriError, RuntimeCondition};

/// One runtime handler as containerd's CRI plugin has it loaded (from `Status(verbose).info["config"]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
pub struct HandlerInfo {
    /// e.g. `io.containerd.runc.v2`, `io.containerd.kata-qemu.v2`.
    #[serde(rename = "runtimeType", default)]
    pub runtime_type: String,
    #[serde(rename = "runtimePath", default)]
    pub runtime_path: String,
    #[serde(rename = "PodAnnotations", default)]
    pub pod_annotations: Option<Vec<String>>,
    #[serde(rename = "privileged_without_host_devices", default)]
    pub privileged_without_host_devices: bool,
    #[serde(default)]
    pub snapshotter: String,
    /// The handler's `options` table as containerd parsed it (runtime specific, e.g. runc's
    /// `SystemdCgroup`, Kata's `ConfigPath`).
    #[serde(default)]
    pub options: Option<BTreeMap<String, serde_json::Value>>,
}

impl HandlerInfo {
    /// `options.ConfigPath` (Kata handlers).
    pub fn config_path(&self) -> Option<&str> {
        self.options.as_ref()?.get("ConfigPath")?.as_str()
    }
}

/// containerd's CRI `Status(verbose=true)`, with the plugin's config parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginStatus {
    /// `RuntimeReady`, `NetworkReady` (false without CNI config; host-network pods still work).
    pub conditions: Vec<RuntimeCondition>,
    pub default_runtime_name: String,
    /// The CRI plugin's sandbox image as containerd 1.x reports it; empty on containerd 2.x, whose
    /// Status no longer carries the image config (see [`sandbox_image`]).
    pub sandbox_image: String,
    pub handlers: BTreeMap<String, HandlerInfo>,
    /// Names of the handlers containerd lists in `StatusResponse.runtime_handlers` (containerd 2.x;
    /// empty on 1.x). The default handler appears as `""`.
    pub runtime_handlers: Vec<String>,
}

impl PluginStatus {
    pub fn runtime_ready(&self) -> bool {
        crate::cri::runtime_ready(&self.conditions)
    }
}

#[derive(Deserialize)]
struct VerboseConfig {
    containerd: VerboseContainerd,
    #[serde(rename = "sandboxImage", default)]
    sandbox_image: String,
}

#[derive(Deserialize)]
struct VerboseContainerd {
    #[serde(rename = "defaultRuntimeName", default)]
    default_runtime_name: String,
    #[serde(default)]
    runtimes: Option<BTreeMap<String, HandlerInfo>>,
}

/// Parses the verbose `info` map of containerd's CRI `StatusResponse`: (default handler, sandbox
/// image, handlers).
pub fn parse_status_info(
    info: &HashMap<String, String>,
) -> Result<(String, String, BTreeMap<String, HandlerInfo>), CriError> {
    let config = info
        .get("config")
        .ok_or_else(|| CriError::BadInfo("no \"config\" key".into()))?;
    let parsed: VerboseConfig = serde_json::from_str(config)
        .map_err(|e| CriError::BadInfo(format!("info[\"config\"]: {e}")))?;
    Ok((
        parsed.containerd.default_runtime_name,
        parsed.sandbox_image,
        parsed.containerd.runtimes.unwrap_or_default(),
    ))
}

/// CRI `Status(verbose=true)` of the containerd behind `cri`, with its CRI plugin's config.
pub async fn status(cri: &mut CriClient) -> Result<PluginStatus, CriError> {
    let s = cri.status_verbose().await?;
    let (default_runtime_name, sandbox_image, handlers) = parse_status_info(&s.info)?;
    Ok(PluginStatus {
        conditions: s.conditions,
        default_runtime_name,
        sandbox_image,
        handlers,
        runtime_handlers: s.runtime_handlers,
    })
}

/// The sandbox (pause) image: containerd 1.x reports it in Status; containerd 2.x only pins it
/// (`pinned_images.sandbox`), so it is the pinned image CRI lists (None while not present).
pub async fn sandbox_image(cri: &mut CriClient) -> Result<Option<String>, CriError> {
    let status = status(cri).await?;
    if !status.sandbox_image.is_empty() {
        return Ok(Some(status.sandbox_image));
    }
    Ok(cri.pinned_images().await?.into_iter().next())
}

/// The runtime handlers containerd's CRI plugin has loaded right now (what the config applier verifies
/// after a restart).
pub async fn loaded_handlers(socket: &Path) -> Result<BTreeMap<String, HandlerInfo>, CriError> {
    Ok(status(&mut CriClient::connect(socket).await?)
        .await?
        .handlers)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_containerd_16_verbose_config() {
        let config = r#"{"containerd":{"snapshotter":"overlayfs","defaultRuntimeName":"runc",
            "runtimes":{"runc":{"runtimeType":"io.containerd.runc.v2","runtimePath":"","runtimeEngine":"",
            "PodAnnotations":null,"ContainerAnnotations":null,"runtimeRoot":"","options":{"SystemdCgroup":false},
            "privileged_without_host_devices":false,"baseRuntimeSpec":"","cniConfDir":"","cniMaxConfNum":0},
            "kata-qemu":{"runtimeType":"io.containerd.kata-qemu.v2","runtimePath":"/opt/kata/bin/containerd-shim-kata-v2",
            "PodAnnotations":["io.katacontainers.*"],"options":{"ConfigPath":"/opt/kata/share/defaults/kata-containers/configuration-qemu.toml"},
            "privileged_without_host_devices":true}}},"sandboxImage":"noded.local/pause:1"}"#;
        let info = HashMap::from([("config".to_string(), config.to_string())]);
        let (default, sandbox, handlers) = parse_status_info(&info).unwrap();
        assert_eq!(default, "runc");
        assert_eq!(sandbox, "noded.local/pause:1");
        assert_eq!(handlers["runc"].runtime_type, "io.containerd.runc.v2");
        let kata = &handlers["kata-qemu"];
        assert!(kata.privileged_without_host_devices);
        assert_eq!(
            kata.pod_annotations.as_deref(),
            Some(&["io.katacontainers.*".to_string()][..])
        );
        assert_eq!(
            kata.config_path(),
            Some("/opt/kata/share/defaults/kata-containers/configuration-qemu.toml")
        );
    }

    /// containerd 2.1's verbose config has no `sandboxImage` (the image config moved out of Status).
    #[test]
    fn parses_containerd_21_verbose_config_without_sandbox_image() {
        let config = r#"{"containerd":{"defaultRuntimeName":"runc","runtimes":{"runc":{"runtimeType":"io.containerd.runc.v2",
            "options":{"SystemdCgroup":false},"sandboxer":"podsandbox","io_type":""}}},"cni":{"binDirs":["/x"]},
            "disableApparmor":true,"restrictOOMScoreAdj":true}"#;
        let info = HashMap::from([("config".to_string(), config.to_string())]);
        let (default, sandbox, handlers) = parse_status_info(&info).unwrap();
        assert_eq!(default, "runc");
        assert_eq!(sandbox, "");
        assert_eq!(handlers["runc"].runtime_type, "io.containerd.runc.v2");
    }

    #[test]
    fn missing_config_is_an_error() {
        assert!(matches!(
            parse_status_info(&HashMap::new()),
            Err(CriError::BadInfo(_))
        ));
    }
}
