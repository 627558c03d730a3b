//! The launcher's TOML file (`bulkhead up --config vm.toml`), parsed with
//! serde into validated values. Every field is documented in
//! `docs/launcher.md`; unknown keys are errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bulkhead_common::sandbox::privileges::passwd_ids;
use serde::Deserialize;

/// Errors while reading the config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The TOML is malformed or has an unknown or mistyped key.
    #[error("Invalid TOML: {1}")]
    Parse(PathBuf, toml::de::Error),
    /// A value is out of range or inconsistent with another.
    #[error("{0}")]
    Invalid(String),
}

/// Which frontend runs the guest.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FrontendKind {
    /// `bulkhead-vmm` when `bulkhead-vmm probe` says KVM can run Linux here, QEMU otherwise.
    #[default]
    Auto,
    /// `bulkhead-vmm`.
    BulkheadVmm,
    /// `qemu-system-x86_64`.
    Qemu,
    /// Backends only (another frontend, e.g. libvirt, connects to the sockets).
    None,
}

impl std::fmt::Display for FrontendKind {
    /// The word the config file takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrontendKind::Auto => "auto",
            FrontendKind::BulkheadVmm => "bulkhead-vmm",
            FrontendKind::Qemu => "qemu",
            FrontendKind::None => "none",
        })
    }
}

/// The `[vm]` table: what the frontend boots.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    /// Kernel: ELF vmlinux (PVH) or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest RAM (`512M`, `2G`).
    #[serde(default = "default_memory")]
    pub memory: String,
    /// vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Serial console to a file; the launcher's stdout (prefixed) when absent.
    pub serial: Option<PathBuf>,
}

fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=1".into()
}
fn default_memory() -> String {
    "512M".into()
}
fn default_cpus() -> u8 {
    1
}

/// The `[restart]` table: how crashed backends are restarted.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    /// Delay before the first restart, in milliseconds.
    pub initial_delay_ms: u64,
    /// The delay doubles per restart up to this bound, in milliseconds.
    pub max_delay_ms: u64,
    /// Restarts allowed per backend before the launcher gives up and stops
    /// everything (0: never restart).
    pub max_restarts: u32,
    /// A backend that stayed up this long (seconds) starts again from the
    /// initial delay and a zero restart count.
    pub reset_after_s: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_delay_ms: 100,
            max_delay_ms: 5000,
            max_restarts: 10,
            reset_after_s: 60,
        }
    }
}

/// The `[qemu]` table: the QEMU frontend.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSection {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// `kvm`, `tcg`, or `auto` (kvm when `bulkhead-vmm probe` passes, else tcg).
    pub accel: String,
    /// Machine type.
    pub machine: String,
    /// Reconnect delay of each vhost-user chardev, in milliseconds.
    pub reconnect_ms: u64,
    /// Extra arguments appended to QEMU's command line.
    pub args: Vec<String>,
}

impl Default for QemuSection {
    fn default() -> Self {
        QemuSection {
            binary: "qemu-system-x86_64".into(),
            accel: "auto".into(),
            machine: "q35".into(),
            reconnect_ms: 1000,
            args: Vec::new(),
        }
    }
}

/// The `[vmm]` table: the bulkhead-vmm frontend.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmSection {
    /// The VMM's `--sandbox` mode (`enforce` or `kill`, `log`, `off`); its
    /// default when absent.
    pub seccomp: Option<String>,
    /// Extra arguments appended to bulkhead-vmm's command line.
    pub args: Vec<String>,
}

/// A `[[blk]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkBackend {
    /// Device id (log prefix, socket name, `bulkhead-vmm ctl` name); default `blkN`.
    pub id: Option<String>,
    /// Raw image or block device.
    pub image: PathBuf,
    /// Serve read-only.
    #[serde(default)]
    pub readonly: bool,
    /// Virtqueues.
    pub num_queues: Option<u16>,
    /// `pci` (default) or `mmio` (bulkhead-vmm only).
    pub transport: Option<String>,
    /// Packed virtqueues offered to the guest (`packed=on` in either
    /// frontend; default off, as in QEMU).
    #[serde(default)]
    pub packed: bool,
    /// I/O limits: `{ iops-total = 1000, bps-write = "10M" }`, each key
    /// passed as bulkhead-blk's `--KEY VALUE` ([`BLK_LIMITS`]).
    #[serde(default)]
    pub throttle: BTreeMap<String, Rate>,
    /// A throttle group: every `[[blk]]` naming it shares one budget, the
    /// `throttle` table its members give (the same in each that gives one).
    pub throttle_group: Option<String>,
    /// Extra arguments for bulkhead-blk.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Whether a blk `image` names an image on Ceph RBD (`rbd:POOL/IMAGE`),
/// which bulkhead-blk opens itself through librbd: no file.
pub fn is_rbd_image(image: &Path) -> bool {
    image.to_str().is_some_and(|s| s.starts_with("rbd:"))
}

/// A limit in a `throttle` table: a count, or a byte size such as `"10M"`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Rate {
    /// A plain number.
    Count(u64),
    /// A number with a K, M or G suffix (powers of 1024).
    Size(String),
}

impl Rate {
    fn value(&self) -> Result<u64, String> {
        match self {
            Rate::Count(n) => Ok(*n),
            Rate::Size(s) => bulkhead_common::size::parse_memory(s),
        }
    }

    fn arg(&self) -> String {
        match self {
            Rate::Count(n) => n.to_string(),
            Rate::Size(s) => s.clone(),
        }
    }
}

/// The keys of a `[[blk]]` `throttle` table (bulkhead-blk's options).
pub const BLK_LIMITS: [&str; 12] = [
    "iops-total",
    "iops-total-max",
    "iops-read",
    "iops-read-max",
    "iops-write",
    "iops-write-max",
    "bps-total",
    "bps-total-max",
    "bps-read",
    "bps-read-max",
    "bps-write",
    "bps-write-max",
];

/// The keys of a `[[net]]` `throttle` table (bulkhead-net's options), in
/// the order of the throttle's read (receive) and write (transmit) limits.
pub const NET_LIMITS: [&str; 8] = [
    "rx-pps",
    "rx-pps-max",
    "rx-bps",
    "rx-bps-max",
    "tx-pps",
    "tx-pps-max",
    "tx-bps",
    "tx-bps-max",
];

/// The daemon arguments of a `throttle` table, or what is wrong with it:
/// an unknown key, a bad value, or limits the daemon would refuse.
fn throttle_args(
    id: &str,
    table: &BTreeMap<String, Rate>,
    net: bool,
) -> Result<Vec<String>, Vec<String>> {
    use bulkhead_common::throttle::{Limit, Limits};
    let keys: &[&str] = if net { &NET_LIMITS } else { &BLK_LIMITS };
    let mut problems = Vec::new();
    let mut args = Vec::new();
    let mut get = |key: &str| -> u64 {
        match table.get(key).map(|r| r.value()) {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                problems.push(format!("{id}: throttle.{key}: {e}"));
                0
            }
            None => 0,
        }
    };
    let mut pair = |rate: &str| Limit {
        rate: get(rate),
        burst: get(&format!("{rate}-max")),
    };
    let limits = if net {
        Limits {
            iops_read: pair("rx-pps"),
            bps_read: pair("rx-bps"),
            iops_write: pair("tx-pps"),
            bps_write: pair("tx-bps"),
            ..Limits::NONE
        }
    } else {
        Limits {
            iops_total: pair("iops-total"),
            iops_read: pair("iops-read"),
            iops_write: pair("iops-write"),
            bps_total: pair("bps-total"),
            bps_read: pair("bps-read"),
            bps_write: pair("bps-write"),
        }
    };
    for (key, rate) in table {
        if keys.contains(&key.as_str()) {
            args.extend([format!("--{key}"), rate.arg()]);
        } else {
            problems.push(format!(
                "{id}: throttle.{key}: unknown limit (one of {})",
                keys.join(", ")
            ));
        }
    }
    if problems.is_empty()
        && let Err(e) = limits.validate()
    {
        let e = e.to_string();
        problems.push(if net {
            format!(
                "{id}: throttle: {}",
                e.replace("iops-read", "rx-pps")
                    .replace("iops-write", "tx-pps")
                    .replace("bps-read", "rx-bps")
                    .replace("bps-write", "tx-bps")
            )
        } else {
            format!("{id}: throttle: {e}")
        });
    }
    if problems.is_empty() {
        Ok(args)
    } else {
        Err(problems)
    }
}

/// A `[[net]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetBackend {
    /// Device id; default `netN`.
    pub id: Option<String>,
    /// Tap interface, opened by name.
    pub tap: String,
    /// MAC address offered to the guest.
    pub mac: Option<String>,
    /// `pci` (default) or `mmio` (bulkhead-vmm only).
    pub transport: Option<String>,
    /// Packed virtqueues offered to the guest (`packed=on` in either
    /// frontend; default off, as in QEMU).
    #[serde(default)]
    pub packed: bool,
    /// Limits: `{ tx-pps = 10000, rx-bps = "100M" }`, each key passed as
    /// bulkhead-net's `--KEY VALUE` ([`NET_LIMITS`]).
    #[serde(default)]
    pub throttle: BTreeMap<String, Rate>,
    /// A throttle group shared by every `[[net]]` naming it, as for blk.
    pub throttle_group: Option<String>,
    /// Extra arguments for bulkhead-net.
    #[serde(default)]
    pub args: Vec<String>,
}

/// A `[[console]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleBackend {
    /// Device id; default `consoleN`.
    pub id: Option<String>,
    /// `pci` (default) or `mmio` (bulkhead-vmm only).
    pub transport: Option<String>,
    /// Packed virtqueues offered to the guest (`packed=on` in either
    /// frontend; default off, as in QEMU).
    #[serde(default)]
    pub packed: bool,
    /// Extra arguments for bulkhead-console (`--console pty`, `--port ...`).
    #[serde(default)]
    pub args: Vec<String>,
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this VM (runtime directory, messages).
    #[serde(default = "default_name")]
    pub name: String,
    /// Where sockets and pid files go; default `$XDG_RUNTIME_DIR/bulkhead/NAME`
    /// or `/tmp/bulkhead-UID/NAME`.
    pub runtime_dir: Option<PathBuf>,
    /// Which frontend runs the guest.
    #[serde(default)]
    pub frontend: FrontendKind,
    /// The user every backend switches to once its files and sockets are
    /// open (`--user`), when the launcher runs as root: default `nobody`;
    /// `"root"` keeps them root. Ignored when the launcher is not root.
    pub user: Option<String>,
    /// What to boot (required unless `frontend = "none"`).
    pub vm: Option<VmSection>,
    /// Restart policy for crashed backends.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// QEMU frontend settings.
    #[serde(default)]
    pub qemu: QemuSection,
    /// bulkhead-vmm frontend settings.
    #[serde(default)]
    pub vmm: VmmSection,
    /// Block devices.
    #[serde(default)]
    pub blk: Vec<BlkBackend>,
    /// Network devices.
    #[serde(default)]
    pub net: Vec<NetBackend>,
    /// Consoles.
    #[serde(default)]
    pub console: Vec<ConsoleBackend>,
}

fn default_name() -> String {
    "vm".into()
}

/// The device kinds the launcher starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// bulkhead-blk.
    Blk,
    /// bulkhead-net.
    Net,
    /// bulkhead-console.
    Console,
}

impl Kind {
    /// The backend binary.
    pub fn binary(self) -> &'static str {
        match self {
            Kind::Blk => "bulkhead-blk",
            Kind::Net => "bulkhead-net",
            Kind::Console => "bulkhead-console",
        }
    }

    /// The device flag of bulkhead-vmm.
    pub fn vmm_flag(self) -> &'static str {
        match self {
            Kind::Blk => "--blk",
            Kind::Net => "--net",
            Kind::Console => "--console",
        }
    }
}

/// What the launcher opens for a backend that runs as another user, and
/// passes as inherited fds (`--image-fd`, `--tap-fd`): the daemon then
/// needs neither the right to open the image nor CAP_NET_ADMIN for the tap,
/// and never sees the path. Opened afresh at each (re)start, so an image's
/// lock and a tap's queues belong to the daemon that runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Preopen {
    /// `--image PATH` in the arguments becomes `--image-fd N`.
    Image {
        /// The image file or block device.
        path: PathBuf,
        /// Opened read-only (`readonly` or `--readonly`).
        readonly: bool,
        /// `--direct`: opened with O_DIRECT.
        direct: bool,
    },
    /// `--tap NAME` becomes one `--tap-fd N` per queue pair.
    Tap {
        /// The tap's name.
        name: String,
        /// Queue pairs (`--queue-pairs`), one fd each.
        queues: u16,
    },
}

/// One backend to run, resolved from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// Device id.
    pub id: String,
    /// What it is.
    pub kind: Kind,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Arguments after the binary name.
    pub args: Vec<String>,
    /// Transport in bulkhead-vmm.
    pub transport: Option<String>,
    /// Packed virtqueues (the frontend's `packed=on`).
    pub packed: bool,
    /// Queues (blk).
    pub num_queues: Option<u16>,
    /// MAC address the frontend must give the guest (net).
    pub mac: Option<String>,
    /// What the launcher opens for it ([`Preopen`]); None: it opens its own.
    pub preopen: Option<Preopen>,
    /// Its throttle group's name: the launcher passes the group's memfd
    /// as `--throttle-group-fd`.
    pub throttle_group: Option<String>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_transport(id: &str, t: &Option<String>) -> Result<(), ConfigError> {
    match t.as_deref() {
        None | Some("pci") | Some("mmio") => Ok(()),
        Some(x) => Err(ConfigError::Invalid(format!(
            "{id}: transport = \"{x}\": expected \"pci\" or \"mmio\""
        ))),
    }
}

impl Config {
    /// Reads and validates `path`; relative paths in it are taken relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg = Self::read(path)?;
        cfg.validate()?;
        cfg.assign_macs();
        Ok(cfg)
    }

    /// Gives each net device without a MAC one, as libvirt does: without
    /// it bulkhead-net has no address to filter on (the guest would pick
    /// its own and the device would take every frame), and every restart
    /// of the daemon must offer the same one (its saved state names it).
    fn assign_macs(&mut self) {
        for n in &mut self.net {
            if n.mac.is_none() && !n.args.iter().any(|a| a == "--mac") {
                n.mac = Some(random_mac());
            }
        }
    }

    /// Parses `text` (for tests); paths stay as written.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(PathBuf::from("<string>"), e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(vm) = &mut self.vm {
            fix(&mut vm.kernel);
            if let Some(i) = &mut vm.initrd {
                fix(i);
            }
            if let Some(s) = &mut vm.serial {
                fix(s);
            }
        }
        for b in &mut self.blk {
            // `rbd:POOL/IMAGE` names an image on Ceph, not a file.
            if !is_rbd_image(&b.image) {
                fix(&mut b.image);
            }
        }
        if let Some(r) = &mut self.runtime_dir {
            fix(r);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("\n")))
        }
    }

    /// Reads `path` and resolves its relative paths, without validating it
    /// (`bulkhead check` then lists every problem at once).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let mut cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(cfg)
    }

    /// Every value that is out of range or inconsistent, each naming its
    /// field; empty when the file is valid. Sizes and MACs go through the
    /// parsers bulkhead-vmm and bulkhead-net use.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !valid_id(&self.name) {
            p.push(format!(
                "name = \"{}\": 1 to 32 letters, digits, '-' or '_'",
                self.name
            ));
        }
        if self.frontend != FrontendKind::None && self.vm.is_none() {
            p.push("a [vm] table (kernel) is required unless frontend = \"none\"".into());
        }
        if let Some(vm) = &self.vm {
            if vm.cpus == 0 || vm.cpus > 254 {
                p.push(format!("vm.cpus = {}: must be 1 to 254", vm.cpus));
            }
            match bulkhead_common::size::parse_memory(&vm.memory) {
                Ok(0) => p.push(format!("vm.memory = \"{}\": must not be 0", vm.memory)),
                Ok(_) => {}
                Err(e) => p.push(format!("vm.memory = \"{}\": {e}", vm.memory)),
            }
        }
        let r = &self.restart;
        if r.initial_delay_ms == 0 || r.max_delay_ms < r.initial_delay_ms {
            p.push("restart: initial_delay_ms must be > 0 and <= max_delay_ms".into());
        }
        if !matches!(self.qemu.accel.as_str(), "auto" | "kvm" | "tcg") {
            p.push(format!(
                "qemu.accel = \"{}\": expected auto, kvm or tcg",
                self.qemu.accel
            ));
        }
        let specs = self.backends(Path::new("/"));
        let mut seen = std::collections::BTreeSet::new();
        for s in &specs {
            if !valid_id(&s.id) {
                p.push(format!(
                    "id = \"{}\": 1 to 32 letters, digits, '-' or '_'",
                    s.id
                ));
            }
            if !seen.insert(s.id.clone()) {
                p.push(format!("id \"{}\" is used twice", s.id));
            }
            if let Err(ConfigError::Invalid(e)) = check_transport(&s.id, &s.transport) {
                p.push(e);
            }
            if let Some(mac) = &s.mac
                && let Err(e) = bulkhead_net::request::MacAddr::parse_unicast(mac)
            {
                p.push(format!("{}: mac = \"{mac}\": {e}", s.id));
            }
        }
        for (i, b) in self.blk.iter().enumerate() {
            let id = b.id.clone().unwrap_or_else(|| format!("blk{i}"));
            if let Err(e) = throttle_args(&id, &b.throttle, false) {
                p.extend(e);
            }
        }
        for (i, n) in self.net.iter().enumerate() {
            let id = n.id.clone().unwrap_or_else(|| format!("net{i}"));
            if let Err(e) = throttle_args(&id, &n.throttle, true) {
                p.extend(e);
            }
        }
        p.extend(self.group_problems());
        if specs.is_empty() {
            p.push("no backends: add a [[blk]], [[net]] or [[console]] entry".into());
        }
        p
    }

    /// Every backend, with its socket in `runtime_dir`, and its stats
    /// socket there too (`ID.sock.stats`, removed with the other sockets at
    /// shutdown) unless its `args` name one.
    pub fn backends(&self, runtime_dir: &Path) -> Vec<BackendSpec> {
        let mut v = self.backends_as_given(runtime_dir);
        for b in &mut v {
            if !b.args.iter().any(|a| a.starts_with("--stats-socket")) {
                let path = runtime_dir.join(format!("{}.sock.stats", b.id));
                b.args
                    .extend(["--stats-socket".into(), path.display().to_string()]);
            }
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if let Some(user) = self.backend_user(root) {
            for (b, preopen) in v.iter_mut().zip(self.preopens()) {
                if !b.args.iter().any(|a| a == "--user") {
                    b.args.extend(["--user".into(), user.to_string()]);
                }
                b.preopen = preopen;
            }
        }
        v
    }

    /// Whether a backend talks to the network: a blk image on Ceph RBD
    /// (`rbd:POOL/IMAGE`), served through librados' TCP connections.
    pub fn needs_network(&self) -> bool {
        self.blk.iter().any(|b| is_rbd_image(&b.image))
    }

    /// For each backend (in [`Config::backends`] order), what the launcher
    /// would open for it: the blk image, the net tap; not when the
    /// backend's own arguments already name an fd.
    fn preopens(&self) -> Vec<Option<Preopen>> {
        let has = |args: &[String], flag: &str| {
            args.iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let mut v = Vec::new();
        for b in &self.blk {
            // An image on Ceph (`rbd:POOL/IMAGE`) is no file to open here.
            let remote = is_rbd_image(&b.image);
            v.push(
                (!remote && !has(&b.args, "--image-fd")).then(|| Preopen::Image {
                    path: b.image.clone(),
                    readonly: b.readonly || has(&b.args, "--readonly"),
                    direct: has(&b.args, "--direct"),
                }),
            );
        }
        for n in &self.net {
            v.push((!has(&n.args, "--tap-fd")).then(|| Preopen::Tap {
                name: n.tap.clone(),
                queues: queue_pairs(&n.args),
            }));
        }
        v.extend(self.console.iter().map(|_| None));
        v
    }

    /// Whom the backends run as, given whether the launcher is root: least
    /// privilege by default (the seed's first rule), `nobody` unless the
    /// file says otherwise; None: as the launcher.
    fn backend_user(&self, root: bool) -> Option<&str> {
        if !root {
            return None;
        }
        match self.user.as_deref() {
            Some("root") | Some("0") => None,
            Some(u) => Some(u),
            // A minimal host (a container, an initramfs) may have no
            // passwd entry for nobody: its uid, the kernel's overflow uid,
            // is what the name stands for everywhere else.
            None if passwd_ids("nobody").is_some() => Some("nobody"),
            None => Some("65534"),
        }
    }

    /// The backends with the arguments the file gives them.
    fn backends_as_given(&self, runtime_dir: &Path) -> Vec<BackendSpec> {
        let sock = |id: &str| runtime_dir.join(format!("{id}.sock"));
        let mut v = Vec::new();
        for (i, b) in self.blk.iter().enumerate() {
            let id = b.id.clone().unwrap_or_else(|| format!("blk{i}"));
            let mut args = vec!["--image".to_string(), b.image.display().to_string()];
            if b.readonly {
                args.push("--readonly".into());
            }
            if let Some(n) = b.num_queues {
                args.extend(["--num-queues".into(), n.to_string()]);
            }
            let table = self.group_table(&b.throttle, &b.throttle_group, false);
            args.extend(throttle_args(&id, table, false).unwrap_or_default());
            args.extend(b.args.iter().cloned());
            v.push(BackendSpec {
                socket: sock(&id),
                id,
                kind: Kind::Blk,
                args,
                transport: b.transport.clone(),
                packed: b.packed,
                num_queues: b.num_queues,
                mac: None,
                preopen: None,
                throttle_group: b.throttle_group.clone(),
            });
        }
        for (i, n) in self.net.iter().enumerate() {
            let id = n.id.clone().unwrap_or_else(|| format!("net{i}"));
            let mut args = vec!["--tap".to_string(), n.tap.clone()];
            if let Some(m) = &n.mac {
                args.extend(["--mac".into(), m.clone()]);
            }
            let table = self.group_table(&n.throttle, &n.throttle_group, true);
            args.extend(throttle_args(&id, table, true).unwrap_or_default());
            args.extend(n.args.iter().cloned());
            v.push(BackendSpec {
                socket: sock(&id),
                id,
                kind: Kind::Net,
                args,
                transport: n.transport.clone(),
                packed: n.packed,
                num_queues: None,
                mac: n.mac.clone(),
                preopen: None,
                throttle_group: n.throttle_group.clone(),
            });
        }
        for (i, c) in self.console.iter().enumerate() {
            let id = c.id.clone().unwrap_or_else(|| format!("console{i}"));
            v.push(BackendSpec {
                socket: sock(&id),
                id,
                kind: Kind::Console,
                args: c.args.clone(),
                transport: c.transport.clone(),
                packed: c.packed,
                num_queues: None,
                mac: None,
                preopen: None,
                throttle_group: None,
            });
        }
        v
    }

    /// Each member's `throttle` table, or its group's: every member of a
    /// group gets the one table its members give, so whichever starts first
    /// sets the group's limits and the others agree.
    fn group_table<'a>(
        &'a self,
        own: &'a BTreeMap<String, Rate>,
        group: &Option<String>,
        net: bool,
    ) -> &'a BTreeMap<String, Rate> {
        let Some(g) = group else {
            return own;
        };
        let tables: Vec<&BTreeMap<String, Rate>> = if net {
            self.net
                .iter()
                .filter(|n| n.throttle_group.as_ref() == Some(g))
                .map(|n| &n.throttle)
                .collect()
        } else {
            self.blk
                .iter()
                .filter(|b| b.throttle_group.as_ref() == Some(g))
                .map(|b| &b.throttle)
                .collect()
        };
        tables.into_iter().find(|t| !t.is_empty()).unwrap_or(own)
    }

    /// What is wrong with the throttle groups: a name blk and net both
    /// use, members giving different tables, a name that is no id.
    fn group_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        // Per group: whether it is net's, and the table its members give.
        type Seen<'a> = (bool, Option<&'a BTreeMap<String, Rate>>);
        let mut kinds: BTreeMap<&str, Seen<'_>> = BTreeMap::new();
        let members = self
            .blk
            .iter()
            .filter_map(|b| b.throttle_group.as_deref().map(|g| (g, false, &b.throttle)))
            .chain(
                self.net
                    .iter()
                    .filter_map(|n| n.throttle_group.as_deref().map(|g| (g, true, &n.throttle))),
            );
        for (g, net, table) in members {
            if !valid_id(g) {
                p.push(format!(
                    "throttle_group = \"{g}\": letters, digits, '-' and '_', up to 32"
                ));
                continue;
            }
            let entry = kinds.entry(g).or_insert((net, None));
            if entry.0 != net {
                p.push(format!(
                    "throttle_group \"{g}\" has both [[blk]] and [[net]] members: a group is one kind's"
                ));
                continue;
            }
            if table.is_empty() {
                continue;
            }
            match entry.1 {
                None => entry.1 = Some(table),
                Some(t) if t == table => {}
                Some(_) => p.push(format!(
                    "throttle_group \"{g}\": its members give different throttle tables (give it in one, or the same in each)"
                )),
            }
        }
        p
    }
}

/// `--queue-pairs N` (or `=N`) in bulkhead-net's arguments; 1 without one
/// or with a value the daemon will refuse anyway.
fn queue_pairs(args: &[String]) -> u16 {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = match a.strip_prefix("--queue-pairs") {
            Some("") => it.next().map(String::as_str),
            Some(rest) => rest.strip_prefix('='),
            None => continue,
        };
        return value.and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    }
    1
}

/// A MAC in QEMU's and libvirt's locally administered range 52:54:00, the
/// rest random.
fn random_mac() -> String {
    let mut b = [0u8; 3];
    // SAFETY: getrandom(2) writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy at all: still unique per launcher.
        let pid = std::process::id().to_le_bytes();
        b.copy_from_slice(&pid[..3]);
    }
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_tables_become_the_daemons_limit_options_and_nonsense_is_refused() {
        let c = Config::parse(
            "frontend = \"none\"\n[[blk]]\nimage = \"/a.img\"\n\
             throttle = { iops-total = 500, bps-write = \"10M\" }\n\
             [[net]]\ntap = \"t0\"\nmac = \"52:54:00:00:00:01\"\nthrottle = { tx-pps = 1000 }\n",
        )
        .unwrap();
        let b = c.backends_as_given(Path::new("/run/x"));
        assert_eq!(
            b[0].args,
            [
                "--image",
                "/a.img",
                "--bps-write",
                "10M",
                "--iops-total",
                "500"
            ]
        );
        assert_eq!(
            b[1].args,
            [
                "--tap",
                "t0",
                "--mac",
                "52:54:00:00:00:01",
                "--tx-pps",
                "1000"
            ]
        );
        for (table, want) in [
            (
                "{ iops-totl = 5 }",
                "blk0: throttle.iops-totl: unknown limit",
            ),
            ("{ bps-read = \"lots\" }", "blk0: throttle.bps-read:"),
            (
                "{ iops-total = 5, iops-read = 5 }",
                "cannot be used together",
            ),
            ("{ iops-write-max = 5 }", "needs a rate"),
        ] {
            let e = Config::parse(&format!(
                "frontend = \"none\"\n[[blk]]\nimage = \"/a.img\"\nthrottle = {table}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{table}: {e}");
        }
        let e = Config::parse(
            "frontend = \"none\"\n[[net]]\ntap = \"t\"\nthrottle = { rx-pps = 100, rx-pps-max = 10 }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("net0: throttle: rx-pps-max (10) is below rx-pps (100)"),
            "{e}"
        );
    }

    #[test]
    fn a_throttle_group_gives_every_member_its_table_and_mixed_groups_are_refused() {
        let c = Config::parse(
            "frontend = \"none\"\n\
             [[blk]]\nimage = \"/a.img\"\nthrottle_group = \"g1\"\n\
             [[blk]]\nimage = \"/b.img\"\nthrottle_group = \"g1\"\nthrottle = { iops-total = 50 }\n\
             [[blk]]\nimage = \"/c.img\"\n",
        )
        .unwrap();
        let b = c.backends_as_given(Path::new("/run/x"));
        for m in &b[..2] {
            assert_eq!(m.throttle_group.as_deref(), Some("g1"));
            assert!(
                m.args.ends_with(&["--iops-total".into(), "50".into()]),
                "{:?}",
                m.args
            );
        }
        assert_eq!(b[2].throttle_group, None);
        assert_eq!(b[2].args, ["--image", "/c.img"]);
        for (body, want) in [
            (
                "[[blk]]\nimage = \"/a.img\"\nthrottle_group = \"g\"\nthrottle = { iops-total = 5 }\n\
                 [[blk]]\nimage = \"/b.img\"\nthrottle_group = \"g\"\nthrottle = { iops-total = 6 }\n",
                "its members give different throttle tables",
            ),
            (
                "[[blk]]\nimage = \"/a.img\"\nthrottle_group = \"g\"\n\
                 [[net]]\ntap = \"t\"\nthrottle_group = \"g\"\n",
                "has both [[blk]] and [[net]] members",
            ),
            (
                "[[blk]]\nimage = \"/a.img\"\nthrottle_group = \"a/b\"\n",
                "throttle_group = \"a/b\"",
            ),
        ] {
            let e = Config::parse(&format!("frontend = \"none\"\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    const FULL: &str = r#"
name = "web1"
frontend = "qemu"
runtime_dir = "/run/bh/web1"

[vm]
kernel = "/boot/vmlinux"
initrd = "/boot/initrd.cpio"
memory = "1G"
cpus = 2

[restart]
initial_delay_ms = 50
max_delay_ms = 800
max_restarts = 3

[qemu]
accel = "tcg"
reconnect_ms = 500

[[blk]]
id = "root"
image = "/var/lib/vm/root.img"
num_queues = 2

[[net]]
tap = "tap0"
mac = "52:54:00:12:34:56"

[[console]]
"#;

    #[test]
    fn a_full_file_parses_and_names_default_ids() {
        let c = Config::parse(FULL).unwrap();
        assert_eq!(c.frontend, FrontendKind::Qemu);
        assert_eq!(c.restart.max_restarts, 3);
        let b = c.backends_as_given(Path::new("/run/bh/web1"));
        let ids: Vec<&str> = b.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["root", "net0", "console0"]);
        assert_eq!(b[0].socket, Path::new("/run/bh/web1/root.sock"));
        assert_eq!(
            b[0].args,
            ["--image", "/var/lib/vm/root.img", "--num-queues", "2"]
        );
        assert_eq!(b[1].args, ["--tap", "tap0", "--mac", "52:54:00:12:34:56"]);
    }

    #[test]
    fn every_backend_gets_a_stats_socket_in_the_runtime_dir_unless_its_args_name_one() {
        let mut c = Config::parse(FULL).unwrap();
        c.console[0].args = vec!["--stats-socket=/elsewhere".into()];
        let b = c.backends(Path::new("/run/bh/web1"));
        let stats = |i: usize| {
            b[i].args
                .iter()
                .position(|a| a == "--stats-socket")
                .map(|p| b[i].args[p + 1].clone())
        };
        assert_eq!(stats(0).as_deref(), Some("/run/bh/web1/root.sock.stats"));
        assert_eq!(stats(1).as_deref(), Some("/run/bh/web1/net0.sock.stats"));
        assert_eq!(stats(2), None);
        assert_eq!(
            b[2].args
                .iter()
                .filter(|a| a.starts_with("--stats-socket"))
                .count(),
            1
        );
    }

    #[test]
    fn a_net_device_without_a_mac_gets_one_that_every_restart_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            "frontend = \"none\"\n[[net]]\ntap = \"a\"\n[[net]]\ntap = \"b\"\nargs = [\"--mac\", \"02:00:00:00:00:01\"]\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        let mac = c.net[0].mac.clone().expect("a MAC was assigned");
        assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
        assert!(c.net[1].mac.is_none(), "--mac in args is the user's own");
        // The daemon's arguments (used for every restart) carry it.
        let b = c.backends_as_given(Path::new("/run/x"));
        assert_eq!(b[0].args, ["--tap", "a", "--mac", mac.as_str()]);
        assert_eq!(c.backends_as_given(Path::new("/run/x"))[0].args, b[0].args);
    }

    #[test]
    fn backends_run_as_nobody_under_a_root_launcher_unless_told_otherwise() {
        let c = Config::parse("frontend = \"none\"\n[[console]]\n").unwrap();
        let nobody = c.backend_user(true);
        assert!(matches!(nobody, Some("nobody" | "65534")), "{nobody:?}");
        assert_eq!(c.backend_user(false), None);
        let c = Config::parse("frontend = \"none\"\nuser = \"root\"\n[[console]]\n").unwrap();
        assert_eq!(c.backend_user(true), None);
        let c = Config::parse("frontend = \"none\"\nuser = \"vmuser\"\n[[console]]\n").unwrap();
        assert_eq!(c.backend_user(true), Some("vmuser"));
    }

    #[test]
    fn the_launcher_would_open_images_and_taps_unless_given_fds() {
        let c = Config::parse(
            "frontend = \"none\"\n[[blk]]\nimage = \"/a.img\"\nargs = [\"--direct\"]\n\
             [[blk]]\nimage = \"/b.img\"\nargs = [\"--image-fd=7\"]\n\
             [[blk]]\nimage = \"rbd:vms/disk1\"\n\
             [[net]]\ntap = \"t0\"\nargs = [\"--queue-pairs\", \"4\"]\n[[console]]\n",
        )
        .unwrap();
        assert_eq!(
            c.preopens(),
            [
                Some(Preopen::Image {
                    path: "/a.img".into(),
                    readonly: false,
                    direct: true
                }),
                None,
                None,
                Some(Preopen::Tap {
                    name: "t0".into(),
                    queues: 4
                }),
                None,
            ]
        );
        // The RBD image's daemon talks to the cluster: TCP stays open.
        assert!(c.needs_network());
        let files = Config::parse("frontend = \"none\"\n[[blk]]\nimage = \"/rbd:x/y\"\n").unwrap();
        assert!(!files.needs_network());
        let pairs = |a: &[&str]| queue_pairs(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(pairs(&["--queue-pairs=3"]), 3);
        assert_eq!(pairs(&["--mac", "m"]), 1);
        assert_eq!(pairs(&["--queue-pairs", "zero"]), 1);
    }

    #[test]
    fn mistakes_are_reported_by_name() {
        let e = |t: &str| Config::parse(t).unwrap_err().to_string();
        assert!(e("frontend = \"none\"\nbogus = 1\n[[console]]").contains("bogus"));
        assert!(e("[[console]]").contains("[vm]"));
        assert!(e("frontend = \"none\"").contains("no backends"));
        assert!(
            e("frontend = \"none\"\n[[console]]\nid = \"a\"\n[[console]]\nid = \"a\"")
                .contains("twice")
        );
        assert!(e("frontend = \"none\"\n[[console]]\ntransport = \"isa\"").contains("transport"));
        assert!(e("frontend = \"none\"\n[[blk]]\nid = \"x\"").contains("image"));
    }

    #[test]
    fn every_bad_value_is_named_at_once() {
        let c: Config = toml::from_str(
            "[vm]\nkernel = \"k\"\nmemory = \"lots\"\ncpus = 0\n[[net]]\ntap = \"t\"\nmac = \"52:54:00:zz:00:01\"\n[[net]]\ntap = \"u\"\nmac = \"01:00:5e:00:00:01\"\n",
        )
        .unwrap();
        let p = c.problems().join("\n");
        assert!(p.contains("vm.memory = \"lots\""), "{p}");
        assert!(p.contains("vm.cpus = 0"), "{p}");
        assert!(p.contains("net0: mac = \"52:54:00:zz:00:01\""), "{p}");
        assert!(p.contains("net1: mac") && p.contains("unicast"), "{p}");
        assert_eq!(c.problems().len(), 4, "{p}");
        let ok: Config =
            toml::from_str("[vm]\nkernel = \"k\"\nmemory = \"2G\"\n[[console]]\n").unwrap();
        assert!(ok.problems().is_empty());
    }
}
