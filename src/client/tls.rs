//! The client side of TLS: a rustls configuration that trusts a CA file
//! and, for a node that checks client certificates (`ssl_verify_mode`),
//! presents one. Used by [`crate::client`] ([`super::ClientConfig::tls`])
//! and `webvac-bench --tls`.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where a TLS client's trust and identity come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of the CAs the server's certificate must chain to.
    pub ca_cert: Option<std::path::PathBuf>,
    /// PEM certificate chain to present, and its key (both or neither).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// TLS for [`super::Client`]: a rustls client configuration, and the name
/// every node's certificate must carry (`None`: each node's IP address,
/// which its certificate must then list).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<rustls_pki_types::ServerName<'static>>,
}

impl ClientTls {
    /// From a rustls configuration built by the caller.
    pub fn new(config: Arc<rustls::ClientConfig>) -> ClientTls {
        ClientTls {
            config,
            server_name: None,
        }
    }

    /// From PEM files ([`client_config`]).
    ///
    /// # Errors
    /// As [`client_config`].
    pub fn from_files(options: &TlsOptions) -> Result<ClientTls, String> {
        Ok(ClientTls::new(client_config(options)?))
    }

    /// Checks every node's certificate for `name` instead of its address.
    ///
    /// # Errors
    /// If `name` is not a DNS name or an IP address.
    pub fn with_server_name(mut self, name: &str) -> Result<ClientTls, String> {
        let name = rustls_pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| format!("{name:?}: {e}"))?;
        self.server_name = Some(name);
        Ok(self)
    }

    /// Completes a handshake with the node at `addr` over `tcp`.
    pub(crate) async fn connect(
        &self,
        addr: std::net::SocketAddr,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| rustls_pki_types::ServerName::IpAddress(addr.ip().into()));
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Two are equal when they share one rustls configuration and name.
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

/// A rustls client configuration from `options`: the server's certificate
/// is checked against `ca_cert` (and its name against the name connected
/// to), with rustls's protocol versions and suites.
///
/// # Errors
/// A file that cannot be read, or holds no certificate or key.
pub fn client_config(options: &TlsOptions) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca = options
        .ca_cert
        .as_deref()
        .ok_or("TLS needs the CA the server's certificate chains to")?;
    let roots = read_roots(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match &options.client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{}: {e}", cert.display()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A PEM reading error in words (rustls-pki-types shows a missing marker
/// as a list of bytes).
pub(crate) fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => "a PEM section has no end marker".into(),
        Error::IllegalSectionStart { .. } => "a PEM section starts badly".into(),
        Error::Base64Decode(_) => "a PEM section is not valid base64".into(),
        Error::NoItemsFound => "no PEM item of that kind in the file".into(),
        Error::Io(e) => e.to_string(),
        e => e.to_string(),
    }
}

/// Every certificate in a PEM file; at least one.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

/// The CAs of a PEM file, as roots to check certificates against.
pub(crate) fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    Ok(roots)
}
