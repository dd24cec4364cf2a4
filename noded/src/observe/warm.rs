//! Is Kata's warm path real on this node? Per warm handler: the factory template is valid (the
//! keeper's last check) AND the handler's probe sandbox came up as a clone of it (its QEMU command line
//! restores from the template). Only both together count in `noded.io/warm-templates` and make the
//! `KataWarmTemplateReady` condition true: a template on disk that Kata does not use helps nobody.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::procscan::BootKind;

/// What the node says about its warm path (the `KataWarmTemplateReady` condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmCondition {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct HandlerState {
    /// `None` until the keeper checked once; `Some(Err(reason))` when the template is not usable.
    template: Option<Result<(), String>>,
    /// How the latest probe sandbox booted since the template last became valid.
    probe_boot: Option<BootKind>,
}

#[derive(Debug, Default)]
pub struct WarmTemplates {
    handlers: Mutex<BTreeMap<String, HandlerState>>,
    /// Wakes the probe loop when a template became valid, so the clone is proven now rather than at
    /// the next probe interval.
    changed: tokio::sync::Notify,
}

impl WarmTemplates {
    pub fn new(handlers: impl IntoIterator<Item = String>) -> Self {
        Self {
            handlers: Mutex::new(
                handlers
                    .into_iter()
                    .map(|h| (h, HandlerState::default()))
                    .collect(),
            ),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, HandlerState>> {
        self.handlers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn is_warm(&self, handler: &str) -> bool {
        self.lock().contains_key(handler)
    }

    pub fn handlers(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The keeper's finding. `rebuilt`: a new template replaced whatever the last probe proved.
    pub fn set_template(&self, handler: &str, result: Result<(), String>, rebuilt: bool) {
        let mut map = self.lock();
        let Some(h) = map.get_mut(handler) else {
            return;
        };
        let became_valid = result.is_ok() && (rebuilt || !matches!(h.template, Some(Ok(()))));
        if became_valid || result.is_err() {
            h.probe_boot = None;
        }
        h.template = Some(result);
        drop(map);
        if became_valid {
            self.changed.notify_one();
        }
    }

    pub fn set_probe_boot(&self, handler: &str, boot: Option<BootKind>) {
        if let Some(h) = self.lock().get_mut(handler) {
            h.probe_boot = boot;
        }
    }

    /// A warm handler whose template is valid but not yet proven by a clone probe.
    pub fn awaiting_proof(&self) -> bool {
        self.lock()
            .values()
            .any(|h| matches!(h.template, Some(Ok(()))) && h.probe_boot != Some(BootKind::Template))
    }

    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Warm handlers whose template is valid and whose probe came up as a clone.
    pub fn proven(&self) -> u32 {
        let n = self
            .lock()
            .values()
            .filter(|h| {
                matches!(h.template, Some(Ok(()))) && h.probe_boot == Some(BootKind::Template)
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// `None` when no handler is warm (the condition is not published at all).
    pub fn condition(&self) -> Option<WarmCondition> {
        let map = self.lock();
        if map.is_empty() {
            return None;
        }
        let mut not_ready: Option<(&'static str, String)> = None;
        for (name, h) in map.iter() {
            let problem = match (&h.template, h.probe_boot) {
                (None, _) => Some((
                    "TemplateNotChecked",
                    format!("{name}: template not checked yet"),
                )),
                (Some(Err(e)), _) => Some(("TemplateNotBuilt", format!("{name}: {e}"))),
                (Some(Ok(())), None) => Some((
                    "WaitingForProbe",
                    format!("{name}: template built; no probe sandbox has booted from it yet"),
                )),
                (Some(Ok(())), Some(BootKind::Cold)) => Some((
                    "ProbeBootedCold",
                    format!(
                        "{name}: template built, but the probe sandbox booted cold (Kata did not use it)"
                    ),
                )),
                (Some(Ok(())), Some(BootKind::Template)) => None,
            };
            if let Some(p) = problem {
                not_ready.get_or_insert(p);
            }
        }
        Some(match not_ready {
            Some((reason, message)) => WarmCondition {
                ready: false,
                reason,
                message,
            },
            None => WarmCondition {
                ready: true,
                reason: "ProbeBootedFromTemplate",
                message: format!(
                    "probe sandboxes were restored from Kata's VM template: {}",
                    map.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_the_template_is_valid_and_the_probe_was_a_clone() {
        let w = WarmTemplates::new(["kata-qemu-warm".to_string()]);
        let c = w.condition().expect("warm handler");
        assert_eq!((c.ready, c.reason), (false, "TemplateNotChecked"));
        w.set_template("kata-qemu-warm", Err("kata-runtime failed".into()), false);
        let c = w.condition().expect("warm handler");
        assert_eq!((c.ready, c.reason), (false, "TemplateNotBuilt"));
        assert!(c.message.contains("kata-runtime failed"), "{}", c.message);
        w.set_template("kata-qemu-warm", Ok(()), true);
        assert!(w.awaiting_proof());
        w.set_probe_boot("kata-qemu-warm", Some(BootKind::Cold));
        assert_eq!(w.condition().expect("c").reason, "ProbeBootedCold");
        assert_eq!(w.proven(), 0);
        w.set_probe_boot("kata-qemu-warm", Some(BootKind::Template));
        let c = w.condition().expect("c");
        assert!(c.ready, "{c:?}");
        assert_eq!(w.proven(), 1);
        // A kept template keeps the proof; a rebuilt one must be proven again.
        w.set_template("kata-qemu-warm", Ok(()), false);
        assert_eq!(w.proven(), 1);
        w.set_template("kata-qemu-warm", Ok(()), true);
        assert_eq!(w.proven(), 0);
        assert!(WarmTemplates::new(Vec::new()).condition().is_none());
    }
}
