//! Keeps the spec layer the one place virtio constants are written (issue
//! 15): no `const VIRTIO_*`, `VRING_*`, `VIRTQ_*` or vhost-user feature bit
//! (`VHOST_USER_F_*`, `VHOST_F_*`, `VHOST_USER_PROTOCOL_F_*`) outside `spec/`, no crate
//! but `bulkhead-spec` reading `virtio-bindings` directly, and no declared
//! dependency that its crate never names (what `cargo machete` checks; this
//! runs without it).

use std::fs;
use std::path::{Path, PathBuf};

/// Names that start like a virtio constant but are this VMM's own layout.
const ALLOWED: &[(&str, &str)] = &[
    ("vmm/src/vmm.rs", "VIRTIO_MMIO_BASE"),
    ("vmm/src/vmm.rs", "VIRTIO_MMIO_GSIS"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace above tests/")
        .to_path_buf()
}

/// Every file under `dir` whose name ends in `ext`, skipping build output,
/// fuzz corpora and hidden folders.
fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            let skip = name.starts_with('.')
                || matches!(
                    name.as_str(),
                    "target" | "corpus" | "seeds" | "regressions" | "artifacts"
                );
            if !skip {
                files(&path, ext, out);
            }
        } else if name.ends_with(ext) {
            out.push(path);
        }
    }
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The names `line` defines with `const NAME`.
fn const_names(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("const ")
        .filter(|(i, _)| *i == 0 || !code.as_bytes()[i - 1].is_ascii_alphanumeric())
        .filter_map(|(i, m)| {
            let rest = &code[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (end > 0).then(|| &rest[..end])
        })
        .collect()
}

#[test]
fn no_virtio_constant_is_written_outside_the_spec_layer() {
    let root = root();
    let mut all = Vec::new();
    files(&root, ".rs", &mut all);
    assert!(all.len() > 50, "found only {} sources", all.len());
    let mut bad = Vec::new();
    for path in all {
        let r = rel(&path);
        if r.starts_with("spec/") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("read a source file");
        for (n, line) in text.lines().enumerate() {
            for name in const_names(line) {
                let virtio = [
                    "VIRTIO_",
                    "VRING_",
                    "VIRTQ_",
                    "VHOST_USER_F_",
                    "VHOST_F_",
                    "VHOST_USER_PROTOCOL_F_",
                ]
                .iter()
                .any(|p| name.starts_with(p));
                if virtio && !ALLOWED.contains(&(r.as_str(), name)) {
                    bad.push(format!("{r}:{}: {name}", n + 1));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "virtio constants written outside spec/ (take them from bulkhead_spec):\n{}",
        bad.join("\n")
    );
}

/// The `[dependencies]`, `[dev-dependencies]` and `[build-dependencies]`
/// names of a manifest, each with the section it is in.
fn dependencies(manifest: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        if !section.ends_with("dependencies") || section.starts_with("workspace") {
            continue;
        }
        let Some((name, _)) = line.split_once(['=', '.']) else {
            continue;
        };
        let name = name.trim();
        if !name.is_empty() && !name.starts_with('#') {
            out.push((section.clone(), name.to_string()));
        }
    }
    out
}

/// Whether `code` names the crate `ident` as a path root (`ident::`, not
/// `other_ident::` or `x::ident::`) or in a `use ident`.
fn names_crate(code: &str, ident: &str) -> bool {
    let path = format!("{ident}::");
    let root = code.match_indices(&path).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    });
    root || code.contains(&format!("use {ident};")) || code.contains(&format!("use {ident} as"))
}

#[test]
fn every_declared_dependency_is_used_and_only_the_spec_layer_reads_the_bindings() {
    let root = root();
    let mut manifests = Vec::new();
    files(&root, "Cargo.toml", &mut manifests);
    let mut unused = Vec::new();
    let mut checked = 0;
    for manifest in manifests {
        let dir = manifest.parent().expect("a crate folder");
        let r = rel(dir);
        let text = fs::read_to_string(&manifest).expect("read a manifest");
        let mut sources = Vec::new();
        files(dir, ".rs", &mut sources);
        // Like cargo-machete, a crate's sources are every file below it
        // (the corpus replay test includes the fuzz harness with #[path]).
        let code: String = sources
            .iter()
            .filter_map(|s| fs::read_to_string(s).ok())
            .collect();
        for (section, dep) in dependencies(&text) {
            checked += 1;
            let ident = dep.replace('-', "_");
            if !names_crate(&code, &ident) {
                unused.push(format!("{r}/Cargo.toml [{section}] {dep}"));
            }
            if dep == "virtio-bindings" && r != "spec" {
                unused.push(format!(
                    "{r}/Cargo.toml: virtio-bindings outside spec/ (use bulkhead-spec)"
                ));
            }
        }
    }
    assert!(checked > 50, "checked only {checked} dependencies");
    assert!(
        unused.is_empty(),
        "dependencies no source names:\n{}",
        unused.join("\n")
    );
}
