//! The systems under test: `bulkhead-blk` and qemu-storage-daemon as
//! vhost-user-blk backends (each started here, on the image, with its
//! configuration recorded for the report), and the host itself.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bulkhead_tests::process::{ChildGuard, wait_for_path};

use super::client::{HostClient, Result, Ring, VuClient};
use super::libblkio::LibblkioBench;
use super::workload::{Sample, Spec};

/// Which system a target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `bulkhead-blk` with the io_uring engine.
    Bulkhead,
    /// Another `bulkhead-blk` binary (`--baseline-bin`): an earlier build, for before/after.
    Baseline,
    /// qemu-storage-daemon with `aio=io_uring`.
    QsdIoUring,
    /// qemu-storage-daemon with `aio=threads`.
    QsdThreads,
    /// The access pattern issued by this process with io_uring, no virtio.
    Host,
    /// `bulkhead-blk` at its default ring size, driven by libblkio.
    BulkheadLibblkio,
    /// qemu-storage-daemon with `aio=io_uring`, driven by libblkio.
    QsdLibblkio,
    /// `bulkhead-blk` on a Ceph RBD image, driven by libblkio (the rbd
    /// suite only: [`Target::start_rbd`]).
    BulkheadRbd,
    /// qemu-storage-daemon's rbd driver on a Ceph RBD image, driven by
    /// libblkio (the rbd suite only).
    QsdRbd,
    /// `bulkhead-blk` as [`Kind::Bulkhead`], the kit's client on split
    /// rings writing each request's chain (the packed suite only).
    BulkheadSplit,
    /// The same on packed rings (the packed suite only).
    BulkheadPacked,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 7] = [
        Kind::Bulkhead,
        Kind::Baseline,
        Kind::QsdIoUring,
        Kind::QsdThreads,
        Kind::Host,
        Kind::BulkheadLibblkio,
        Kind::QsdLibblkio,
    ];

    /// Measured unless `--targets` says otherwise (the baseline needs
    /// `--baseline-bin`; the libblkio pair is asked for by name).
    pub fn is_default(self) -> bool {
        !matches!(
            self,
            Kind::Baseline | Kind::BulkheadLibblkio | Kind::QsdLibblkio
        )
    }

    /// Driven by libblkio rather than the test kit's virtio-blk driver.
    pub fn is_libblkio(self) -> bool {
        matches!(
            self,
            Kind::BulkheadLibblkio | Kind::QsdLibblkio | Kind::BulkheadRbd | Kind::QsdRbd
        )
    }

    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Bulkhead => "bulkhead-blk",
            Kind::Baseline => "bulkhead-blk-before",
            Kind::QsdIoUring => "qsd-io_uring",
            Kind::QsdThreads => "qsd-threads",
            Kind::Host => "host-io_uring",
            Kind::BulkheadLibblkio => "bulkhead-blk+libblkio",
            Kind::QsdLibblkio => "qsd-io_uring+libblkio",
            Kind::BulkheadRbd => "bulkhead-blk-rbd",
            Kind::QsdRbd => "qsd-rbd",
            Kind::BulkheadSplit => "bulkhead-blk-split",
            Kind::BulkheadPacked => "bulkhead-blk-packed",
        }
    }

    /// Parses a name given by [`Kind::name`].
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// How to start `bulkhead-blk`.
pub struct Bulkhead<'a> {
    /// The binary.
    pub bin: &'a Path,
    /// Extra arguments after the bench's own.
    pub args: &'a [String],
    /// The binary of [`Kind::Baseline`].
    pub baseline: Option<&'a Path>,
    /// Busy-poll budget in µs: bulkhead-blk's `--poll-max-us`, and the same
    /// for qemu-storage-daemon's I/O thread (`poll-max-ns`), so both poll alike.
    pub poll_max_us: u32,
}

enum Client {
    Vu(Box<VuClient>),
    Host(HostClient),
    Libblkio(Box<LibblkioBench>),
}

/// A started target with its connected client.
pub struct Target {
    /// What it is.
    pub kind: Kind,
    /// Its command line (or a description for the host).
    pub config: String,
    client: Client,
    // Dropped after the client: the daemon sees the disconnect, then is killed.
    guard: Option<ChildGuard>,
}

fn quote(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Target {
    /// Starts `kind` on `image` with `queues` queues; sockets and logs go to `dir`.
    pub fn start(
        kind: Kind,
        bulkhead: &Bulkhead<'_>,
        image: &Path,
        dir: &Path,
        queues: usize,
        max_qd: usize,
    ) -> Result<Target> {
        let socket = dir.join(format!("{}-{queues}q.sock", kind.name()));
        let _ = std::fs::remove_file(&socket);
        let img = image.display().to_string();
        let sock = socket.display().to_string();
        let (program, args): (PathBuf, Vec<String>) = match kind {
            Kind::BulkheadRbd | Kind::QsdRbd => {
                return Err(format!("{} runs in the rbd suite only", kind.name()).into());
            }
            Kind::Host => {
                let client = HostClient::open(image, queues, max_qd)?;
                return Ok(Target {
                    kind,
                    config: format!(
                        "{queues} thread(s), one io_uring each (IORING_OP_READ/WRITE, buffered, \
                         one submit_and_wait per batch) on {img}"
                    ),
                    client: Client::Host(client),
                    guard: None,
                });
            }
            // Default flags, but for the image, socket, queues and engine:
            // libblkio's 256-entry rings fit bulkhead-blk's default ring size.
            Kind::BulkheadLibblkio => (
                bulkhead.bin.to_path_buf(),
                [
                    "--socket-path".into(),
                    sock,
                    "--image".into(),
                    img,
                    "--num-queues".into(),
                    queues.to_string(),
                    "--engine".into(),
                    "io-uring".into(),
                    "--poll-max-us".into(),
                    bulkhead.poll_max_us.to_string(),
                    // Every target serves the same image (qsd: locking=off).
                    "--no-lock".into(),
                ]
                .into_iter()
                .chain(bulkhead.args.iter().cloned())
                .collect(),
            ),
            Kind::Bulkhead | Kind::Baseline | Kind::BulkheadSplit | Kind::BulkheadPacked => (
                match kind {
                    Kind::Baseline => bulkhead
                        .baseline
                        .ok_or("bulkhead-blk-before needs --baseline-bin")?
                        .to_path_buf(),
                    _ => bulkhead.bin.to_path_buf(),
                },
                [
                    "--socket-path".into(),
                    sock,
                    "--image".into(),
                    img,
                    "--num-queues".into(),
                    queues.to_string(),
                    "--queue-size".into(),
                    "256".into(),
                    "--engine".into(),
                    "io-uring".into(),
                ]
                .into_iter()
                .chain(
                    // Every target serves the same image (qsd: locking=off);
                    // an earlier build (the baseline) may predate the lock.
                    (kind != Kind::Baseline)
                        .then(|| {
                            [
                                "--poll-max-us".into(),
                                bulkhead.poll_max_us.to_string(),
                                "--no-lock".into(),
                            ]
                        })
                        .into_iter()
                        .flatten(),
                )
                .chain(bulkhead.args.iter().cloned())
                .collect(),
            ),
            Kind::QsdIoUring | Kind::QsdThreads | Kind::QsdLibblkio => {
                let aio = if kind != Kind::QsdThreads {
                    "io_uring"
                } else {
                    "threads"
                };
                (
                    PathBuf::from("qemu-storage-daemon"),
                    vec![
                        "--object".into(),
                        format!(
                            "iothread,id=iot0,poll-max-ns={}",
                            u64::from(bulkhead.poll_max_us) * 1000
                        ),
                        "--blockdev".into(),
                        format!(
                            "driver=file,node-name=file0,filename={img},aio={aio},\
                             cache.direct=off,cache.no-flush=off,locking=off"
                        ),
                        "--export".into(),
                        format!(
                            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,\
                             addr.path={sock},writable=on,num-queues={queues},iothread=iot0"
                        ),
                    ],
                )
            }
        };
        Self::spawn(kind, program, args, &socket, dir, queues, max_qd)
    }

    /// Starts `kind` (`bulkhead-blk-rbd` or `qsd-rbd`) on the RBD image
    /// `pool/image` of the cluster `conf` names, as `client.admin`, with
    /// `queues` queues; both without a write cache (bulkhead-blk sets
    /// `rbd_cache=false`, qsd's `cache.direct=on` does the same).
    #[allow(clippy::too_many_arguments)]
    pub fn start_rbd(
        kind: Kind,
        bulkhead: &Bulkhead<'_>,
        conf: &Path,
        pool_image: &str,
        dir: &Path,
        queues: usize,
        max_qd: usize,
    ) -> Result<Target> {
        let socket = dir.join(format!("{}-{queues}q.sock", kind.name()));
        let _ = std::fs::remove_file(&socket);
        let sock = socket.display().to_string();
        let conf = conf.display().to_string();
        let (pool, image) = pool_image
            .split_once('/')
            .ok_or("rbd image is POOL/IMAGE")?;
        let (program, args): (PathBuf, Vec<String>) = match kind {
            Kind::BulkheadRbd => (
                bulkhead.bin.to_path_buf(),
                [
                    "--socket-path".into(),
                    sock,
                    "--image".into(),
                    format!("rbd:{pool_image}"),
                    "--ceph-conf".into(),
                    conf,
                    "--num-queues".into(),
                    queues.to_string(),
                    "--poll-max-us".into(),
                    bulkhead.poll_max_us.to_string(),
                ]
                .into_iter()
                .chain(bulkhead.args.iter().cloned())
                .collect(),
            ),
            Kind::QsdRbd => (
                PathBuf::from("qemu-storage-daemon"),
                vec![
                    "--object".into(),
                    format!(
                        "iothread,id=iot0,poll-max-ns={}",
                        u64::from(bulkhead.poll_max_us) * 1000
                    ),
                    "--blockdev".into(),
                    format!(
                        "driver=rbd,node-name=rbd0,pool={pool},image={image},conf={conf},\
                         user=admin,cache.direct=on,cache.no-flush=off"
                    ),
                    "--export".into(),
                    format!(
                        "type=vhost-user-blk,id=exp0,node-name=rbd0,addr.type=unix,\
                         addr.path={sock},writable=on,num-queues={queues},iothread=iot0"
                    ),
                ],
            ),
            _ => return Err(format!("{} is no rbd target", kind.name()).into()),
        };
        Self::spawn(kind, program, args, &socket, dir, queues, max_qd)
    }

    /// Runs `program args` (logging to `dir`), waits for `socket` and
    /// connects the client `kind` asks for.
    fn spawn(
        kind: Kind,
        program: PathBuf,
        args: Vec<String>,
        socket: &Path,
        dir: &Path,
        queues: usize,
        max_qd: usize,
    ) -> Result<Target> {
        let log_path = dir.join(format!("{}-{queues}q.log", kind.name()));
        let log = File::create(&log_path)?;
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut guard = ChildGuard::spawn(kind.name(), &mut cmd)?;
        if let Err(e) = wait_for_path(socket, Duration::from_secs(20)) {
            let status = guard.try_wait()?;
            return Err(format!(
                "{} did not start ({e}; exit status {status:?})",
                kind.name()
            )
            .into());
        }
        let connected = if kind.is_libblkio() {
            LibblkioBench::connect(socket, queues, max_qd).map(|c| Client::Libblkio(Box::new(c)))
        } else {
            let ring = match kind {
                Kind::BulkheadSplit => Ring::Split,
                Kind::BulkheadPacked => Ring::Packed,
                _ => Ring::SplitFixed,
            };
            VuClient::connect(socket, queues, max_qd, ring).map(|c| Client::Vu(Box::new(c)))
        };
        let client = connected.map_err(|e| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            format!(
                "{}: cannot connect: {e} ({:?}); its log:\n{log}",
                kind.name(),
                e.source()
            )
        })?;
        let mut all = vec![program.display().to_string()];
        all.extend(args);
        Ok(Target {
            kind,
            config: quote(&all),
            client,
            guard: Some(guard),
        })
    }

    /// One timed run.
    pub fn run(&mut self, spec: &Spec) -> Result<Sample> {
        match &mut self.client {
            Client::Vu(c) => c.run(spec),
            Client::Host(c) => c.run(spec),
            Client::Libblkio(c) => c.run(spec),
        }
    }

    /// Turns dirty-page logging on or off (the kit's vhost-user client only).
    pub fn set_dirty_log(&mut self, on: bool) -> Result<()> {
        match &mut self.client {
            Client::Vu(c) => c.set_dirty_log(on),
            _ => Err(format!("{}: no dirty log through this client", self.kind.name()).into()),
        }
    }

    /// Pages marked in the dirty log so far (the kit's client only; 0 otherwise).
    pub fn dirty_pages(&self) -> usize {
        match &self.client {
            Client::Vu(c) => c.dirty_pages(),
            _ => 0,
        }
    }

    /// The daemon's process id (None for the host).
    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref().map(|g| g.pid())
    }
}
