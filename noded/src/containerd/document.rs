//! containerd's config.toml as a format-preserving document: version detection, the CRI runtimes
//! table of each config version, and the edits noded makes. Every byte noded does not own is kept.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Key, Table, TableLike};

use super::handler::HandlerSpec;
use super::version::ContainerdVersion;

/// Marker written above every handler table noded owns. Ownership itself is in the state file; the
/// marker tells a human reading the file who wrote it.
pub const MARKER: &str = "# Managed by noded (noded containerd revert removes it). Do not edit.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum ConfigVersion {
    V1,
    V2,
    V3,
}

impl ConfigVersion {
    pub fn number(self) -> i64 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
            Self::V3 => 3,
        }
    }

    /// Plugin whose `containerd.runtimes` map holds the runtime handlers.
    pub fn cri_runtime_plugin(self) -> &'static str {
        match self {
            Self::V1 => "cri",
            Self::V2 => "io.containerd.grpc.v1.cri",
            Self::V3 => "io.containerd.cri.v1.runtime",
        }
    }

    /// containerd 2.x's images plugin: its `runtime_platforms.<handler>.snapshotter` decides which
    /// snapshotter unpacks the images a handler's pods pull (the runtime table's `snapshotter` only
    /// covers their containers). containerd 1.x has no such table.
    pub const IMAGES_PLUGIN: &'static str = "io.containerd.cri.v1.images";

    fn runtime_platforms_path() -> [&'static str; 3] {
        ["plugins", Self::IMAGES_PLUGIN, "runtime_platforms"]
    }

    fn runtimes_path(self) -> [&'static str; 4] {
        [
            "plugins",
            self.cri_runtime_plugin(),
            "containerd",
            "runtimes",
        ]
    }
}

/// Bad input in a containerd config: always reported with the file, never written.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("{path}: invalid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(
        "{path}: unsupported `version = {found}` (noded supports containerd config versions 1, 2 and 3)"
    )]
    UnsupportedVersion { path: PathBuf, found: String },
    #[error(
        "{path}: a version 1 config (no `version` key, short plugin ids like `plugins.cri`) whose plugin tables containerd 2.x ignores, and a drop-in would make it read them; declare `version = 2` (long plugin ids) or 3 first"
    )]
    Version1OnContainerd2 { path: PathBuf },
    #[error("{path}: `{key}` is {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        found: &'static str,
        expected: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    Double,
    Single,
}

/// A parsed containerd config file.
#[derive(Debug, Clone)]
pub struct ConfigDocument {
    pub path: PathBuf,
    /// Exact bytes read (empty when the file did not exist).
    pub original: Vec<u8>,
    pub existed: bool,
    pub version: ConfigVersion,
    /// false when the file has no `version` key; containerd then reads it as version 1.
    pub version_declared: bool,
    doc: DocumentMut,
    quote: Quote,
}

fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "missing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => match v {
            toml_edit::Value::String(_) => "a string",
            toml_edit::Value::Integer(_) => "an integer",
            toml_edit::Value::Float(_) => "a float",
            toml_edit::Value::Boolean(_) => "a boolean",
            toml_edit::Value::Datetime(_) => "a datetime",
            toml_edit::Value::Array(_) => "an array",
            toml_edit::Value::InlineTable(_) => "an inline table",
        },
    }
}

/// `a."b.c".d` as an operator would type it in a message.
fn dotted(path: &[&str]) -> String {
    path.iter()
        .map(|s| {
            if s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                (*s).to_owned()
            } else {
                format!("\"{s}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

impl ConfigDocument {
    /// Reads `path`; a missing file is an empty document. `default_version` is what a new or empty
    /// file gets (2 for containerd 1.x, 3 for 2.x).
    pub fn load(path: &Path, default_version: ConfigVersion) -> Result<Self, DocumentError> {
        let (original, existed) = match std::fs::read(path) {
            Ok(b) => (b, true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
            Err(source) => {
                return Err(DocumentError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::parse(path, original, existed, default_version)
    }

    pub fn parse(
        path: &Path,
        original: Vec<u8>,
        existed: bool,
        default_version: ConfigVersion,
    ) -> Result<Self, DocumentError> {
        let text = std::str::from_utf8(&original).map_err(|_| DocumentError::NotUtf8 {
            path: path.to_path_buf(),
        })?;
        let doc: DocumentMut =
            text.parse()
                .map_err(|e: toml_edit::TomlError| DocumentError::Syntax {
                    path: path.to_path_buf(),
                    message: crate::config::one_line(&e.to_string()),
                })?;
        let (version, version_declared) = match doc.get("version") {
            None => (Self::implicit_version(&doc, default_version), false),
            Some(item) => match item.as_integer() {
                Some(1) => (ConfigVersion::V1, true),
                Some(2) => (ConfigVersion::V2, true),
                Some(3) => (ConfigVersion::V3, true),
                Some(n) => {
                    return Err(DocumentError::UnsupportedVersion {
                        path: path.to_path_buf(),
                        found: n.to_string(),
                    });
                }
                None => {
                    return Err(DocumentError::WrongType {
                        path: path.to_path_buf(),
                        key: "version".into(),
                        found: type_name(item),
                        expected: "an integer",
                    });
                }
            },
        };
        let quote = detect_quote(&doc);
        let me = Self {
            path: path.to_path_buf(),
            original,
            existed,
            version,
            version_declared,
            doc,
            quote,
        };
        me.validate()?;
        Ok(me)
    }

    /// containerd reads a file without `version` as version 1. An empty file (or one whose plugin
    /// tables are already v2-style, which version 1 would silently ignore) becomes the default version
    /// and gets an explicit `version` line when noded writes it.
    fn implicit_version(doc: &DocumentMut, default_version: ConfigVersion) -> ConfigVersion {
        let plugins = doc.get("plugins").and_then(Item::as_table_like);
        let has_v1_plugin_ids = plugins.is_some_and(|p| p.iter().any(|(k, _)| !k.contains('.')));
        if has_v1_plugin_ids || (!doc.is_empty() && plugins.is_none() && has_root_keys(doc)) {
            ConfigVersion::V1
        } else {
            default_version
        }
    }

    /// Checks the types along every path noded reads or writes, so a bad file fails before any write.
    fn validate(&self) -> Result<(), DocumentError> {
        let wrong = |key: &[&str], item: &Item, expected: &'static str| DocumentError::WrongType {
            path: self.path.clone(),
            key: dotted(key),
            found: type_name(item),
            expected,
        };
        let path = self.version.runtimes_path();
        let mut cur: &dyn TableLike = self.doc.as_table();
        for depth in 0..path.len() {
            match cur.get(path[depth]) {
                None => break,
                Some(item) => match item.as_table_like() {
                    Some(t) => cur = t,
                    None => return Err(wrong(&path[..=depth], item, "a table")),
                },
            }
            if depth == path.len() - 1 {
                for (name, item) in cur.iter() {
                    if item.as_table_like().is_none() {
                        let mut key = path.to_vec();
                        key.push(name);
                        return Err(wrong(&key, item, "a table"));
                    }
                }
            }
        }
        if let Some(item) = self.doc.get("imports") {
            let ok = item
                .as_array()
                .is_some_and(|a| a.iter().all(|v| v.as_str().is_some()));
            if !ok {
                return Err(wrong(&["imports"], item, "an array of strings"));
            }
        }
        Ok(())
    }

    fn runtimes(&self) -> Option<&dyn TableLike> {
        let mut cur: &dyn TableLike = self.doc.as_table();
        for seg in self.version.runtimes_path() {
            cur = cur.get(seg)?.as_table_like()?;
        }
        Some(cur)
    }

    /// Names of every handler in the runtimes table.
    pub fn handler_names(&self) -> Vec<String> {
        self.runtimes()
            .map(|r| r.iter().map(|(k, _)| k.to_owned()).collect())
            .unwrap_or_default()
    }

    /// A handler's content as plain TOML (formatting dropped), for comparison.
    pub fn handler_value(&self, name: &str) -> Option<toml::Value> {
        let item = self.runtimes()?.get(name)?;
        let text = match item {
            Item::Table(t) => {
                let mut d = DocumentMut::new();
                for (k, v) in t.iter() {
                    d.insert(k, v.clone());
                }
                d.to_string()
            }
            Item::Value(v) => format!("x = {v}"),
            _ => return None,
        };
        let parsed: toml::Table = toml::from_str(&text).ok()?;
        match item {
            Item::Value(_) => parsed.get("x").cloned(),
            _ => Some(toml::Value::Table(parsed)),
        }
    }

    pub fn has_handler(&self, name: &str) -> bool {
        self.runtimes().is_some_and(|r| r.contains_key(name))
    }

    /// The images plugin's `runtime_platforms.<name>` entry, if the file has one (containerd 2.x).
    fn runtime_platform(&self, name: &str) -> Option<&Item> {
        let mut cur: &dyn TableLike = self.doc.as_table();
        let path = ConfigVersion::runtime_platforms_path();
        for seg in path {
            cur = cur.get(seg)?.as_table_like()?;
        }
        cur.get(name)
    }

    pub fn has_runtime_platform(&self, name: &str) -> bool {
        self.runtime_platform(name).is_some()
    }

    /// `runtime_platforms.<name>.snapshotter` as written (None: no entry or no snapshotter in it).
    pub fn runtime_platform_snapshotter(&self, name: &str) -> Option<String> {
        self.runtime_platform(name)?
            .as_table_like()?
            .get("snapshotter")?
            .as_str()
            .map(str::to_owned)
    }

    /// Writes (or replaces) one handler table, for a file read by containerd `containerd`. This is the
    /// in-place (containerd 1.x) edit: the runtime table is all 1.x reads, snapshotter included; a 2.x
    /// handler's images-plugin entry is written by [`drop_in`](Self::drop_in).
    pub fn set_handler(&mut self, spec: &HandlerSpec, containerd: ContainerdVersion) {
        let created_runtimes = self.runtimes().is_none();
        let version = self.version;
        let quote = self.quote;
        // containerd 1.x replaces its built-in runtimes map with the file's: a new map must name runc,
        // or `default_runtime_name = "runc"` points at nothing and every runc pod breaks. containerd
        // 2.x merges the file's map into the built-in one, so runc stays without noded's help.
        if created_runtimes && version != ConfigVersion::V3 && !containerd.merges_imports() {
            let mut runc = super::handler::builtin_runc_table(containerd);
            runc.decor_mut().set_prefix(
                "\n# Added by noded: containerd drops its built-in runc handler once a config names any runtime.\n",
            );
            if let Some(runtimes) =
                ensure_path(self.doc.as_item_mut(), &version.runtimes_path(), quote)
                && !runtimes.get("runc").is_some_and(Item::is_table_like)
            {
                insert_table_like(runtimes, "runc", runc);
            }
        }
        let mut table = spec.to_table();
        table.decor_mut().set_prefix(format!("\n{MARKER}\n"));
        if let Some(runtimes) = ensure_path(self.doc.as_item_mut(), &version.runtimes_path(), quote)
        {
            insert_table_like(runtimes, &spec.name, table);
        }
        self.declare_version();
    }

    /// Removes one handler table; true when it was there.
    pub fn remove_handler(&mut self, name: &str) -> bool {
        let mut cur: &mut dyn TableLike = self.doc.as_table_mut();
        for seg in self.version.runtimes_path() {
            match cur.get_mut(seg).and_then(Item::as_table_like_mut) {
                Some(t) => cur = t,
                None => return false,
            }
        }
        cur.remove(name).is_some()
    }

    /// An explicit `version` line: without it containerd would read v2 tables as version 1 and ignore them.
    fn declare_version(&mut self) {
        // Version 1 is what a file without `version` means already: nothing to declare.
        if self.version_declared || self.version == ConfigVersion::V1 {
            return;
        }
        let mut doc = DocumentMut::new();
        doc.insert("version", toml_edit::value(self.version.number()));
        // Keep `version` first, where containerd's own files have it; keys keep their comments.
        let root = self.doc.as_table();
        for (name, item) in root.iter() {
            let key = root.key(name).cloned().unwrap_or_else(|| Key::new(name));
            doc.as_table_mut().insert_formatted(&key, item.clone());
        }
        *doc.decor_mut() = self.doc.decor().clone();
        doc.set_trailing(self.doc.trailing().as_str().unwrap_or_default());
        self.doc = doc;
        self.version_declared = true;
    }

    /// The file has a `plugins` table with at least one plugin in it.
    pub fn has_plugins(&self) -> bool {
        self.doc
            .get("plugins")
            .and_then(Item::as_table_like)
            .is_some_and(|p| !p.is_empty())
    }

    pub fn imports(&self) -> Vec<String> {
        self.doc
            .get("imports")
            .and_then(Item::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn add_import(&mut self, pattern: &str) {
        if self.imports().iter().any(|p| p == pattern) {
            return;
        }
        match self.doc.get_mut("imports").and_then(Item::as_array_mut) {
            Some(a) => a.push(pattern),
            None => {
                let mut a = toml_edit::Array::new();
                a.push(pattern);
                self.doc.insert("imports", toml_edit::value(a));
            }
        }
        self.declare_version();
    }

    /// A fresh document for a drop-in file holding only `specs`, quoted like this file. For containerd
    /// 2.x (`containerd`), a spec with a snapshotter also gets its images-plugin `runtime_platforms`
    /// entry: without it 2.x unpacks the handler's images with the default snapshotter, and its
    /// version 2 → 3 migration does not derive one from the runtime table.
    pub fn drop_in(
        &self,
        path: &Path,
        specs: &[HandlerSpec],
        containerd: ContainerdVersion,
    ) -> ConfigDocument {
        let mut d = ConfigDocument {
            path: path.to_path_buf(),
            original: Vec::new(),
            existed: false,
            // containerd 2.1 ignores the handlers of a version 1 drop-in (it does not migrate the short
            // plugin ids of an imported file); a version 2 drop-in next to a version 1 file is read.
            version: self.version.max(ConfigVersion::V2),
            version_declared: false,
            doc: DocumentMut::new(),
            quote: self.quote,
        };
        d.declare_version();
        d.doc.decor_mut().set_prefix(
            "# Written by noded: Kata runtime handlers. containerd 2.x merges this file into config.toml\n\
             # through `imports`. noded rewrites or removes it; do not edit.\n",
        );
        for s in specs {
            if let Some(runtimes) =
                ensure_path(d.doc.as_item_mut(), &d.version.runtimes_path(), d.quote)
            {
                insert_table_like(runtimes, &s.name, s.to_table());
            }
        }
        if containerd.merges_imports() {
            for s in specs {
                let Some(entry) = s.runtime_platform_table() else {
                    continue;
                };
                if let Some(platforms) = ensure_path(
                    d.doc.as_item_mut(),
                    &ConfigVersion::runtime_platforms_path(),
                    d.quote,
                ) {
                    insert_table_like(platforms, &s.name, entry);
                }
            }
        }
        d
    }

    pub fn render(&self) -> String {
        self.doc.to_string()
    }

    /// The config as plain TOML values (comments and formatting dropped): what containerd sees.
    pub fn semantic(&self) -> Option<toml::Table> {
        toml::from_str(&self.render()).ok()
    }
}

fn has_root_keys(doc: &DocumentMut) -> bool {
    doc.iter().next().is_some()
}

/// Keys that need quoting are written the way the file already quotes them (nodeadm's v3 template
/// uses single quotes).
fn detect_quote(doc: &DocumentMut) -> Quote {
    let Some(plugins) = doc.get("plugins").and_then(Item::as_table_like) else {
        return Quote::Double;
    };
    for (name, _) in plugins.iter() {
        if let Some(repr) = plugins
            .key(name)
            .and_then(|k| k.as_repr())
            .and_then(|r| r.as_raw().as_str())
            && repr.starts_with('\'')
        {
            return Quote::Single;
        }
    }
    Quote::Double
}

fn make_key(name: &str, quote: Quote) -> Key {
    let bare = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare || quote == Quote::Double {
        return Key::new(name);
    }
    format!("'{name}'")
        .parse::<Key>()
        .unwrap_or_else(|_| Key::new(name))
}

/// Walks `path` from `root`, creating missing tables (implicit `[a.b]` tables, or inline tables
/// inside an inline parent). Returns None only if a segment is not a table, which `validate` rules out.
fn ensure_path<'a>(root: &'a mut Item, path: &[&str], quote: Quote) -> Option<&'a mut Item> {
    let mut cur = root;
    for seg in path {
        let inline = cur.is_inline_table();
        let t = cur.as_table_like_mut()?;
        if !t.get(seg).is_some_and(Item::is_table_like) {
            if inline {
                t.insert(
                    seg,
                    Item::Value(toml_edit::Value::InlineTable(Default::default())),
                );
            } else {
                let mut new = Table::new();
                new.set_implicit(true);
                t.entry_format(&make_key(seg, quote))
                    .or_insert(Item::Table(new));
            }
        }
        cur = t.get_mut(seg)?;
    }
    Some(cur)
}

/// Inserts `table` under `parent` in the parent's own style: inline inside an inline table, dotted
/// keys inside a dotted table, a `[header]` table otherwise.
fn insert_table_like(parent: &mut Item, name: &str, mut table: Table) {
    let item = if parent.is_inline_table() {
        Item::Value(toml_edit::Value::InlineTable(table.into_inline_table()))
    } else {
        if parent.as_table().is_some_and(Table::is_dotted) {
            table.decor_mut().clear();
            set_dotted_recursive(&mut table);
        }
        Item::Table(table)
    };
    if let Some(t) = parent.as_table_like_mut() {
        t.insert(name, item);
    }
}

fn set_dotted_recursive(table: &mut Table) {
    table.set_dotted(true);
    for (_, item) in table.iter_mut() {
        if let Item::Table(t) = item {
            set_dotted_recursive(t);
        }
    }
}
