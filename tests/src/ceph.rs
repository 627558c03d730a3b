//! A throwaway one-node Ceph cluster for RBD tests: one monitor, one
//! manager and one OSD on 127.0.0.1, in a temporary directory of its own,
//! with cephx on (one keyring holds every key) and the pool `rbd` of size
//! one. The OSD keeps its objects in memory (memstore with page sets, so
//! small random writes do not balloon it). Ready in 6 to 9 s here (one
//! per test: tests/tests/blk_rbd.rs runs five in about 25 s, in parallel).
//!
//! Every daemon is a [`ChildGuard`]; dropping the [`Cluster`] kills the OSD
//! and the manager, then the monitor (the mon last: clients of a mon that
//! is gone wait for ever), then removes the directory. Each command that
//! talks to the cluster runs under `timeout`, so a cluster that never
//! comes up fails the test instead of hanging it.
//!
//! The recipe and its pitfalls are measured in ARCHITECTURE.md, "Ceph RBD".

use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::ChildGuard;
use crate::skip::SkipReason;

/// The Ceph programs the fixture runs.
const PROGRAMS: [&str; 7] = [
    "ceph-mon",
    "ceph-mgr",
    "ceph-osd",
    "ceph",
    "rbd",
    "monmaptool",
    "ceph-authtool",
];

/// The longest any one cluster command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a test needing a cluster cannot run here, or None.
pub fn needs_ceph() -> Option<SkipReason> {
    if let Some(r) = crate::skip::needs_root() {
        return Some(r);
    }
    for p in PROGRAMS {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()));
        if !found {
            return Some(SkipReason::NotInstalled(format!("{p} (Ceph)")));
        }
    }
    None
}

/// A running one-node cluster. Fields drop in order: OSD, mgr, mon, dir.
pub struct Cluster {
    osd: ChildGuard,
    mgr: ChildGuard,
    mon: ChildGuard,
    dir: TempDir,
    /// Where the monitor listens (its v2 address).
    mon_addr: String,
}

fn free_port(ip: Ipv4Addr) -> io::Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Runs `program args` under `timeout`, failing with its stderr unless it succeeds.
fn run(program: &str, args: &[&str]) -> io::Result<Output> {
    let out = Command::new("timeout")
        .arg("--kill-after=5")
        .arg(COMMAND_TIMEOUT.as_secs().to_string())
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

impl Cluster {
    /// Creates and starts a cluster on 127.0.0.1; returns once pool `rbd`
    /// is initialised.
    pub fn start() -> io::Result<Self> {
        Self::start_on(Ipv4Addr::LOCALHOST)
    }

    /// [`Cluster::start`] with every daemon on `ip`, an address of this
    /// host: one a nested host reaches through QEMU's user network (which
    /// connects from this host to the address the guest asked for), where
    /// 127.0.0.1 would be its own.
    pub fn start_on(ip: Ipv4Addr) -> io::Result<Self> {
        let started = Instant::now();
        let dir = tempfile::Builder::new().prefix("bulkhead-ceph").tempdir()?;
        let d = dir.path();
        for sub in ["mon/ceph-a", "mgr/ceph-x", "osd/ceph-0", "run", "log"] {
            fs::create_dir_all(d.join(sub))?;
        }
        let port = free_port(ip)?;
        let fsid = uuid();
        let conf = d.join("ceph.conf");
        let keyring = d.join("keyring");
        let p = d.display();
        fs::write(
            &conf,
            format!(
                "[global]\n\
                 fsid = {fsid}\n\
                 mon host = [v2:{ip}:{port}]\n\
                 public addr = {ip}\n\
                 ms bind ipv6 = false\n\
                 auth cluster required = cephx\n\
                 auth service required = cephx\n\
                 auth client required = cephx\n\
                 keyring = {p}/keyring\n\
                 run dir = {p}/run\n\
                 pid file = {p}/run/$name.pid\n\
                 log file = {p}/log/$name.log\n\
                 mon data = {p}/mon/$cluster-$id\n\
                 mgr data = {p}/mgr/$cluster-$id\n\
                 osd data = {p}/osd/$cluster-$id\n\
                 osd pool default size = 1\n\
                 osd pool default min size = 1\n\
                 osd pool default pg autoscale mode = off\n\
                 osd crush chooseleaf type = 0\n\
                 mon allow pool size one = true\n\
                 mon allow pool delete = true\n\
                 mon warn on pool no redundancy = false\n\
                 mon data avail crit = 0\n\
                 mon data avail warn = 0\n\
                 osd objectstore = memstore\n\
                 memstore device bytes = 1073741824\n\
                 memstore page set = true\n\
                 memstore page size = 4096\n\
                 [mon]\n\
                 admin socket = {p}/run/$name.asok\n\
                 [mgr]\n\
                 admin socket = {p}/run/$name.asok\n\
                 [osd]\n\
                 admin socket = {p}/run/$name.asok\n\
                 [client]\n\
                 admin socket =\n\
                 log file = {p}/log/client.log\n"
            ),
        )?;
        let k = keyring.to_str().unwrap_or_default();
        let c = conf.to_str().unwrap_or_default();
        run(
            "ceph-authtool",
            &[
                "--create-keyring",
                k,
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
        )?;
        for (name, caps) in [
            (
                "client.admin",
                &[
                    ("mon", "allow *"),
                    ("osd", "allow *"),
                    ("mgr", "allow *"),
                    ("mds", "allow *"),
                ][..],
            ),
            (
                "mgr.x",
                &[
                    ("mon", "allow profile mgr"),
                    ("osd", "allow *"),
                    ("mds", "allow *"),
                ][..],
            ),
            (
                "osd.0",
                &[
                    ("mon", "allow profile osd"),
                    ("osd", "allow *"),
                    ("mgr", "allow profile osd"),
                ][..],
            ),
        ] {
            let mut args = vec![k, "--gen-key", "-n", name];
            for (what, cap) in caps {
                args.extend(["--cap", what, cap]);
            }
            run("ceph-authtool", &args)?;
        }
        let monmap = d.join("monmap");
        let m = monmap.to_str().unwrap_or_default();
        let addr = format!("[v2:{ip}:{port}]");
        run(
            "monmaptool",
            &["--create", "--addv", "a", &addr, "--fsid", &fsid, m],
        )?;
        run(
            "ceph-mon",
            &["-c", c, "--mkfs", "-i", "a", "--monmap", m, "--keyring", k],
        )?;
        let daemon = |name: &str, args: &[&str]| {
            ChildGuard::spawn(
                name,
                Command::new(name)
                    .args(["-c", c, "-f"])
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
        };
        let mon = daemon("ceph-mon", &["-i", "a"])?;
        let mgr = daemon("ceph-mgr", &["-i", "x"])?;
        let osd_uuid = uuid();
        let out = Self::ceph_in(c, &["osd", "new", &osd_uuid])?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if id != "0" {
            return Err(io::Error::other(format!(
                "ceph osd new gave id {id:?}, not 0"
            )));
        }
        run(
            "ceph-osd",
            &["-c", c, "-i", "0", "--mkfs", "--osd-uuid", &osd_uuid],
        )?;
        let osd = daemon("ceph-osd", &["-i", "0"])?;
        let cluster = Cluster {
            osd,
            mgr,
            mon,
            dir,
            mon_addr: addr,
        };
        cluster.ceph(&["osd", "pool", "create", "rbd", "8", "8"])?;
        cluster.ceph(&[
            "osd",
            "pool",
            "set",
            "rbd",
            "size",
            "1",
            "--yes-i-really-mean-it",
        ])?;
        run("rbd", &["-c", c, "pool", "init", "rbd"])?;
        eprintln!(
            "ceph fixture: cluster in {} ready after {:?}",
            cluster.dir.path().display(),
            started.elapsed()
        );
        Ok(cluster)
    }

    fn ceph_in(conf: &str, args: &[&str]) -> io::Result<Output> {
        let mut a = vec!["-c", conf, "--connect-timeout", "30"];
        a.extend_from_slice(args);
        run("ceph", &a)
    }

    /// Runs `ceph ARGS` against this cluster (under a timeout).
    pub fn ceph(&self, args: &[&str]) -> io::Result<Output> {
        Self::ceph_in(&self.conf_str(), args)
    }

    /// Runs `rbd ARGS` against this cluster (under a timeout).
    pub fn rbd(&self, args: &[&str]) -> io::Result<Output> {
        let c = self.conf_str();
        let mut a = vec!["-c", c.as_str()];
        a.extend_from_slice(args);
        run("rbd", &a)
    }

    /// The configuration file (names the monitor and the admin keyring).
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    fn conf_str(&self) -> String {
        self.conf().display().to_string()
    }

    /// A client's configuration file for this cluster with its keyring at
    /// `keyring` (a copy of [`Cluster::keyring`] elsewhere, e.g. inside a
    /// nested host): the monitor, cephx, no admin socket, logs to stderr.
    pub fn client_conf(&self, keyring: &str) -> String {
        format!(
            "[global]\n\
             mon host = {}\n\
             ms bind ipv6 = false\n\
             auth cluster required = cephx\n\
             auth service required = cephx\n\
             auth client required = cephx\n\
             keyring = {keyring}\n\
             [client]\n\
             admin socket =\n\
             log file =\n\
             log to stderr = false\n",
            self.mon_addr
        )
    }

    /// The keyring holding client.admin's key.
    pub fn keyring(&self) -> PathBuf {
        self.dir.path().join("keyring")
    }

    /// The cluster's directory (logs under `log/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates image `name` of `size` bytes in pool `rbd`, with the
    /// exclusive-lock feature.
    pub fn create_image(&self, name: &str, size: u64) -> io::Result<()> {
        self.rbd(&[
            "create",
            "--size",
            &format!("{}K", size / 1024),
            "--image-feature",
            "layering,exclusive-lock",
            &format!("rbd/{name}"),
        ])
        .map(|_| ())
    }

    /// The whole of image `name`, read with `rbd export`.
    pub fn export(&self, name: &str) -> io::Result<Vec<u8>> {
        let out = self.dir.path().join(format!("export-{name}"));
        let _ = fs::remove_file(&out);
        self.rbd(&[
            "export",
            "--no-progress",
            &format!("rbd/{name}"),
            &out.display().to_string(),
        ])?;
        let data = fs::read(&out)?;
        fs::remove_file(&out)?;
        Ok(data)
    }

    /// The process ids of the OSD, mgr and mon (for diagnostics).
    pub fn pids(&self) -> [u32; 3] {
        [self.osd.pid(), self.mgr.pid(), self.mon.pid()]
    }
}
