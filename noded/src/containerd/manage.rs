//! What `noded run` does with containerd at start: apply the handlers (restarting containerd only if
//! the effective config changed) or, in local mode, create, configure and start a private containerd.

use std::path::{Path, PathBuf};

use tracing::{info, info_span, warn};

use super::apply::{self, ApplyError, Report, Request};
use super::handler::{UnknownHandler, parse_handlers};
use super::image::{self, DEFAULT_BUSYBOX, PAUSE_IMAGE};
use super::private::{self, PrivateContainerd, PrivateContainerdError, PrivateLayout};
use super::restart::{BadRestart, Restart};
use crate::config::NodedConfig;
use crate::metrics::{ApplyOutcome, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("containerd.runtimes: {0}")]
    Handler(#[from] UnknownHandler),
    #[error("containerd.restart: {0}")]
    Restart(#[from] BadRestart),
    #[error("containerd config: {0}")]
    Apply(#[from] ApplyError),
    #[error("private containerd: {0}")]
    Private(#[from] PrivateContainerdError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("importing the local probe image: {0}")]
    Image(#[from] image::ImageError),
    #[error("the CRI plugin does not see the imported local images: {0}")]
    Cri(#[from] crate::cri::CriError),
}

fn request(config: &NodedConfig) -> Result<Request, ManageError> {
    Ok(Request {
        config: config.containerd.config.clone(),
        handlers: parse_handlers(&config.containerd.runtimes)?,
        kata_root: config.containerd.kata_root.clone(),
        state_dir: config.daemon.data_dir.clone(),
        adopt: false,
        containerd_version: None,
        containerd_binary: PathBuf::from("containerd"),
        socket: Some(super::apply::config_socket(&config.containerd.config)),
    })
}

fn record(metrics: &Metrics, result: &Result<Report, ApplyError>) {
    match result {
        Ok(r) => {
            metrics.record_apply(if r.changed {
                ApplyOutcome::Changed
            } else {
                ApplyOutcome::Unchanged
            });
            if r.restarted {
                metrics.record_containerd_restart();
            }
        }
        Err(_) => metrics.record_apply(ApplyOutcome::Failed),
    }
}

/// Applies the configured handlers to the host's containerd. Returns the report (None when
/// `apply_on_start` is off).
pub async fn apply_on_start(
    config: &NodedConfig,
    metrics: &Metrics,
) -> Result<Option<Report>, ManageError> {
    if !config.containerd.apply_on_start {
        return Ok(None);
    }
    let req = request(config)?;
    let restart: Restart = config.containerd.restart.parse()?;
    let result = apply::apply(&req, &restart).await;
    record(metrics, &result);
    let report = result?;
    info!(changed = report.changed, restarted = report.restarted, handlers = ?report.handlers, "containerd config applied");
    Ok(Some(report))
}

/// Local mode: the private containerd lives next to its config file (`containerd.config`'s directory).
/// A missing config is created from the recipe that works on this kind of machine, then noded applies
/// its handlers to it exactly as on a real node, starts containerd and imports the probe image.
pub async fn start_private(
    config: &NodedConfig,
    metrics: &Metrics,
) -> Result<PrivateContainerd, ManageError> {
    let cfg_path = &config.containerd.config;
    let dir = cfg_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let span = info_span!("private_containerd", dir = %dir.display());
    let _g = span.enter();
    let layout = PrivateLayout::new(&dir);
    if !cfg_path.exists() {
        std::fs::create_dir_all(&dir).map_err(|source| ManageError::Io {
            path: dir.clone(),
            source,
        })?;
        super::atomic::write_atomic(
            cfg_path,
            private::default_config(&layout, PAUSE_IMAGE).as_bytes(),
            0o644,
        )
        .map_err(|e| ManageError::Io {
            path: cfg_path.clone(),
            source: e.source,
        })?;
    }
    // containerd is not running yet: write only, it reads the result when it starts.
    let req = request(config)?;
    let result = apply::apply(&req, &Restart::Never).await;
    record(metrics, &result);
    let report = result?;
    info!(changed = report.changed, handlers = ?report.handlers, "private containerd configured");
    let ctrd = PrivateContainerd::start(&dir, cfg_path).await?;
    if let Err(e) = image::ensure_local_images(ctrd.socket(), Path::new(DEFAULT_BUSYBOX)).await {
        warn!("probe image import failed: {e}");
        return Err(e.into());
    }
    // CRI learns about an import from an image event, asynchronously: a probe started before then
    // tries to pull `noded.local/pause:1` from the network and the node stays unready for a whole
    // probe interval.
    let mut cri = crate::cri::CriClient::connect(ctrd.socket()).await?;
    for name in [image::PAUSE_IMAGE, image::PROBE_IMAGE] {
        cri.wait_image(name, std::time::Duration::from_secs(10))
            .await?;
    }
    Ok(ctrd)
}
