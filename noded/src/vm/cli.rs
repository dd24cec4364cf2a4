//! `noded template build|status|destroy`.

use std::path::Path;

#[derive(Debug, Clone, Copy)]
pub enum TemplateAction {
    Build,
    Status,
    Destroy,
}

pub fn template(_action: TemplateAction, _config: Option<&Path>) -> u8 {
    crate::exit::RUNTIME_FAILURE
}
