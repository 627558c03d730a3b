//! `bulkhead check`: what `bulkhead up` would trip over, found before
//! anything starts. The config's own values are checked by
//! [`Config::problems`]; this adds the world: files that are missing or
//! unreadable, and backend options the daemon itself refuses (each daemon
//! parses its own with `--check`, so the launcher never duplicates a
//! daemon's parser). For a blk image on Ceph RBD (`rbd:POOL/IMAGE`),
//! `bulkhead-blk --check` also connects to the cluster and opens the image
//! as a start would: a missing pool or image, no exclusive-lock feature or
//! an unreachable cluster is reported here.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::config::{Config, Kind, is_rbd_image};
use crate::supervisor::find_binary;

/// Every problem found, each naming its field or device.
pub fn problems(cfg: &Config) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(vm) = &cfg.vm {
        readable(&mut p, "vm.kernel", &vm.kernel);
        if let Some(i) = &vm.initrd {
            readable(&mut p, "vm.initrd", i);
        }
        if let Some(s) = &vm.serial
            && let Some(dir) = s.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            p.push(format!(
                "vm.serial = \"{}\": directory {} does not exist",
                s.display(),
                dir.display()
            ));
        }
    }
    let specs = cfg.backends(Path::new("RUNTIME_DIR"));
    let blk_ids = specs.iter().filter(|s| s.kind == Kind::Blk).map(|s| &s.id);
    for (b, id) in cfg.blk.iter().zip(blk_ids) {
        let field = format!("{id}: image");
        if is_rbd_image(&b.image) {
            // No file: bulkhead-blk --check below connects to the cluster
            // and opens the image (pool, image, lock feature). Its
            // configuration file must be there.
            if let Some(conf) = arg_value(&b.args, "--ceph-conf") {
                readable(&mut p, &format!("{id}: --ceph-conf"), Path::new(&conf));
            }
            continue;
        }
        if readable(&mut p, &field, &b.image) && !b.readonly && !writable(&b.image) {
            p.push(format!(
                "{field} = \"{}\": not writable by this user; set readonly = true, or fix its permissions",
                b.image.display()
            ));
        }
    }
    for s in &specs {
        match find_binary(s.kind.binary()) {
            Ok(bin) => {
                if let Some(e) = daemon_refuses(&bin, &s.args) {
                    p.push(format!(
                        "{}: {} refuses its options: {e}",
                        s.id,
                        s.kind.binary()
                    ));
                }
            }
            Err(e) => p.push(format!("{}: {e}", s.id)),
        }
    }
    p
}

/// The value of `flag` in `args` (`--flag VALUE` or `--flag=VALUE`).
fn arg_value(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_string());
        }
    }
    None
}

/// Pushes a problem unless `path` opens for reading; true if it does.
fn readable(p: &mut Vec<String>, field: &str, path: &Path) -> bool {
    match std::fs::File::open(path) {
        Ok(_) => true,
        Err(e) => {
            p.push(format!("{field} = \"{}\": {e}", path.display()));
            false
        }
    }
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Runs `bin --check ARGS`: clap's first error line if the daemon refuses.
fn daemon_refuses(bin: &Path, args: &[String]) -> Option<String> {
    let out = match Command::new(bin)
        .arg("--check")
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => return Some(format!("cannot run {}: {e}", bin.display())),
    };
    if out.status.success() {
        return None;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .or_else(|| err.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("it exited with an error");
    Some(line.trim_start_matches("error:").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_are_found_in_both_spellings() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            arg_value(&a(&["--ceph-conf", "/c"]), "--ceph-conf").as_deref(),
            Some("/c")
        );
        assert_eq!(
            arg_value(&a(&["--x", "--ceph-conf=/d"]), "--ceph-conf").as_deref(),
            Some("/d")
        );
        assert_eq!(arg_value(&a(&["--ceph-conf"]), "--ceph-conf"), None);
        assert_eq!(arg_value(&a(&["--ceph-id", "x"]), "--ceph-conf"), None);
    }
}
