//! The publisher as `noded run` starts it: settings from noded.toml, capacity fed from the observer,
//! and a stop that leaves the node as it is.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::{
    K8sError, PublisherHandles, PublisherSettings, PublisherStatus, channels, feed, spawn,
};
use crate::config::NodedConfig;
use crate::observe::Observer;

/// How often the observer's figures are offered to the publisher (the label rate limit and hysteresis
/// decide what reaches the API server).
const FEED_INTERVAL: Duration = Duration::from_secs(5);

/// A running publisher. `handles.health` is where the probe loop records every probe outcome
/// (`handles.health.send_modify(|h| h.record(handler, ok, error))`); `handles.notices` takes
/// config-applied / containerd-restarted / template-rebuilt notices.
pub struct RunningPublisher {
    pub handles: PublisherHandles,
    pub status: watch::Receiver<PublisherStatus>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    feed: JoinHandle<()>,
}

pub fn start(cfg: &NodedConfig, observer: Arc<Observer>) -> Result<RunningPublisher, K8sError> {
    let settings = PublisherSettings::from_config(cfg)?;
    let (handles, inputs) = channels();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let (task, status) = spawn(settings, inputs, async move {
        let _ = stop_rx.await;
    });
    let feed = tokio::spawn(feed::feed_capacity(
        observer,
        handles.capacity.clone(),
        FEED_INTERVAL,
    ));
    Ok(RunningPublisher {
        handles,
        status,
        stop,
        task,
        feed,
    })
}

impl RunningPublisher {
    /// Stops the publisher without touching the node (no taint re-added, nothing reverted). An
    /// in-flight request gets a short grace period, then the task is dropped.
    pub async fn stop(self) {
        self.feed.abort();
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}
