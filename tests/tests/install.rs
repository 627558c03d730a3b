//! `scripts/install` into a staging root (DESTDIR): the binaries, the
//! vhost-user backend descriptors with the installed path and only the
//! members QEMU's schema (docs/interop/vhost-user.json, `VhostUserBackend`)
//! defines, the systemd units, the man pages and bash, zsh and fish
//! completions bulkhead-docgen writes; then
//! `--uninstall` removes every file again. Run `cargo build --workspace
//! --bins` first (the test installs those binaries).

use std::path::{Path, PathBuf};
use std::process::Command;

use bulkhead_tests::guest::repo_root;
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::skip::{SkipReason, skip};

/// `VHostUserBackendType` in QEMU's schema.
const SCHEMA_TYPES: &[&str] = &[
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
];

/// A page of an earlier install (section 1, from `--help`).
const OLD_PAGE: &str = "/usr/share/man/man1/bulkhead-blk.1";

fn install(destdir: &Path, extra: &[&str]) {
    let bin_dir = workspace_binary("bulkhead-blk")
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new(repo_root().join("scripts/install"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(extra)
        .env("DESTDIR", destdir)
        .env("PREFIX", "/usr")
        .output()
        .expect("run scripts/install");
    assert!(
        out.status.success(),
        "scripts/install {extra:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn staged(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

#[test]
fn install_puts_descriptors_units_and_docs_in_place_and_uninstall_removes_them() {
    let root = tempfile::tempdir().unwrap();
    // An earlier install, with a page this one does not write.
    let manifest = staged(root.path(), "/usr/share/bulkhead/install-manifest");
    for f in [&staged(root.path(), OLD_PAGE), &manifest] {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    }
    std::fs::write(staged(root.path(), OLD_PAGE), ".TH old\n").unwrap();
    std::fs::write(&manifest, format!("{OLD_PAGE}\n")).unwrap();
    install(root.path(), &[]);

    for (daemon, kind) in [
        ("bulkhead-blk", "block"),
        ("bulkhead-net", "net"),
        ("bulkhead-console", "console"),
    ] {
        let name = daemon.trim_start_matches("bulkhead-");
        let desc = staged(
            root.path(),
            &format!("/usr/share/qemu/vhost-user/50-bulkhead-{name}.json"),
        );
        let text = std::fs::read_to_string(&desc).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let obj = v.as_object().expect("a JSON object");
        for key in obj.keys() {
            assert!(
                ["description", "type", "binary", "tags"].contains(&key.as_str()),
                "{desc:?}: {key} is not in the schema"
            );
        }
        assert!(v["description"].is_string(), "{desc:?}: description");
        assert_eq!(v["type"], kind, "{desc:?}");
        assert!(SCHEMA_TYPES.contains(&kind));
        let binary = v["binary"].as_str().expect("binary");
        assert_eq!(binary, format!("/usr/bin/{daemon}"), "the installed path");
        let installed = staged(root.path(), binary);
        // The installed binary agrees with its descriptor.
        let caps = Command::new(&installed)
            .arg("--print-capabilities")
            .output()
            .unwrap();
        let caps: serde_json::Value = serde_json::from_slice(&caps.stdout).unwrap();
        assert_eq!(caps["type"], kind);

        for unit in [
            format!("bulkhead-{name}@.service"),
            format!("bulkhead-{name}@.socket"),
        ] {
            let text = std::fs::read_to_string(staged(
                root.path(),
                &format!("/usr/lib/systemd/system/{unit}"),
            ))
            .unwrap();
            assert!(!text.contains("@BINDIR@"), "{unit}");
            if unit.ends_with(".service") {
                assert!(
                    text.contains(&format!("ExecStart=/usr/bin/{daemon} $BULKHEAD_ARGS"))
                        && text.contains("Type=notify"),
                    "{unit}"
                );
            }
        }
    }
    for b in [
        "bulkhead-blk",
        "bulkhead-net",
        "bulkhead-console",
        "bulkhead-vmm",
        "bulkhead",
    ] {
        let man =
            std::fs::read_to_string(staged(root.path(), &format!("/usr/share/man/man8/{b}.8")))
                .unwrap();
        assert!(man.contains("\n.TH "), "{b}.8");
        assert!(
            man.contains(&format!(".TH {b} 8 ")) && man.contains("\\-\\-help"),
            "{b}.8 is bulkhead-docgen's page"
        );
        let bash = std::fs::read_to_string(staged(
            root.path(),
            &format!("/usr/share/bash-completion/completions/{b}"),
        ))
        .unwrap();
        assert!(
            bash.lines()
                .map(str::trim)
                .any(|l| l.starts_with("complete -F ") && l.ends_with(&format!(" {b}"))),
            "{b} (bash)"
        );
        let zsh = std::fs::read_to_string(staged(
            root.path(),
            &format!("/usr/share/zsh/site-functions/_{b}"),
        ))
        .unwrap();
        assert!(zsh.starts_with(&format!("#compdef {b}")), "_{b} (zsh)");
        let fish = std::fs::read_to_string(staged(
            root.path(),
            &format!("/usr/share/fish/vendor_completions.d/{b}.fish"),
        ))
        .unwrap();
        assert!(fish.contains(&format!("complete -c {b} ")), "{b}.fish");
    }
    // A page per subcommand.
    for page in ["bulkhead-up.8", "bulkhead-check.8", "bulkhead-vmm-ctl.8"] {
        assert!(
            staged(root.path(), &format!("/usr/share/man/man8/{page}")).is_file(),
            "{page}"
        );
    }
    // What an older install listed and this one does not write is gone.
    assert!(
        !staged(root.path(), OLD_PAGE).exists(),
        "{OLD_PAGE} of the earlier install is left"
    );
    // bulkhead-docgen is a build tool, not installed.
    assert!(!staged(root.path(), "/usr/bin/bulkhead-docgen").exists());
    assert!(staged(root.path(), "/usr/lib/systemd/system/bulkhead@.service").is_file());
    // Each unit's Documentation= page is installed.
    for unit in std::fs::read_dir(repo_root().join("contrib/systemd")).unwrap() {
        let unit = unit.unwrap().path();
        let text = std::fs::read_to_string(&unit).unwrap();
        let docs: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("Documentation="))
            .flat_map(str::split_whitespace)
            .filter_map(|d| d.strip_prefix("man:"))
            .collect();
        assert!(!docs.is_empty(), "{unit:?} names no man page");
        for page in docs {
            let (name, section) = page.trim_end_matches(')').split_once('(').unwrap();
            let path = format!("/usr/share/man/man{section}/{name}.{section}");
            assert!(
                staged(root.path(), &path).is_file(),
                "{unit:?}: Documentation=man:{page} is not installed"
            );
        }
    }

    let files: Vec<String> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    // 5 binaries, 3 descriptors, 7 units, 15 completions, 14 pages, the
    // manifest.
    assert!(files.len() >= 45, "{files:?}");
    assert!(
        files.iter().any(|f| f.starts_with("/usr/share/man/man8/"))
            && files.iter().any(|f| f.starts_with("/usr/share/zsh/"))
            && files.iter().any(|f| f.starts_with("/usr/share/fish/")),
        "the manifest lists pages and completions: {files:?}"
    );
    install(root.path(), &["--uninstall"]);
    for f in &files {
        assert!(
            !staged(root.path(), f).exists(),
            "{f} is left after --uninstall"
        );
    }
}

#[test]
fn the_libvirt_example_validates_and_uses_the_units_sockets() {
    let xml = repo_root().join("contrib/libvirt/bulkhead-vm.xml");
    let text = std::fs::read_to_string(&xml).unwrap();
    // The sockets contrib/systemd's units listen on, instance vm1.
    assert!(text.contains("path='/run/bulkhead/blk-vm1.sock'"));
    assert!(text.contains("path='/run/bulkhead/net-vm1.sock'"));
    for unit in ["bulkhead-blk@.socket", "bulkhead-net@.socket"] {
        let u = std::fs::read_to_string(repo_root().join("contrib/systemd").join(unit)).unwrap();
        assert!(u.contains("ListenStream=/run/bulkhead/"), "{unit}");
    }
    match Command::new("virt-xml-validate")
        .arg(&xml)
        .arg("domain")
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "virt-xml-validate: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => skip(
            "the_libvirt_example_validates_and_uses_the_units_sockets (virt-xml-validate)",
            SkipReason::NotInstalled("virt-xml-validate (libvirt-clients)".into()),
        ),
    }
}
