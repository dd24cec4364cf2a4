//! `noded template build|status|destroy|assets`.

use std::path::Path;
use std::time::Duration;

use super::engine::{EngineOptions, resolve};
use super::template::{self, Layout};
use crate::config::NodedConfig;
use crate::exit::{self, ExitStatus};

#[derive(Debug, Clone, Copy)]
pub enum TemplateAction {
    Build,
    Status,
    Destroy,
    /// Build only the guest kernel + initramfs (the README's first step on a fresh machine).
    Assets,
}

fn load(config: Option<&Path>) -> Result<NodedConfig, u8> {
    let cfg = match config {
        Some(p) => NodedConfig::load(p),
        None => NodedConfig::local_default(),
    };
    cfg.map_err(|e| {
        eprintln!("{e}");
        e.exit_code()
    })
}

pub fn template(action: TemplateAction, config: Option<&Path>) -> u8 {
    // A download's commands run in their own process group: Ctrl-C must reach them through us.
    super::assets::cancel_on_signals();
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return exit::RUNTIME_FAILURE;
        }
    };
    rt.block_on(run(action, &cfg))
}

async fn run(action: TemplateAction, cfg: &NodedConfig) -> u8 {
    let opts = EngineOptions::from_config(cfg);
    if let TemplateAction::Assets = action {
        let data_dir = opts.data_dir.clone();
        let ctl = super::assets::Control::from_config(&cfg.guest);
        return match tokio::task::spawn_blocking(move || {
            super::assets::ensure_with(&data_dir, &ctl)
        })
        .await
        {
            Ok(Ok(a)) => {
                println!("{}", serde_json::to_string(&a).unwrap_or_default());
                exit::OK
            }
            Ok(Err(e)) => {
                eprintln!("guest assets: {e}");
                exit::RUNTIME_FAILURE
            }
            Err(e) => {
                eprintln!("guest assets: {e}");
                exit::RUNTIME_FAILURE
            }
        };
    }
    let layout = match Layout::new(&opts.run_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: {e}", opts.run_dir.display());
            return exit::RUNTIME_FAILURE;
        }
    };
    if cfg.templates.is_empty() {
        eprintln!("no [[templates]] configured");
        return exit::BAD_INPUT;
    }
    // Loading checked the names already; a config built in code (tests, the benchmark) has not been
    // loaded, and a name is about to become a path that gets unmounted and removed.
    for (i, section) in cfg.templates.iter().enumerate() {
        if let Err(e) = crate::names::check_label(&section.name) {
            eprintln!("templates[{i}].name: {e}");
            return exit::BAD_INPUT;
        }
    }
    let mut code = exit::OK;
    for section in &cfg.templates {
        let dir = layout.template_dir(&section.name);
        match action {
            TemplateAction::Destroy => match layout.destroy_template(&section.name) {
                Ok(true) => println!("{}: destroyed", section.name),
                Ok(false) => println!("{}: nothing to destroy", section.name),
                Err(e) => {
                    eprintln!("{}: {e}", section.name);
                    code = exit::RUNTIME_FAILURE;
                }
            },
            TemplateAction::Build | TemplateAction::Status => {
                let resolved = match resolve(&opts, section, &layout).await {
                    Ok((r, _, _)) => r,
                    Err(e) => {
                        eprintln!("{}: {e}", section.name);
                        code = e.exit_code();
                        continue;
                    }
                };
                let fp = resolved.spec.fingerprint.clone();
                let d = dir.clone();
                let existing =
                    tokio::task::spawn_blocking(move || template::validate(&d, &fp, true)).await;
                let existing = existing.unwrap_or(Err(template::Damage::Missing));
                match (action, existing) {
                    (_, Ok(t)) => println!(
                        "{}: ready fingerprint={} generation={} state={}B memory={}B dir={}",
                        section.name,
                        t.manifest.fingerprint_id,
                        t.manifest.generation,
                        t.manifest.state.size,
                        t.manifest.memory.size,
                        dir.display()
                    ),
                    (TemplateAction::Status, Err(d)) => {
                        println!("{}: not ready: {d}", section.name);
                        code = exit::RUNTIME_FAILURE;
                    }
                    (_, Err(d)) => {
                        if d != template::Damage::Missing {
                            eprintln!("{}: rebuilding: {d}", section.name);
                        }
                        match tokio::time::timeout(
                            Duration::from_secs(300),
                            template::build(&*resolved.backend, &layout, &resolved.spec),
                        )
                        .await
                        {
                            Ok(Ok(t)) => println!(
                                "{}: built fingerprint={} boot_ms={} save_ms={} state={}B dir={}",
                                section.name,
                                t.manifest.fingerprint_id,
                                t.manifest.boot_ms,
                                t.manifest.save_ms,
                                t.manifest.state.size,
                                dir.display()
                            ),
                            Ok(Err(e)) => {
                                eprintln!("{e}");
                                code = exit::RUNTIME_FAILURE;
                            }
                            Err(_) => {
                                eprintln!("{}: build timed out", section.name);
                                code = exit::RUNTIME_FAILURE;
                            }
                        }
                    }
                }
            }
            TemplateAction::Assets => {}
        }
    }
    code
}
