//! Installing, black-box: contrib/install.sh into a temporary DESTDIR puts the binary, the man
//! page and the systemd units under PREFIX, points the units at the installed binary, and
//! `--uninstall` takes them away again.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn install(destdir: &Path, prefix: &str, extra: &[&str]) -> ToolOutput {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/install.sh");
    let mut cmd = Command::new(script);
    cmd.args(extra).env("DESTDIR", destdir).env("PREFIX", prefix).env("BIN", flexnbd_bin());
    for v in ["BINDIR", "MANDIR", "UNITDIR"] {
        cmd.env_remove(v);
    }
    run_bounded(&mut cmd, IO_TIMEOUT)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn install_script_honours_destdir_and_prefix_and_uninstalls() {
    for prefix in ["/usr", "/opt/flexnbd"] {
        let stage = TempDir::new("install");
        let root = stage.join(prefix.trim_start_matches('/'));
        install(stage.path(), prefix, &[]).assert_success(&format!("install.sh with PREFIX={prefix}"));

        let bin = root.join("bin/flexnbd");
        assert_eq!(mode(&bin), 0o755, "{}", bin.display());
        let v = run_bounded(&mut Command::new(&bin), IO_TIMEOUT);
        let v2 = run_bounded(Command::new(&bin).arg("--version"), IO_TIMEOUT);
        assert!(!v.success(), "no command is a usage error");
        v2.assert_success("installed flexnbd --version");
        assert_eq!(v2.stdout.trim(), format!("flexnbd {}", env!("CARGO_PKG_VERSION")));

        let man = root.join("share/man/man1/flexnbd.1");
        assert_eq!(mode(&man), 0o644);
        assert!(std::fs::read_to_string(&man).expect("man page").starts_with(".\\\" Man page for flexnbd"));

        for unit in ["flexnbd@.service", "flexnbd@.socket"] {
            let p = root.join("lib/systemd/system").join(unit);
            assert_eq!(mode(&p), 0o644, "{}", p.display());
            let text = std::fs::read_to_string(&p).expect("unit");
            assert!(
                !text.contains("/usr/bin/flexnbd") || prefix == "/usr",
                "{unit} still names /usr/bin:\n{text}"
            );
        }
        let service =
            std::fs::read_to_string(root.join("lib/systemd/system/flexnbd@.service")).expect("service");
        assert!(
            service.contains(&format!("ExecStart={prefix}/bin/flexnbd serve ")),
            "ExecStart= must name the installed binary:\n{service}"
        );

        install(stage.path(), prefix, &["--uninstall"]).assert_success("install.sh --uninstall");
        for p in [
            bin,
            man,
            root.join("lib/systemd/system/flexnbd@.service"),
            root.join("lib/systemd/system/flexnbd@.socket"),
        ] {
            assert!(!p.exists(), "{} left after --uninstall", p.display());
        }
    }
}

#[test]
fn install_script_refuses_a_missing_binary_and_unknown_arguments() {
    let stage = TempDir::new("install-bad");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/install.sh");
    let out = run_bounded(
        Command::new(&script).env("DESTDIR", stage.path()).env("BIN", stage.join("no-such-binary")),
        IO_TIMEOUT,
    );
    out.assert_failure_with("not found", "install.sh without a binary");
    let out = run_bounded(Command::new(&script).arg("--frobnicate").env("DESTDIR", stage.path()), IO_TIMEOUT);
    out.assert_failure_with("usage", "install.sh with an unknown argument");
    assert_eq!(std::fs::read_dir(stage.path()).expect("read_dir").count(), 0, "nothing installed");
}
