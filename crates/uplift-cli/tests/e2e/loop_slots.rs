//! Slots on real block devices: two loop devices (`losetup`), each backed by
//! a file, are the device's slots a and b, and the real agent under the boot
//! simulator upgrades through a real server into the loop device. A block
//! device's size is not its metadata length (0), it must never be
//! truncated, and an image larger than it must be refused before a byte is
//! written, with both sizes in words the operator sees.
//!
//! Needs root and loop devices; it tries `modprobe loop` and makes missing
//! device nodes first. Without them it skips with a message, except under
//! CI, where it fails.

use crate::common;

use common::*;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use uplift_fleet::Device;
use uplift_proto::api::ServerEndpoint;
use uplift_proto::channel::AgentState;
use uplift_proto::{ErrorKind, SlotName};

const MIB: u64 = 1024 * 1024;
/// What slot b holds before the agent writes it: a pattern no image has.
const FILL: u8 = 0xa5;

/// A loop device attached to a file, detached when dropped (also when the
/// test fails).
struct LoopDevice {
    device: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find --show {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !device.exists() {
            // Attached, but no node appeared (no devtmpfs or udev): make it.
            make_node(&device);
        }
        Ok(Self { device })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let detached = Command::new("losetup")
            .arg("--detach")
            .arg(&self.device)
            .status();
        if !detached.is_ok_and(|s| s.success()) {
            eprintln!("could not detach {}", self.device.display());
        }
    }
}

/// `mknod /dev/loopN b 7 N` for a loop device node that is missing.
fn make_node(device: &Path) {
    let Some(n) = device
        .to_str()
        .and_then(|d| d.strip_prefix("/dev/loop"))
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return;
    };
    let _ = Command::new("mknod")
        .arg(device)
        .args(["b", "7", &n.to_string()])
        .status();
}

fn losetup_finds_a_free_device() -> Result<(), String> {
    let out = Command::new("losetup")
        .arg("--find")
        .output()
        .map_err(|e| format!("cannot run losetup: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Whether loop devices can be had here, after trying to make them
/// available: load the driver, make `/dev/loop-control` and the first
/// device nodes if the driver is there but the nodes are not.
fn loop_devices() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".to_owned());
    }
    if losetup_finds_a_free_device().is_ok() {
        return Ok(());
    }
    let _ = Command::new("modprobe").arg("loop").status();
    if !Path::new("/dev/loop-control").exists() {
        let _ = Command::new("mknod")
            .args(["/dev/loop-control", "c", "10", "237"])
            .status();
    }
    let devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
    if devices.lines().any(|l| l.trim() == "7 loop") {
        for n in 0..8 {
            let node = PathBuf::from(format!("/dev/loop{n}"));
            if !node.exists() {
                make_node(&node);
            }
        }
    }
    losetup_finds_a_free_device()
}

/// True if the test can go on; otherwise says why (and fails under CI).
fn usable() -> bool {
    match loop_devices() {
        Ok(()) => true,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("loop devices are needed under CI (run as root with the loop driver): {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: no loop devices here ({why}); run as root on a kernel with the loop driver");
            false
        }
    }
}

/// A file of `size` bytes: `image` at the start, then `fill`.
fn backing_file(path: &Path, size: u64, image: Option<&Path>, fill: u8) {
    let mut data = vec![fill; size as usize];
    if let Some(image) = image {
        let bytes = std::fs::read(image).unwrap();
        data[..bytes.len()].copy_from_slice(&bytes);
    }
    std::fs::write(path, data).unwrap();
}

/// The size of a block device, as the kernel gives it (a seek to its end).
fn device_size(device: &Path) -> u64 {
    std::fs::File::open(device)
        .unwrap()
        .seek(SeekFrom::End(0))
        .unwrap()
}

/// The first `len` bytes of `device`, read through the device.
fn read_device(device: &Path, len: u64) -> Vec<u8> {
    let mut data = vec![0u8; len as usize];
    std::fs::File::open(device)
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    data
}

/// A device and its slots: fields drop in order, so its processes stop
/// before the loop devices are detached, on success and failure alike.
struct OnLoops {
    device: Device,
    loops: [LoopDevice; 2],
}

/// Slot a (`slot_a` bytes, the factory image) and slot b (`slot_b` bytes of
/// [`FILL`]) on loop devices, and a device on them, powered on.
fn device_on_loops(fx: &Fixture, name: &str, slot_a: u64, slot_b: u64) -> OnLoops {
    let dir = fx.path(&format!("devices/{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (file_a, file_b) = (dir.join("backing-a.img"), dir.join("backing-b.img"));
    backing_file(&file_a, slot_a, Some(&fx.image_v1_0), 0);
    backing_file(&file_b, slot_b, None, FILL);
    let loops = [
        LoopDevice::attach(&file_a).expect("attach slot a"),
        LoopDevice::attach(&file_b).expect("attach slot b"),
    ];
    let endpoint: ServerEndpoint = fx.server.endpoint.clone();
    let mut device = Device::provision_on(
        &dir,
        &fx.spec(&format!("hw-{name}")),
        &endpoint,
        [loops[0].device.clone(), loops[1].device.clone()],
    )
    .expect("provision the device");
    device.start(&fx.bins).expect("start the device");
    OnLoops { device, loops }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_writes_the_release_image_onto_a_loop_device_slot() {
    if !usable() {
        return;
    }
    let fx = Fixture::start();
    // Partitions larger than the image, as on a real board.
    let slot_size = 4 * MIB;
    let OnLoops { device, loops } = &device_on_loops(&fx, "loops", slot_size, slot_size);
    let slot_b = loops[1].device.clone();
    fx.wait_enrolled(device).await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", None).await;
    let view = fx
        .wait_device(device, "1.1 committed on slot b", |d| {
            d.running_version == Some(v("1.1"))
                && d.state == Some(AgentState::Idle)
                && d.slot == Some(SlotName::B)
                && d.online
        })
        .await;
    assert_eq!(view.last_error, None);

    let image = std::fs::read(&fx.image_v1_1).unwrap();
    let written = read_device(&slot_b, slot_size);
    assert!(
        written[..image.len()] == image[..],
        "{} does not hold the 1.1 image",
        slot_b.display()
    );
    assert!(
        written[image.len()..].iter().all(|&b| b == FILL),
        "the rest of {} is untouched",
        slot_b.display()
    );
    // Never truncated or resized: the device and its backing file keep their size.
    assert_eq!(device_size(&slot_b), slot_size);
    assert_eq!(
        std::fs::metadata(fx.path("devices/loops/backing-b.img"))
            .unwrap()
            .len(),
        slot_size
    );
    // The running slot was only read.
    let factory = std::fs::read(&fx.image_v1_0).unwrap();
    assert!(read_device(&loops[0].device, factory.len() as u64) == factory);
    let boot = device.boot_state().unwrap();
    assert_eq!((boot.default_slot, boot.trial), (SlotName::B, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_larger_than_the_slot_device_is_refused_before_a_byte_is_written() {
    if !usable() {
        return;
    }
    let fx = Fixture::start();
    // Slot b is half the image's size.
    let slot_b_size = IMAGE_SIZE / 2;
    let OnLoops { device, loops } = &device_on_loops(&fx, "small", 4 * MIB, slot_b_size);
    let slot_b = loops[1].device.clone();
    fx.wait_enrolled(device).await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", None).await;
    let view = fx
        .wait_device(device, "the install to fail", |d| {
            d.state == Some(AgentState::Failed) && d.online
        })
        .await;
    let error = view.last_error.expect("the operator sees why");
    assert_eq!(error.kind, ErrorKind::SlotTooSmall, "{error}");
    for part in [
        slot_b.display().to_string(),
        format!("holds {slot_b_size} bytes"),
        format!("needs {IMAGE_SIZE} bytes"),
    ] {
        assert!(error.message.contains(&part), "{part:?} in {error}");
    }
    // Still on its slot, nothing switched, nothing written.
    assert_eq!(view.running_version, Some(v("1.0")));
    assert_eq!(view.slot, Some(SlotName::A));
    let boot = device.boot_state().unwrap();
    assert_eq!((boot.default_slot, boot.trial), (SlotName::A, None));
    assert!(
        read_device(&slot_b, slot_b_size).iter().all(|&b| b == FILL),
        "not a byte written to {}",
        slot_b.display()
    );
    assert_eq!(device_size(&slot_b), slot_b_size);

    // The device itself says so too (`uplift-agent status`, no network).
    let out = Command::new(&fx.bins.agent)
        .arg("--config")
        .arg(device.config_path())
        .arg("status")
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{status}");
    assert!(
        status.contains("last failure:     1.1 (slot_too_small)")
            && status.contains(&slot_b.display().to_string()),
        "{status}"
    );
}
