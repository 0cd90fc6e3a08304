//! Certificates for the TLS tests, made fresh by rcgen for each test (a CA,
//! a server certificate for `localhost` and 127.0.0.1, client certificates
//! good, expired and from another CA), and a blocking rustls client.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{Client, fresh_temp_dir};

/// A CA that signs certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub pem: String,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), for a server
    /// or a client, valid now unless `expired`. Returns (certificate PEM,
    /// key PEM).
    pub fn sign(&self, names: &[&str], client: bool, expired: bool) -> (String, String) {
        self.sign_for(
            names,
            &[if client {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            }],
            expired,
        )
    }

    /// A cluster member's certificate: it serves and dials, so it is for
    /// both ends. Returns (certificate PEM, key PEM).
    pub fn sign_peer(&self, names: &[&str]) -> (String, String) {
        self.sign_for(
            names,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            false,
        )
    }

    fn sign_for(
        &self,
        names: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
        expired: bool,
    ) -> (String, String) {
        let client = usages == [ExtendedKeyUsagePurpose::ClientAuth];
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, if client { "client" } else { "server" });
        params.extended_key_usages = usages.to_vec();
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A directory of PEM files for one test: `ca.pem`, `server.pem` and
/// `server.key`, each readable by its owner only.
pub struct Files {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Files {
    /// A new CA and a server certificate for `localhost` and 127.0.0.1.
    pub fn new(test: &str) -> Files {
        let dir = fresh_temp_dir(&format!("webvac-tls-{test}"));
        let ca = Ca::new("webvac test CA");
        write(&dir.join("ca.pem"), &ca.pem);
        let (cert, key) = ca.sign(&["localhost", "127.0.0.1"], false, false);
        write(&dir.join("server.pem"), &cert);
        write(&dir.join("server.key"), &key);
        Files { dir, ca }
    }

    /// `name` in the directory, as a string for a command line.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `-Z -o ssl_chain_cert=…,ssl_key=…` and any more `-o` options.
    pub fn server_args(&self, more: &str) -> Vec<String> {
        let mut o = format!(
            "ssl_chain_cert={},ssl_key={}",
            self.path("server.pem"),
            self.path("server.key")
        );
        if !more.is_empty() {
            o.push(',');
            o.push_str(more);
        }
        vec!["-Z".into(), "-o".into(), o]
    }
}

/// Writes `text` to `path`, readable by its owner only.
pub fn write(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Certificates of a PEM text.
pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

/// A rustls client configuration trusting `ca_pem`, presenting `identity`
/// (certificate PEM, key PEM) if given, offering only TLS 1.2 if `tls12`.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&(String, String)>,
    tls12: bool,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem) {
        roots.add(cert).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certs(cert),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Connects to `addr` over TLS as `name` and completes the handshake
/// (bounded): the error says why it failed.
pub fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<Client, String> {
    connect_raw(addr, config, name).map(Client::from_tls)
}

/// [`connect`], as the rustls stream itself.
pub fn connect_raw(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let sock =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| e.to_string())?;
    }
    // A TLS 1.3 server checks a client certificate after the client's
    // last handshake message: a refusal shows up on the first exchange.
    Ok(stream)
}
