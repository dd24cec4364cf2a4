//! Names from noded.toml and the command line that end up in paths (`run_dir/templates/<name>`), in
//! QEMU's comma-separated option syntax (`-name noded-<template>-<id>`), in containerd's config keys
//! and in Kubernetes objects. One strict set for all of them, checked when the config is loaded, so no
//! later user of a name has to think about `..`, `/`, `,` or control characters.

use std::fmt;

/// The longest DNS label (RFC 1123), which is also what Kubernetes allows for a RuntimeClass handler.
pub const MAX_LABEL: usize = 63;
/// The longest DNS subdomain (a Kubernetes node name).
pub const MAX_SUBDOMAIN: usize = 253;

/// Why a name was refused; `Display` quotes the name escaped, so a hostile one stays on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NameError {
    name: String,
    why: Why,
    rule: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Why {
    Empty,
    TooLong(usize, usize),
    BadChar(char),
    BadStart,
    BadEnd,
}

const LABEL_RULE: &str = "lowercase letters, digits and '-', 1 to 63 characters, starting and ending with a letter or digit";
const SUBDOMAIN_RULE: &str =
    "dot-separated labels of lowercase letters, digits and '-', at most 253 characters";

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match &self.why {
            Why::Empty => "empty".to_string(),
            Why::TooLong(len, max) => format!("{len} characters, at most {max} allowed"),
            Why::BadChar(c) => format!("contains {c:?}"),
            Why::BadStart => "must start with a letter or digit".to_string(),
            Why::BadEnd => "must end with a letter or digit".to_string(),
        };
        write!(
            f,
            "{:?} is not a valid name ({why}; {})",
            self.name, self.rule
        )
    }
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A DNS label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, 1..=63 characters. Template names and runtime
/// handler names.
pub fn check_label(name: &str) -> Result<(), NameError> {
    label(name, name, LABEL_RULE)
}

fn label(whole: &str, part: &str, rule: &'static str) -> Result<(), NameError> {
    let err = |why| {
        Err(NameError {
            name: whole.to_string(),
            why,
            rule,
        })
    };
    if part.is_empty() {
        return err(Why::Empty);
    }
    if let Some(c) = part.chars().find(|&c| !is_alnum(c) && c != '-') {
        return err(Why::BadChar(c));
    }
    // Counted after the character check: only ASCII is left, so bytes are characters.
    if part.len() > MAX_LABEL {
        return err(Why::TooLong(part.len(), MAX_LABEL));
    }
    if part.starts_with('-') {
        return err(Why::BadStart);
    }
    if part.ends_with('-') {
        return err(Why::BadEnd);
    }
    Ok(())
}

/// A DNS subdomain (RFC 1123): labels joined by '.', at most 253 characters. Kubernetes node names.
pub fn check_subdomain(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_SUBDOMAIN && name.is_ascii() {
        return Err(NameError {
            name: name.to_string(),
            why: Why::TooLong(name.len(), MAX_SUBDOMAIN),
            rule: SUBDOMAIN_RULE,
        });
    }
    name.split('.')
        .try_for_each(|part| label(name, part, SUBDOMAIN_RULE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in [
            "a",
            "default",
            "kata-qemu-warm",
            "0",
            "a1-b2",
            &"x".repeat(63),
        ] {
            assert_eq!(check_label(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "../../victim",
            "/abs/path",
            "a,b",
            "a,file=/etc/shadow",
            "Upper",
            "-lead",
            "trail-",
            "with space",
            "dot.ted",
            "nl\nx",
            "ünï",
            &"x".repeat(64),
        ] {
            assert!(check_label(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn message_is_one_line_and_quotes_the_name() {
        let e = check_label("a\nb,c").expect_err("refused").to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with(r#""a\nb,c" is not a valid name"#), "{e}");
    }

    #[test]
    fn subdomains() {
        for ok in ["ip-10-0-0-1.ec2.internal", "node-a", "a.b"] {
            assert_eq!(check_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "../x",
            "a/b",
            "A.b",
            &format!("{}a", "a.".repeat(127)),
        ] {
            assert!(check_subdomain(bad).is_err(), "{bad:?} accepted");
        }
    }
}
