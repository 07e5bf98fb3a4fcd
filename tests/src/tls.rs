//! A private CA and a server certificate it signs for 127.0.0.1: what a
//! TLS receiver of the tests (wss, https) presents, and the CA file vmd is
//! given (`--stream-ca-file`).

use std::path::PathBuf;
use std::sync::Arc;

/// The CA's PEM file (in `dir`) and an acceptor presenting the server's
/// certificate.
pub fn private_ca(dir: &std::path::Path) -> (PathBuf, tokio_rustls::TlsAcceptor) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    (ca_file, tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}
