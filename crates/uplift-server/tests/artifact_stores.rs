//! One conformance suite for both chunk stores: the local directory and S3
//! object storage, the latter against a real S3-compatible server
//! (`uplift-s3-test-server`, s3s-fs) in its own process over a real socket.
//! What the server relies on holds for both: reads bounded by a limit,
//! fingerprints that change when the stored bytes do, quarantine only of
//! the version that was read, damaged chunks never served, and (S3 only)
//! presigned URLs that fetch exactly the checked object.

use bytes::Bytes;
use std::sync::Arc;
use uplift_proto::ChunkHash;
use uplift_s3_test_server::S3Server;
use uplift_server::artifacts::{ArtifactStore, Stores};
use uplift_server::chunks::{ChunkError, Chunks};
use uplift_server::config::{ArtifactsConfig, Backend};
use uplift_server::store::{SqliteStore, Store};

/// Each backend's stores, and what keeps them alive.
struct Backends {
    _dir: tempfile::TempDir,
    _s3: S3Server,
    local: Stores,
    s3: Stores,
    s3_direct: Stores,
}

async fn backends() -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3")).expect("test S3 server starts");
    let config = |direct: bool, prefix: &str| {
        let table: toml::Table = toml::from_str(&s3.artifacts_toml(direct)).unwrap();
        let mut config: ArtifactsConfig = table["artifacts"].clone().try_into().unwrap();
        config.prefix = prefix.into();
        config.check().unwrap();
        config
    };
    let local = Stores::open(&ArtifactsConfig::default(), &dir.path().join("data")).unwrap();
    let (plain, direct) = (config(false, "plain"), config(true, "direct"));
    assert_eq!(plain.backend, Backend::S3);
    Backends {
        s3: Stores::open(&plain, dir.path()).unwrap(),
        s3_direct: Stores::open(&direct, dir.path()).unwrap(),
        local,
        _s3: s3,
        _dir: dir,
    }
}

fn named(data: &[u8]) -> (ChunkHash, Bytes) {
    let stored = uplift_release::encode_chunk(data).unwrap();
    (uplift_release::sha256(data), Bytes::from(stored))
}

async fn conformance(name: &str, store: &dyn ArtifactStore) {
    let hash: ChunkHash = "ab".repeat(32).parse().unwrap();
    let other: ChunkHash = "cd".repeat(32).parse().unwrap();
    assert!(
        store.read_all(&hash, 100).await.unwrap().is_none(),
        "{name}"
    );
    assert!(store.current(&hash).await.unwrap().is_none(), "{name}");
    store
        .put(&hash, Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    // Longer than the limit: read one byte past it, not whole.
    let (cut, _) = store.read_all(&hash, 4).await.unwrap().unwrap();
    assert_eq!(cut.as_ref(), b"01234", "{name}");
    let (all, first) = store.read_all(&hash, 100).await.unwrap().unwrap();
    assert_eq!(all.as_ref(), b"0123456789", "{name}");
    assert_eq!(store.current(&hash).await.unwrap(), Some(first), "{name}");
    // In order, the missing one as None.
    let many = store.read_many(&[other, hash], 100).await;
    assert!(matches!(many[0], Ok(None)), "{name}");
    assert_eq!(
        many[1].as_ref().unwrap().as_ref().unwrap().0.as_ref(),
        b"0123456789"
    );
    // Rewritten with the same length: another fingerprint.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    store
        .put(&hash, Bytes::from_static(b"01234x6789"))
        .await
        .unwrap();
    let (_, second) = store.read_all(&hash, 100).await.unwrap().unwrap();
    assert_ne!(first, second, "{name}: a rewrite changes the fingerprint");
    assert!(
        !store.quarantine(&hash, &first).await.unwrap(),
        "{name}: what changed since it was read (a repair) is not set aside"
    );
    assert!(store.read_all(&hash, 100).await.unwrap().is_some());
    assert!(store.quarantine(&hash, &second).await.unwrap(), "{name}");
    assert!(
        store.read_all(&hash, 100).await.unwrap().is_none(),
        "{name}"
    );
    assert!(!store.quarantine(&hash, &second).await.unwrap(), "{name}");
}

#[tokio::test]
async fn both_backends_store_read_fingerprint_and_quarantine_alike() {
    let b = backends().await;
    conformance("local", b.local.chunks.as_ref()).await;
    conformance("s3", b.s3.chunks.as_ref()).await;
}

/// Through the checking layer the server serves from: a damaged chunk is
/// never served (nor handed out as a URL), set aside, and repaired by an
/// upload of the good bytes.
async fn damage_handling(name: &str, stores: &Stores, db: Arc<dyn Store>) -> Option<url::Url> {
    let indexes = Arc::new(Chunks::indexes(stores.indexes.clone(), db.clone()));
    let chunks = Chunks::new(stores.chunks.clone(), db, indexes);
    let (hash, good) = named(&b"a chunk of an image, a chunk of an image".repeat(100));
    let (_, bad) = named(b"other bytes entirely");
    stores.chunks.put(&hash, bad).await.unwrap();
    let err = chunks.read_verified(&hash).await.unwrap_err();
    assert!(matches!(err, ChunkError::Damaged { .. }), "{name}: {err}");
    assert!(
        stores
            .chunks
            .read_all(&hash, 1 << 20)
            .await
            .unwrap()
            .is_none(),
        "{name}: the damaged copy is set aside"
    );
    let offers_urls = stores.chunks.direct_url(&hash).await.unwrap().is_some();
    if offers_urls {
        let err = chunks.direct_url(&hash).await.unwrap_err();
        assert!(matches!(err, ChunkError::Damaged { .. }), "{name}: {err}");
    }
    chunks.store(&hash, good.clone()).await.unwrap();
    assert_eq!(
        chunks.read_verified(&hash).await.unwrap(),
        Some(good.clone())
    );
    if offers_urls {
        // Checked good, then overwritten behind the server's back: the
        // stored version is no longer the one checked, so no URL for it.
        assert!(chunks.direct_url(&hash).await.unwrap().is_some());
        let (_, bad) = named(b"overwritten in the bucket");
        stores.chunks.put(&hash, bad).await.unwrap();
        let err = chunks.direct_url(&hash).await.unwrap_err();
        assert!(matches!(err, ChunkError::Damaged { .. }), "{name}: {err}");
        chunks.store(&hash, good).await.unwrap();
    }
    chunks.direct_url(&hash).await.unwrap()
}

#[tokio::test]
async fn damaged_chunks_are_never_served_by_either_backend_and_urls_fetch_checked_objects() {
    let b = backends().await;
    let dir = tempfile::tempdir().unwrap();
    let db: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("u.db")).await.unwrap());
    assert_eq!(damage_handling("local", &b.local, db.clone()).await, None);
    assert_eq!(damage_handling("s3", &b.s3, db.clone()).await, None);
    let url = damage_handling("s3 direct", &b.s3_direct, db)
        .await
        .expect("a presigned URL with direct downloads on");
    // The URL alone (no credentials) fetches the good bytes from the store.
    let (_, good) = named(&b"a chunk of an image, a chunk of an image".repeat(100));
    let got = reqwest::get(url.clone()).await.unwrap();
    assert_eq!(got.status(), 200, "{url}");
    assert_eq!(got.bytes().await.unwrap(), good);
    // A tampered signature is refused by the store.
    let mut forged = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "X-Amz-Signature" {
                // Same length and alphabet, one digit changed.
                let flipped = if v.ends_with('0') { '1' } else { '0' };
                format!("{}{flipped}", &v[..v.len() - 1])
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(pairs);
    assert_eq!(reqwest::get(forged).await.unwrap().status(), 403);
}
