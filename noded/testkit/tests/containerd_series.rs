//! Every containerd series the harness offers is the series it claims, runs as a private daemon with
//! its own config version, and answers containerd's Version API and CRI.

use testkit::containerd::{self, Series};

#[tokio::test]
async fn every_series_starts_privately_and_reports_its_version() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "needs root (CI=true: failing instead of skipping)"
        );
        eprintln!("SKIP: not root");
        return;
    }
    for series in Series::all() {
        let Some(bins) = containerd::require(series) else {
            continue;
        };
        let exec = bins.detect_version().expect("containerd --version");
        assert_eq!(
            (exec.major, exec.minor),
            (series.version().major, series.version().minor),
            "{series}: {}",
            bins.containerd.display()
        );
        let ctrd = containerd::start(series, "noded.local/pause:1")
            .await
            .unwrap_or_else(|e| panic!("{series} starts: {e:#}"));
        let api = noded::containerd::version::ContainerdVersion::query(ctrd.socket())
            .await
            .expect("Version API");
        assert_eq!(api, exec, "{series}: the daemon is the binary asked");
        let mut cri = noded::cri::CriClient::connect(ctrd.socket())
            .await
            .expect("CRI connects");
        let status = noded::containerd::cri_plugin::status(&mut cri)
            .await
            .expect("CRI Status");
        assert!(status.handlers.contains_key("runc"), "{series}: {status:?}");
        if series.version().major >= 2 {
            // 2.x reports the handlers it serves; its sandbox image is only pinned, not in Status.
            assert!(
                status.runtime_handlers.contains(&"runc".to_owned()),
                "{series}: {status:?}"
            );
        } else {
            assert_eq!(status.sandbox_image, "noded.local/pause:1", "{series}");
        }
        let bin = ctrd.dir().join("bin");
        assert!(
            bin.is_dir(),
            "{series}: <dir>/bin exists for per-handler shims"
        );
        let pid = ctrd.containerd_pid().expect("pid");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        let path = environ
            .split(|b| *b == 0)
            .find_map(|e| e.strip_prefix(b"PATH="))
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .expect("PATH set");
        assert!(
            path.starts_with(&format!("{}:", bin.display())),
            "{series}: PATH={path}"
        );
    }
}
