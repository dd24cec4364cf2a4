//! `installer check` on the three machines Kata meets on EC2: bare metal, a c8i/m8i-style guest with
//! nested virtualization (KVM usable, cpuinfo `hypervisor` flag), and a guest launched without it (no
//! /dev/kvm). Each runs the real `installer` binary against a temp root with a faked /proc/cpuinfo and
//! /sys/module/kvm_intel/parameters/nested.

mod common;

use std::path::Path;

use common::{Node, installer};

const METAL_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme de pse vmx ept\n\
processor\t: 1\nflags\t\t: fpu vme de pse vmx ept\n";
const NESTED_GUEST_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme de pse vmx hypervisor\n\
processor\t: 1\nflags\t\t: fpu vme de pse vmx hypervisor\n";
const PLAIN_GUEST_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme de pse hypervisor\n";

fn machine(cpuinfo: &str, kvm: bool, kvm_intel_nested: Option<&str>) -> Node {
    let node = Node::new();
    let root = node.root();
    std::fs::write(root.join("proc/cpuinfo"), cpuinfo).expect("cpuinfo");
    if kvm {
        // check opens /dev/kvm read-write and wants a character device: /dev/null is one that any
        // user can open, so the root's /dev/kvm points there (check does no ioctl).
        std::fs::create_dir_all(root.join("dev")).expect("mkdir dev");
        std::os::unix::fs::symlink("/dev/null", root.join("dev/kvm")).expect("symlink kvm");
    }
    if let Some(v) = kvm_intel_nested {
        let dir = root.join("sys/module/kvm_intel/parameters");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("nested"), v).expect("nested");
    }
    node
}

fn check(root: &Path) -> (i32, serde_json::Value) {
    let out = installer()
        .arg("check")
        .arg("--root")
        .arg(root)
        .arg("--output")
        .arg("json")
        .output()
        .expect("run installer check");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), json)
}

fn item(report: &serde_json::Value, name: &str) -> (String, String) {
    let c = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"));
    (
        c["status"].as_str().expect("status").to_owned(),
        c["detail"].as_str().expect("detail").to_owned(),
    )
}

#[test]
fn bare_metal_with_kvm_is_ok_and_says_bare_metal() {
    let node = machine(METAL_CPUINFO, true, Some("Y\n"));
    let (_, report) = check(&node.root());
    assert_eq!(item(&report, "kvm").0, "ok", "{report}");
    let (status, detail) = item(&report, "nested");
    assert_eq!(status, "info", "{report}");
    assert!(detail.starts_with("bare metal"), "{detail}");
    assert!(
        detail.contains("nested virtualization for guests enabled"),
        "{detail}"
    );
}

#[test]
fn nested_guest_with_kvm_warns_instead_of_claiming_bare_metal() {
    // A c8i/m8i launched with NestedVirtualization=enabled: vmx and hypervisor both set, /dev/kvm there.
    // Its own kvm_intel may well allow nesting further down: that must not make it "bare metal".
    let node = machine(NESTED_GUEST_CPUINFO, true, Some("Y\n"));
    let (_, report) = check(&node.root());
    assert_eq!(item(&report, "kvm").0, "ok", "{report}");
    let (status, detail) = item(&report, "nested");
    assert_eq!(status, "warn", "{report}");
    assert!(
        detail.starts_with("nested virtualization: KVM inside a VM"),
        "{detail}"
    );
    assert!(!detail.contains("bare metal"), "{detail}");
    assert!(report["warnings"].as_u64().expect("warnings") >= 1);
    // The table an operator reads says WARN on that line too.
    let out = installer()
        .arg("check")
        .arg("--root")
        .arg(node.root())
        .output()
        .expect("check table");
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("nested"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("WARN"), "{line}");
}

#[test]
fn guest_without_kvm_is_a_blocker_naming_the_nested_virtualization_option() {
    let node = machine(PLAIN_GUEST_CPUINFO, false, None);
    let (code, report) = check(&node.root());
    assert_eq!(code, 1, "a blocker exits 1: {report}");
    let (status, detail) = item(&report, "kvm");
    assert_eq!(status, "blocker", "{report}");
    assert!(detail.contains("no vmx/svm flag"), "{detail}");
    assert!(
        detail.contains("NestedVirtualization=enabled")
            && detail.contains("c8i/m8i")
            && detail.contains("spec.cpuOptions.nestedVirtualization"),
        "{detail}"
    );
    // One cause, one blocker: the nested line points at kvm instead of counting it again.
    let (status, detail) = item(&report, "nested");
    assert_eq!(status, "info", "{report}");
    assert!(detail.contains("VM without usable KVM"), "{detail}");
}

#[test]
fn unreadable_cpuinfo_claims_neither_metal_nor_guest() {
    let node = machine("", true, Some("Y\n"));
    std::fs::remove_file(node.root().join("proc/cpuinfo")).expect("rm cpuinfo");
    let (_, report) = check(&node.root());
    let (status, detail) = item(&report, "nested");
    assert_eq!(status, "info", "{report}");
    assert!(detail.starts_with("unknown"), "{detail}");
}
