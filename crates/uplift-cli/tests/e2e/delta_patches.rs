//! Releases built with `--delta-from`: a device that runs the older
//! release downloads patches against chunks it already holds instead of
//! whole chunks; a device that does not hold the bases, or a patch damaged
//! on the server, falls back to whole chunks; every device ends with exactly
//! the new image.

use crate::common;

use common::*;
use uplift_fleet::Device;
use uplift_proto::channel::AgentState;
use uplift_proto::SlotName;
use uplift_release::build::{create_release, ReleaseOptions};

/// A package list: the kind of text OS images carry and change a little.
fn package_list(lines: std::ops::Range<u64>, bumped_every: u64) -> Vec<u8> {
    let mut out = String::new();
    for i in lines {
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let bump = u64::from(bumped_every > 0 && i % bumped_every == 0);
        out.push_str(&format!(
            "Package: pkg-{h:016x}\nVersion: {}.{}-{}\nDepends: lib{:x} (>= {})\nSize: {}\n\n",
            h % 7,
            h % 101,
            1 + bump,
            h >> 44,
            h % 13,
            h % 99_991
        ));
    }
    let mut bytes = out.into_bytes();
    bytes.resize(IMAGE_SIZE as usize, 0);
    bytes
}

/// Writes the 1.0 and 1.1 images (1.1: a new header shifts everything and
/// every 40th package has a new version, so nearly every chunk changes) and
/// builds 1.1 against 1.0's image; returns the release directory.
async fn release_with_patches(fx: &Fixture) -> std::path::PathBuf {
    std::fs::write(&fx.image_v1_0, package_list(0..24_000, 0)).unwrap();
    let mut v1_1 = b"Origin: Uplift test mirror, refreshed\n\n".to_vec();
    v1_1.extend_from_slice(&package_list(0..24_000, 40));
    v1_1.truncate(IMAGE_SIZE as usize);
    std::fs::write(&fx.image_v1_1, v1_1).unwrap();
    let out = fx.path("releases/1.1-delta");
    let mut options = ReleaseOptions::new(v("1.1"), DEVICE_TYPE.parse().unwrap());
    options.delta_from = Some(fx.image_v1_0.clone());
    let summary = create_release(&fx.image_v1_1, &out, &options, &fx.key).unwrap();
    let manifest = &summary.manifest;
    assert!(
        manifest.patches.len() * 10 >= manifest.chunks.len() * 8,
        "{} patches for {} chunks",
        manifest.patches.len(),
        manifest.chunks.len()
    );
    assert!(
        manifest.patch_bytes() * 4 < manifest.stored_bytes(),
        "patches {} bytes, whole chunks {}",
        manifest.patch_bytes(),
        manifest.stored_bytes()
    );
    fx.client.upload_release(&out, |_| {}).await.unwrap();
    out
}

async fn sent_while(fx: &Fixture, devices: &[&Device], version: &str) -> u64 {
    let before = fx.client.stats().await.unwrap().bytes_sent;
    let ids = devices.iter().map(|d| id_of(d)).collect();
    fx.rollout(version, Some(ids)).await;
    for device in devices {
        fx.wait_device(device, "the upgrade to 1.1", |d| {
            d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle)
        })
        .await;
    }
    fx.client.stats().await.unwrap().bytes_sent - before
}

fn assert_holds_new_image(fx: &Fixture, device: &Device) {
    assert_eq!(device.boot_state().unwrap().default_slot, SlotName::B);
    assert_eq!(
        sha256_file(&device.slot_path(SlotName::B)),
        sha256_file(&fx.image_v1_1),
        "slot B holds exactly release 1.1 ({})",
        device.dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_running_the_old_release_downloads_patches_one_without_its_chunks_whole_chunks() {
    let fx = Fixture::start();
    let dir = release_with_patches(&fx).await;
    let (_, manifest) = uplift_release::ReleaseDir::open(&dir)
        .unwrap()
        .read_release()
        .unwrap();

    let holder = fx.device("holder", fx.spec("hw-holder"));
    // Same version label, but a factory image that shares nothing with 1.0.
    let stranger_image = fx.path("images/unrelated.img");
    uplift_fleet::write_image(&stranger_image, IMAGE_SIZE, 99).unwrap();
    let mut stranger = Device::provision(
        &fx.path("devices/stranger"),
        &fx.spec("hw-stranger"),
        &fx.server.endpoint,
        &stranger_image,
    )
    .unwrap();
    stranger.start(&fx.bins).unwrap();
    fx.wait_enrolled(&holder).await;
    fx.wait_enrolled(&stranger).await;

    let by_holder = sent_while(&fx, &[&holder], "1.1").await;
    assert_holds_new_image(&fx, &holder);
    let log = holder.log();
    assert!(
        !log.contains("patched=0") && log.contains("patched="),
        "the holder applied patches:\n{log}"
    );
    assert!(
        by_holder * 3 < manifest.stored_bytes(),
        "the holder was sent {by_holder} bytes, the whole chunks are {}",
        manifest.stored_bytes()
    );

    eprintln!(
        "holder was sent {by_holder} bytes; whole chunks {}; patches {}",
        manifest.stored_bytes(),
        manifest.patch_bytes()
    );
    let by_stranger = sent_while(&fx, &[&stranger], "1.1").await;
    assert_holds_new_image(&fx, &stranger);
    assert!(
        stranger.log().contains("patched=0"),
        "without the bases nothing is patched:\n{}",
        stranger.log()
    );
    assert!(
        by_stranger >= manifest.stored_bytes(),
        "the stranger fetched whole chunks: {by_stranger} bytes sent, {} stored",
        manifest.stored_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_damaged_on_the_server_is_set_aside_and_its_chunk_fetched_whole() {
    let fx = Fixture::start();
    let dir = release_with_patches(&fx).await;
    let manifest = uplift_release::ReleaseDir::open(&dir)
        .unwrap()
        .read_release()
        .unwrap()
        .1;
    let damaged = &manifest.patches[manifest.patches.len() / 2];
    let hex = damaged.hash.to_hex();
    let file = fx
        .server
        .dir
        .join("patches")
        .join(&hex[..2])
        .join(format!("{hex}.zst"));
    let mut bytes = std::fs::read(&file).expect("the server stores the patch");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5A;
    std::fs::write(&file, bytes).unwrap();
    // The operator's scrub finds it before any device does.
    let (code, said) = server_check(&fx);
    assert!(
        code != Some(0) && said.contains(&hex),
        "`uplift-server check` names the damaged patch:\n{said}"
    );

    let device = fx.device("holder", fx.spec("hw-holder"));
    fx.wait_enrolled(&device).await;
    sent_while(&fx, &[&device], "1.1").await;
    assert_holds_new_image(&fx, &device);
    let log = device.log();
    assert!(
        log.contains("fetching those chunks whole instead"),
        "the device says it fell back:\n{log}"
    );
    assert!(
        fx.server.log_tail(200).contains(&hex),
        "the server log names the damaged patch"
    );
    // Uploading the release again repairs it.
    fx.client.upload_release(&dir, |_| {}).await.unwrap();
    let (code, said) = server_check(&fx);
    assert_eq!(code, Some(0), "clean after the repair:\n{said}");
}
