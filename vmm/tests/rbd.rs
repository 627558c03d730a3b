//! Linux under `bulkhead-vmm` on a disk that lives on Ceph RBD: the test
//! kit's one-node cluster runs on this host, `bulkhead-blk --image
//! rbd:rbd/vmmdisk` serves it to a Linux guest of `bulkhead-vmm`, and the
//! guest runs fio verify from both vCPUs, writes a marker and discards a
//! whole object; `rbd export` then holds the marker byte for byte and
//! zeroes where the guest discarded.
//!
//! Where this machine's KVM cannot run Linux the VMM, its daemons and the
//! guest run inside the nested host (tests/src/nested.rs), the cluster
//! stays here: it listens on one of this host's own addresses and the
//! nested host reaches it over QEMU's user network, with a client
//! configuration and the keyring carried in.

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod linux;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bulkhead_tests::ceph::{Cluster, needs_ceph};
use bulkhead_tests::nested::{self, Lane, NestedHost};
use bulkhead_tests::skip::{SkipReason, skip, skip_if};
use linux::{Options, Vm};

const TEST: &str = "linux_under_bulkhead_vmm_runs_fio_verify_on_an_rbd_image";
const IMAGE: &str = "vmmdisk";
const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;
/// Where the guest writes its marker, and how much.
const MARKER_AT: u64 = 40 * MIB;
const MARKER_LEN: usize = MIB as usize;
const MARKER_LINE: &str = "BULKHEAD-RBD-UNDER-BULKHEAD-VMM";
/// A whole RBD object (4 MiB) the guest fills, then discards.
const DISCARD_AT: u64 = 44 * MIB;
const DISCARD_LEN: u64 = 4 * MIB;
/// Inside the nested host: the client configuration naming this host's
/// cluster (set only there; the test body then runs against it).
const CONF_ENV: &str = "BULKHEAD_TEST_CEPH_CONF";
const NESTED_CONF: &str = "/nested/ceph/ceph.conf";
const NESTED_KEYRING: &str = "/nested/ceph/keyring";

/// What the guest's marker region holds: `MARKER_LINE` lines, cut to size.
fn marker() -> Vec<u8> {
    format!("{MARKER_LINE}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(MARKER_LEN)
        .collect()
}

/// This host's first global IPv4 address (QEMU's user network connects to
/// it from this host; 127.0.0.1 inside the nested host is its own).
fn host_ipv4() -> Option<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let inet = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
        inet.split('/').next()?.parse().ok()
    })
}

/// The guest's side: boots Linux under `bulkhead-vmm` with its disk on
/// the RBD image the configuration file `conf` reaches.
fn guest_on_rbd(conf: PathBuf) {
    let opts = Options {
        cpus: 2,
        blk_queues: 2,
        rbd: Some((format!("rbd/{IMAGE}"), conf)),
        ..Options::default()
    };
    let sectors = IMAGE_SIZE / 512;
    let script = format!(
        r#"
check vda_present test -b /dev/vda
expect_eq vda_sectors "$(cat /sys/block/vda/size)" {sectors}
check fio_verify fio --name=verify --filename=/dev/vda --offset=0 --size=8M \
  --offset_increment=8M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
  --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1 \
  --verify=crc32c --verify_fatal=1 --group_reporting
yes {MARKER_LINE} | head -c {MARKER_LEN} >/root/marker
check marker_write dd if=/root/marker of=/dev/vda bs=1M seek={marker_mib} oflag=direct
check marker_read dd if=/dev/vda of=/root/back bs=1M skip={marker_mib} count=1 iflag=direct
check marker_same cmp /root/marker /root/back
check fill_object dd if=/root/marker of=/dev/vda bs=1M seek={discard_mib} count=4 oflag=direct
check discard blkdiscard -o {DISCARD_AT} -l {DISCARD_LEN} /dev/vda
check discard_read dd if=/dev/vda of=/root/gone bs=1M skip={discard_mib} count=4 iflag=direct
head -c {DISCARD_LEN} /dev/zero >/root/zeros
check discard_zeroes cmp /root/zeros /root/gone
sync
"#,
        marker_mib = MARKER_AT / MIB,
        discard_mib = DISCARD_AT / MIB,
    );
    let vm = Vm::boot(opts, |_| script);
    let boot = vm.finish();
    boot.assert_passed("Linux under bulkhead-vmm on an RBD image", Vec::new());
}

#[test]
fn linux_under_bulkhead_vmm_runs_fio_verify_on_an_rbd_image() {
    if let Ok(conf) = std::env::var(CONF_ENV) {
        // Inside the nested host, against this test's cluster outside.
        guest_on_rbd(PathBuf::from(conf));
        return;
    }
    if skip_if(TEST, needs_ceph()) {
        return;
    }
    let ip = match nested::lane() {
        Lane::Unavailable(why) => {
            skip(TEST, why.clone());
            return;
        }
        Lane::Here => Ipv4Addr::LOCALHOST,
        Lane::Nested => match host_ipv4() {
            Some(ip) => ip,
            None => {
                let why = "no global IPv4 address for the nested host to reach the cluster at";
                skip(TEST, SkipReason::Unsupported(why.into()));
                return;
            }
        },
    };
    let cluster = Cluster::start_on(ip).expect("start the Ceph cluster");
    cluster
        .create_image(IMAGE, IMAGE_SIZE)
        .expect("create the image");
    if ip.is_loopback() {
        // This machine's KVM runs Linux.
        guest_on_rbd(cluster.conf());
    } else {
        let conf = cluster.dir().join("nested-client.conf");
        std::fs::write(&conf, cluster.client_conf(NESTED_KEYRING)).unwrap();
        let keyring = cluster.keyring();
        nested::delegate_to(TEST, |script| {
            // One CPU: on two, librados' busy threads beside the guest's
            // vCPUs made TCG's SVM lose the guest to a triple fault in 4 of
            // 5 runs (none in 3 with a local image and the same network
            // traffic, none in 3 on one CPU).
            NestedHost::new(script)
                .timeout(Duration::from_secs(600))
                .cpus(1)
                .user_net()
                .carry(&conf, NESTED_CONF)
                .carry(&keyring, NESTED_KEYRING)
                .env(CONF_ENV, NESTED_CONF)
        });
    }
    let image = cluster.export(IMAGE).expect("rbd export");
    let at = MARKER_AT as usize;
    assert!(
        image[at..at + MARKER_LEN] == marker()[..],
        "rbd export does not hold the guest's marker at {MARKER_AT}"
    );
    let d = DISCARD_AT as usize;
    assert!(
        image[d..d + DISCARD_LEN as usize].iter().all(|&b| b == 0),
        "rbd export is not zero where the guest discarded"
    );
}
