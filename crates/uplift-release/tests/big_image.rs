//! A 16 GiB image (sparse, so the test needs no 16 GiB of disk): its signed
//! manifest stays a few hundred bytes, whatever the image's size, and the
//! chunk list is in the binary index the manifest names by digest.

use uplift_release::build::{create_release, ReleaseDir, ReleaseOptions};
use uplift_release::index::RECORD_BYTES;
use uplift_release::ReleaseSigningKey;

const GIB: u64 = 1 << 30;

#[test]
fn a_16_gib_image_gets_a_small_manifest_and_a_binary_index() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.img");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(16 * GIB).unwrap();
    // Data islands between the holes, as a filesystem image has.
    for gib in 0..16u64 {
        let island: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> (gib % 7)) as u8)
            .collect();
        std::os::unix::fs::FileExt::write_all_at(&file, &island, gib * GIB + 4096).unwrap();
    }
    drop(file);

    let key = ReleaseSigningKey::from_seed([16; 32]);
    let options = ReleaseOptions::new("16.0".parse().unwrap(), "big-box".parse().unwrap());
    let summary = create_release(&image, &dir.path().join("release"), &options, &key).unwrap();
    assert_eq!(summary.image_size, 16 * GIB);

    let release = ReleaseDir::open(dir.path().join("release")).unwrap();
    let manifest_bytes = std::fs::metadata(release.manifest_path()).unwrap().len();
    assert!(
        manifest_bytes < 4096,
        "the signed manifest is {manifest_bytes} bytes for 16 GiB"
    );
    let signed = release.read_manifest().unwrap();
    let mut manifest = signed
        .verify(&[key.public_key()], time::OffsetDateTime::now_utc())
        .unwrap();
    let reference = manifest.chunk_index.expect("the list is in an index");
    assert!(manifest.needs_index());
    assert_eq!(reference.chunks, summary.chunk_count as u64);
    let index = release.read_index(&reference).unwrap();
    assert_eq!(index.len(), summary.chunk_count * RECORD_BYTES);
    manifest.attach_index(&index).unwrap();
    assert_eq!(manifest.image.size, 16 * GIB);
    let total: u64 = manifest.chunks.iter().map(|c| u64::from(c.size)).sum();
    assert_eq!(total, 16 * GIB, "the index covers the image exactly");
    // The holes are one chunk stored once, however often they repeat.
    assert!(summary.unique_chunks < summary.chunk_count / 100);

    // An index that is not the one signed is refused.
    let mut altered = index.clone();
    altered[7] ^= 1;
    let mut again = signed.parse_unverified().unwrap();
    assert!(again.attach_index(&altered).is_err());
}
