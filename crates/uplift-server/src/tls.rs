//! TLS for the server: a configured certificate, or a private CA and server
//! certificate generated on first start and kept in `<data_dir>/tls/`.
//! Agents and the CLI trust `ca.pem`; its fingerprint is printed at start so
//! an operator can pin it.

use crate::config::TlsConfig;
use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug)]
pub struct TlsMaterial {
    pub server_config: Arc<rustls::ServerConfig>,
    /// The CA clients should trust (the generated CA, or the configured chain's last cert).
    pub ca_file: PathBuf,
    pub ca_fingerprint: String,
}

pub fn load_or_generate(tls_dir: &Path, cfg: &TlsConfig) -> anyhow::Result<TlsMaterial> {
    let (cert_file, key_file, ca_file) = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone(), cert.clone()),
        (None, None) => {
            generate_if_missing(tls_dir, &cfg.hostnames)?;
            (tls_dir.join("server.pem"), tls_dir.join("server.key"), tls_dir.join("ca.pem"))
        }
        _ => bail!("tls.cert_file and tls.key_file must be given together (or neither, to use a generated certificate)"),
    };
    let chain = read_certs(&cert_file)?;
    let key = read_key(&key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("building TLS configuration")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "certificate {} does not match key {}",
                cert_file.display(),
                key_file.display()
            )
        })?;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let ca = read_certs(&ca_file)?;
    let ca_der = ca.last().context("CA file holds no certificate")?;
    Ok(TlsMaterial {
        server_config: Arc::new(server_config),
        ca_file,
        ca_fingerprint: fingerprint(ca_der),
    })
}

fn fingerprint(der: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(der.as_ref());
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn generate_if_missing(dir: &Path, hostnames: &[String]) -> anyhow::Result<()> {
    if dir.join("server.pem").exists()
        && dir.join("server.key").exists()
        && dir.join("ca.pem").exists()
    {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = rcgen::KeyPair::generate().context("generating CA key")?;
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Uplift server CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key).context("self-signing CA")?;

    let server_key = rcgen::KeyPair::generate().context("generating server key")?;
    let mut params =
        rcgen::CertificateParams::new(hostnames.to_vec()).context("server certificate names")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "uplift-server");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let server_cert = params
        .signed_by(&server_key, &ca_cert, &ca_key)
        .context("signing server certificate")?;

    write_private(&dir.join("ca.key"), &ca_key.serialize_pem())?;
    write_private(&dir.join("server.key"), &server_key.serialize_pem())?;
    write_public(
        &dir.join("server.pem"),
        &(server_cert.pem() + &ca_cert.pem()),
    )?;
    // ca.pem last: its presence marks the set as complete.
    write_public(&dir.join("ca.pem"), &ca_cert.pem())?;
    Ok(())
}

/// Writes a secret readable by the owner only, crash-safely: a crash never
/// leaves an empty token or key file that would stop the server starting.
pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    uplift_files::replace_file(path, contents.as_bytes(), uplift_files::Access::OwnerOnly)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes a certificate, crash-safely.
fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    uplift_files::replace_file(path, contents.as_bytes(), uplift_files::Access::Public)
        .with_context(|| format!("writing {}", path.display()))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading certificate {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading private key {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            anyhow::anyhow!("{} holds no PEM private key", path.display())
        }
        e => anyhow::Error::new(e).context(format!("parsing private key {}", path.display())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_reads_back_and_wrong_files_say_what_they_lack() {
        let dir = tempfile::tempdir().unwrap();
        generate_if_missing(dir.path(), &["localhost".to_owned()]).unwrap();
        let pems: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let certs: Vec<&PathBuf> = pems.iter().filter(|p| read_certs(p).is_ok()).collect();
        let keys: Vec<&PathBuf> = pems.iter().filter(|p| read_key(p).is_ok()).collect();
        assert!(!certs.is_empty() && !keys.is_empty(), "{pems:?}");

        let err = read_key(certs[0]).unwrap_err();
        assert!(
            format!("{err:#}").contains("holds no PEM private key"),
            "{err:#}"
        );
        let err = read_certs(keys[0]).unwrap_err();
        assert!(
            format!("{err:#}").contains("holds no PEM certificate"),
            "{err:#}"
        );
        let torn = dir.path().join("torn.pem");
        std::fs::write(&torn, "-----BEGIN PRIVATE KEY-----\nnot base64!\n").unwrap();
        let err = read_key(&torn).unwrap_err();
        assert!(
            format!("{err:#}").contains("parsing private key"),
            "{err:#}"
        );
    }
}
