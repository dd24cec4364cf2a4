//! Local mode of `noded run`: create, configure (through the
//! [`RuntimeConfigurator`](crate::runtime::RuntimeConfigurator) seam, like a real node) and start a
//! private containerd. On a real node the daemon applies the handlers with
//! [`crate::runtime::apply_on_start`].

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::handler::UnknownHandler;
use super::image::{self, DEFAULT_BUSYBOX, PAUSE_IMAGE};
use super::private::{self, PrivateContainerd, PrivateContainerdError, PrivateLayout};
use crate::config::NodedConfig;
use crate::metrics::Metrics;
use crate::runtime::{self, Access, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("containerd.runtimes: {0}")]
    Handler(#[from] UnknownHandler),
    #[error("containerd config: {0}")]
    Runtime(#[from] RuntimeError),
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

/// Local mode: the private containerd lives next to its config file (`containerd.config`'s directory).
/// A missing config is created from the recipe that works on this kind of machine, then noded applies
/// its handlers to it exactly as on a real node, starts containerd and imports the probe image.
// `instrument`, not an entered guard: the span must follow the future across its awaits.
#[tracing::instrument(name = "private_containerd", skip_all, fields(dir = tracing::field::Empty))]
pub async fn start_private(
    config: &NodedConfig,
    metrics: &Metrics,
) -> Result<PrivateContainerd, ManageError> {
    let cfg_path = &config.containerd.config;
    let dir = cfg_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    tracing::Span::current().record("dir", tracing::field::display(dir.display()));
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
    let configurator = runtime::configurator(
        config,
        &Access {
            may_restart: false,
            ..Access::daemon()
        },
    )?;
    let handlers = config.kata_handlers();
    let change = runtime::apply_recorded(configurator.as_ref(), &handlers, metrics).await?;
    info!(changed = change.changed, handlers = ?change.handlers, "private containerd configured");
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
