//! Peer TLS (`cluster.tls_cert`, `tls_key`, `tls_ca`): every connection
//! between members is TLS with a certificate on both ends, each checked
//! against the cluster's CA and the dialler checking the name it dialled.
//! The challenge–response on the cluster secret then runs inside it, so a
//! peer must hold both a certificate of the cluster's CA and the secret.
//! `refresh_certs` and SIGHUP read the three files again.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use crate::client::tls::{pem_error, read_certs, read_roots};
use crate::cluster::transport::Connector;
use crate::config::ClusterConfig;

/// A member's peer TLS: the configurations it accepts and dials with.
pub struct PeerTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    server: parking_lot::RwLock<Arc<ServerConfig>>,
    client: parking_lot::RwLock<Arc<ClientConfig>>,
}

impl PeerTls {
    /// The peer TLS `c` asks for; `None` when it sets none.
    ///
    /// # Errors
    /// A file that cannot be read, or a key that is not the certificate's.
    pub fn of(c: &ClusterConfig) -> Result<Option<Arc<PeerTls>>, String> {
        let (Some(cert), Some(key), Some(ca)) = (&c.tls_cert, &c.tls_key, &c.tls_ca) else {
            return Ok(None);
        };
        let (server, client) = build(cert, key, ca)?;
        Ok(Some(Arc::new(PeerTls {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server: parking_lot::RwLock::new(server),
            client: parking_lot::RwLock::new(client),
        })))
    }

    /// Reads the certificate, key and CA again; on any error the ones in
    /// use stay.
    ///
    /// # Errors
    /// As [`PeerTls::of`].
    pub fn refresh(&self) -> Result<(), String> {
        let (server, client) = build(&self.cert, &self.key, &self.ca)?;
        *self.server.write() = server;
        *self.client.write() = client;
        Ok(())
    }

    /// The server side of a peer connection's TLS handshake (the caller
    /// bounds the wait).
    ///
    /// # Errors
    /// The handshake failed: no certificate, one not of the cluster's CA,
    /// or not TLS at all.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let config = self.server.read().clone();
        tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
    }
}

/// The server and client configurations of one certificate, key and CA.
fn build(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), String> {
    fn named(path: &Path, e: impl std::fmt::Display) -> String {
        format!("{}: {e}", path.display())
    }
    let chain = read_certs(cert).map_err(|e| named(cert, e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| named(key, pem_error(e)))?;
    let roots = Arc::new(read_roots(ca).map_err(|e| named(ca, e))?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| named(ca, e))?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key_der.clone_key())
        .map_err(|e| named(cert, e))?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| named(cert, e))?;
    Ok((Arc::new(server), Arc::new(client)))
}

/// Dials members over TLS ([`PeerTls`]), checking each one's certificate
/// for the host of its peer address.
pub struct TlsPeerConnector(pub Arc<PeerTls>);

impl Connector for TlsPeerConnector {
    type Stream = tokio_rustls::client::TlsStream<TcpStream>;

    fn connect(
        &self,
        addr: &str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Self::Stream>> + Send + 'static>> {
        let config = self.0.client.read().clone();
        let addr = addr.to_owned();
        Box::pin(async move {
            let name = ServerName::try_from(host_of(&addr).to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
        })
    }
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_host_of_a_peer_address() {
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("node2.cache.internal:7000"), "node2.cache.internal");
    }
}
