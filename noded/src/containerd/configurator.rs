//! containerd behind the [`RuntimeConfigurator`] seam: `plan`/`apply`/`revert` of [`super::apply`],
//! restarts by [`Restart`] (systemd over D-Bus, a command, or never), the version from containerd's API
//! or binary ([`super::version`]). The daemon and the installer use it through the trait; the CLI
//! (`noded containerd plan|apply|revert`) calls [`super::apply`] itself because it prints containerd's
//! own report.

use std::path::PathBuf;

use super::apply::{self, ApplyError, Plan, Report, Request};
use super::handler::{HandlerSpec, KataHandler};
use super::restart::Restart;
use crate::config::NodedConfig;
use crate::runtime::{Access, Change, RuntimeConfigurator, RuntimeError};

/// The node's containerd, as `[containerd]` of noded.toml and an [`Access`] describe it.
#[derive(Debug, Clone)]
pub struct ContainerdConfigurator {
    /// Everything of a request but the handlers, which each call brings.
    request: Request,
    restart: Restart,
}

impl ContainerdConfigurator {
    /// `containerd.config`, `containerd.kata_root` and `daemon.data_dir` (noded's ownership record) as
    /// `access` sees them; `containerd.restart` when `access` may restart.
    pub fn new(config: &NodedConfig, access: &Access) -> Self {
        let restart = if access.may_restart {
            config.containerd.restart.clone()
        } else {
            Restart::Never
        };
        let main = access.path(&config.containerd.config);
        Self {
            request: Request {
                socket: access.running.then(|| apply::config_socket(&main)),
                config: main,
                handlers: Vec::new(),
                custom: custom_specs(config, access),
                kata_root: access.path(&config.containerd.kata_root),
                state_dir: access.path(&config.daemon.data_dir),
                adopt: access.adopt,
                containerd_version: None,
                containerd_binary: access
                    .binary
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("containerd")),
            },
            restart,
        }
    }

    /// containerd's config file this configurator edits.
    pub fn config_path(&self) -> &std::path::Path {
        &self.request.config
    }

    fn request(&self, handlers: &[KataHandler]) -> Request {
        Request {
            handlers: handlers.to_vec(),
            ..self.request.clone()
        }
    }
}

fn from_report(r: Report) -> Change {
    Change {
        changed: r.changed,
        restart_needed: r.restart_needed,
        restarted: r.restarted,
        verified: r.verified,
        handlers: r.handlers,
        files: r.files,
        strategy: r.strategy.as_str().to_owned(),
        runtime_version: r.containerd_version,
        warning: r.warning,
    }
}

fn from_plan(p: &Plan) -> Change {
    Change {
        changed: p.changed(),
        restart_needed: p.effective_change(),
        restarted: false,
        verified: false,
        handlers: p.touched(),
        files: p
            .files
            .iter()
            .filter(|f| f.changed())
            .map(|f| f.path.clone())
            .collect(),
        strategy: p.strategy.as_str().to_owned(),
        runtime_version: p.containerd_version.to_string(),
        warning: None,
    }
}

#[async_trait::async_trait]
impl RuntimeConfigurator for ContainerdConfigurator {
    fn runtime(&self) -> &'static str {
        "containerd"
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        Ok(self.request.resolve_version().await?.to_string())
    }

    async fn plan(&self, handlers: &[KataHandler]) -> Result<Change, RuntimeError> {
        let req = self.request(handlers).resolved().await?;
        Ok(from_plan(&apply::plan(&req)?))
    }

    async fn apply(&self, handlers: &[KataHandler]) -> Result<Change, RuntimeError> {
        Ok(from_report(
            apply::apply(&self.request(handlers), &self.restart).await?,
        ))
    }

    async fn revert(&self) -> Result<Change, RuntimeError> {
        let r = &self.request;
        Ok(from_report(
            apply::revert_with(
                &r.config,
                &r.state_dir,
                &self.restart,
                r.containerd_version,
                &r.containerd_binary,
                r.socket.as_deref(),
            )
            .await?,
        ))
    }

    async fn restart(&self) -> Result<bool, RuntimeError> {
        Ok(self.restart.run().await.map_err(ApplyError::from)?)
    }
}

/// The entries of noded.toml's `[[handlers]]`, each under its own Kata root (`containerd.kata_root`
/// when unset), seen the way `access` sees the presets' root. Every containerd shape registers them
/// after the presets.
pub(super) fn custom_specs(config: &NodedConfig, access: &Access) -> Vec<HandlerSpec> {
    config
        .handlers
        .iter()
        .map(|h| h.spec(&access.path(&h.kata_root(&config.containerd.kata_root))))
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::containerd::apply::Strategy;

    #[test]
    fn strategy_names_are_the_cli_json_ones() {
        for s in [Strategy::InPlace, Strategy::DropIn] {
            assert_eq!(
                serde_json::to_value(s)
                    .ok()
                    .as_ref()
                    .and_then(|v| v.as_str()),
                Some(s.as_str())
            );
        }
    }
}
