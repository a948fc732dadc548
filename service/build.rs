//! Records the commit the binaries are built from, for `tron_build_info{version,commit}`.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string()); // built outside a git checkout (a source tarball)
    println!("cargo:rustc-env=TRON_COMMIT={commit}");
    // A new commit (HEAD moving, or the branch it names moving) rebuilds with the new id.
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
