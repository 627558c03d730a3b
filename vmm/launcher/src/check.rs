//! `bulkhead check`: what `bulkhead up` would trip over, found before
//! anything starts. The config's own values are checked by
//! [`Config::problems`]; this adds the world: files that are missing or
//! unreadable, and backend options the daemon itself refuses (each daemon
//! parses its own with `--check`, so the launcher never duplicates a
//! daemon's parser).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::config::{Config, Kind};
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
