//! The frontend's command line for the configured devices: `bulkhead-vmm`
//! (which reconnects to a restarted backend itself) or QEMU (a reconnecting
//! chardev per vhost-user device, guest RAM a shared memfd).

use std::path::{Path, PathBuf};

use crate::config::{BackendSpec, Config, Kind};

/// The frontend the launcher runs, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frontend {
    /// bulkhead-vmm with its control socket.
    BulkheadVmm {
        /// `--api-socket`.
        api_socket: PathBuf,
    },
    /// QEMU with this accelerator.
    Qemu {
        /// `kvm` or `tcg`.
        accel: String,
    },
}

/// Arguments of `bulkhead-vmm` for `cfg`'s VM and `backends`.
pub fn vmm_args(cfg: &Config, backends: &[BackendSpec], api_socket: &Path) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(vm) = &cfg.vm {
        a.extend(["--kernel".into(), vm.kernel.display().to_string()]);
        if let Some(i) = &vm.initrd {
            a.extend(["--initrd".into(), i.display().to_string()]);
        }
        a.extend(["--cmdline".into(), vm.cmdline.clone()]);
        a.extend(["--memory".into(), vm.memory.clone()]);
        a.extend(["--cpus".into(), vm.cpus.to_string()]);
        if let Some(s) = &vm.serial {
            a.extend(["--serial".into(), format!("file={}", s.display())]);
        }
    }
    a.extend(["--api-socket".into(), api_socket.display().to_string()]);
    if let Some(m) = &cfg.vmm.seccomp {
        a.extend(["--sandbox".into(), m.clone()]);
    }
    for b in backends {
        let mut opts = format!("socket={},id={}", b.socket.display(), b.id);
        if let Some(t) = &b.transport {
            opts.push_str(&format!(",transport={t}"));
        }
        if b.packed {
            opts.push_str(",packed=on");
        }
        a.extend([b.kind.vmm_flag().into(), opts]);
    }
    a.extend(cfg.vmm.args.iter().cloned());
    a
}

/// Arguments of QEMU for `cfg`'s VM and `backends`; consoles are left out
/// (QEMU cannot attach a vhost-user console) and named in the second value.
pub fn qemu_args(
    cfg: &Config,
    backends: &[BackendSpec],
    accel: &str,
) -> (Vec<String>, Vec<String>) {
    let mut a: Vec<String> = Vec::new();
    let mut skipped = Vec::new();
    let q = &cfg.qemu;
    if let Some(vm) = &cfg.vm {
        a.extend(["-accel".into(), accel.into()]);
        a.extend([
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={},share=on", vm.memory),
        ]);
        a.extend(["-M".into(), format!("{},memory-backend=mem", q.machine)]);
        a.extend(["-m".into(), vm.memory.clone()]);
        a.extend(["-smp".into(), vm.cpus.to_string()]);
        a.extend(["-kernel".into(), vm.kernel.display().to_string()]);
        if let Some(i) = &vm.initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        a.extend(["-append".into(), vm.cmdline.clone()]);
        a.extend(["-display".into(), "none".into()]);
        a.extend(["-monitor".into(), "none".into()]);
        a.extend(["-no-reboot".into()]);
        let serial = match &vm.serial {
            Some(p) => format!("file:{}", p.display()),
            None => "stdio".into(),
        };
        a.extend(["-serial".into(), serial]);
    }
    for b in backends {
        let chardev = format!(
            "socket,id=chr-{id},path={},reconnect-ms={}",
            b.socket.display(),
            q.reconnect_ms,
            id = b.id
        );
        match b.kind {
            Kind::Blk => {
                a.extend(["-chardev".into(), chardev]);
                let mut dev = format!("vhost-user-blk-pci,chardev=chr-{id},id={id}", id = b.id);
                if let Some(n) = b.num_queues {
                    dev.push_str(&format!(",num-queues={n}"));
                }
                if b.packed {
                    dev.push_str(",packed=on");
                }
                a.extend(["-device".into(), dev]);
            }
            Kind::Net => {
                a.extend(["-chardev".into(), chardev]);
                a.extend([
                    "-netdev".into(),
                    format!("vhost-user,id={id},chardev=chr-{id}", id = b.id),
                ]);
                let mut dev = format!("virtio-net-pci,netdev={id},id=dev-{id}", id = b.id);
                // The guest must see the MAC the backend filters on.
                if let Some(mac) = &b.mac {
                    dev.push_str(&format!(",mac={mac}"));
                }
                if b.packed {
                    dev.push_str(",packed=on");
                }
                a.extend(["-device".into(), dev]);
            }
            Kind::Console => skipped.push(b.id.clone()),
        }
    }
    a.extend(q.args.iter().cloned());
    (a, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            r#"
frontend = "qemu"
[vm]
kernel = "/k"
initrd = "/i"
[[blk]]
image = "/d.img"
num_queues = 2
[[net]]
tap = "tap0"
mac = "52:54:00:aa:bb:cc"
[[console]]
"#,
        )
        .unwrap()
    }

    #[test]
    fn qemu_gets_shared_memfd_ram_and_reconnecting_chardevs() {
        let c = cfg();
        let b = c.backends(Path::new("/r"));
        let (a, skipped) = qemu_args(&c, &b, "tcg");
        let line = a.join(" ");
        assert!(line.contains("-object memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(line.contains("-M q35,memory-backend=mem"));
        assert!(line.contains("-chardev socket,id=chr-blk0,path=/r/blk0.sock,reconnect-ms=1000"));
        assert!(line.contains("-device vhost-user-blk-pci,chardev=chr-blk0,id=blk0,num-queues=2"));
        assert!(line.contains("-netdev vhost-user,id=net0,chardev=chr-net0"));
        assert!(
            line.contains("-device virtio-net-pci,netdev=net0,id=dev-net0,mac=52:54:00:aa:bb:cc")
        );
        assert!(line.contains("-kernel /k -initrd /i -append console=ttyS0"));
        assert_eq!(skipped, ["console0"]);
    }

    #[test]
    fn bulkhead_vmm_gets_one_flag_per_device_with_its_id() {
        let c = cfg();
        let b = c.backends(Path::new("/r"));
        let a = vmm_args(&c, &b, Path::new("/r/api.sock"));
        let line = a.join(" ");
        assert!(line.contains("--blk socket=/r/blk0.sock,id=blk0"));
        assert!(line.contains("--net socket=/r/net0.sock,id=net0"));
        assert!(line.contains("--console socket=/r/console0.sock,id=console0"));
        assert!(line.contains("--api-socket /r/api.sock"));
        // Split rings unless a device asks for packed ones.
        assert!(!line.contains("packed"));
    }

    #[test]
    fn packed_true_reaches_both_frontends_as_packed_on() {
        let mut c = cfg();
        c.blk[0].packed = true;
        c.net[0].packed = true;
        let b = c.backends(Path::new("/r"));
        let (q, _) = qemu_args(&c, &b, "tcg");
        let q = q.join(" ");
        assert!(q.contains(
            "-device vhost-user-blk-pci,chardev=chr-blk0,id=blk0,num-queues=2,packed=on"
        ));
        assert!(q.contains("mac=52:54:00:aa:bb:cc,packed=on"));
        let v = vmm_args(&c, &b, Path::new("/r/api.sock")).join(" ");
        assert!(v.contains("--blk socket=/r/blk0.sock,id=blk0,packed=on"));
        assert!(v.contains("--net socket=/r/net0.sock,id=net0,packed=on"));
        assert!(v.ends_with("--console socket=/r/console0.sock,id=console0"));
    }
}
