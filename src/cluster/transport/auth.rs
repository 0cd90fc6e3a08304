//! Peer authentication: before a single peer message is read, each side of
//! a connection proves that it holds the cluster's key.
//!
//! ```text
//!  dialler                                   acceptor
//!    Hello { wire_version, node_id, nonce_d } ──▶
//!                                            ◀── Challenge { node_id, nonce_a, proof_a }
//!    checks proof_a (else: "not a member")
//!    Proof { proof_d, layout, layout_text } ──▶
//!                                                checks proof_d (else: Refused, nothing
//!                                                more), then the layout
//!                                            ◀── Welcome | Refused
//! ```
//!
//! A proof is BLAKE3 keyed by the cluster key over the role and the whole
//! transcript: the wire version, both node ids and both nonces. Each side
//! draws a fresh 32-byte nonce from the operating system, so a proof is
//! good for one connection only: a captured handshake replayed to the
//! acceptor meets a new `nonce_a` and fails. The role is part of what is
//! hashed, so an acceptor's proof is never a dialler's: an attacker cannot
//! reflect a node's own answer back at it. The acceptor proves itself first
//! but learns nothing from a dialler before that dialler has proved itself,
//! and the dialler sends its layout only to an acceptor that has proved
//! itself, so a refusal before authentication carries no layout hash and no
//! member list.
//!
//! The key is derived (BLAKE3 `derive_key`) from the contents of
//! `cluster.secret_file`. A cluster with no secret file uses the key derived
//! from the empty secret, which anyone can compute: such a cluster is
//! allowed only when every member's peer address is on loopback (see
//! [`ClusterConfig::validate`](crate::config::ClusterConfig::validate)).
//!
//! What this does not do: it authenticates the connection's start, not each
//! frame, and encrypts nothing. A man in the middle who can rewrite TCP
//! streams between members can relay a handshake and then inject frames,
//! and anyone on the path reads the traffic; the README's Security section
//! says so.

use std::fmt;
use std::io::Read;
use std::path::Path;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::NodeId;

/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// The shortest cluster secret taken, in bytes (after trimming whitespace).
pub const SECRET_BYTES_MIN: usize = 16;
/// The longest secret file read.
pub const SECRET_FILE_BYTES_MAX: u64 = 4096;
/// The most secrets one file holds: the one a node proves with, and those
/// it also takes while a rotation is under way.
pub const SECRET_LINES_MAX: usize = 4;

/// BLAKE3's key-derivation context for the peer key: fixed forever, so
/// every version derives the same key from the same secret.
const KEY_CONTEXT: &str = "webvac 2026-12-02 peer authentication key";

/// A handshake nonce.
pub type Nonce = [u8; NONCE_BYTES];
/// A handshake proof.
pub type Proof = [u8; 32];

/// A fresh nonce from the operating system's generator.
pub fn nonce() -> Nonce {
    let mut n = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// Which side of a handshake a proof is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The node that opened the connection.
    Dialler,
    /// The node whose peer port it reached.
    Acceptor,
}

/// What both sides' proofs cover.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Transcript {
    /// The envelope version both sides speak.
    pub wire_version: u16,
    /// The node that dialled.
    pub dialler: NodeId,
    /// The node that accepted.
    pub acceptor: NodeId,
    /// The dialler's nonce.
    pub dialler_nonce: Nonce,
    /// The acceptor's nonce.
    pub acceptor_nonce: Nonce,
}

impl Transcript {
    /// The transcript of a handshake at this build's wire version.
    pub fn of(
        dialler: NodeId,
        acceptor: NodeId,
        dialler_nonce: Nonce,
        acceptor_nonce: Nonce,
    ) -> Self {
        Self {
            wire_version: super::WIRE_VERSION,
            dialler,
            acceptor,
            dialler_nonce,
            acceptor_nonce,
        }
    }
}

/// The key peers prove they hold, and the keys a node takes as proof
/// (during a rotation, the old and the new secret's). Its `Debug` shows
/// whether it came from a secret, never the key.
#[derive(Clone)]
pub struct PeerKey {
    /// What this node proves with: the secret file's first line.
    key: [u8; 32],
    /// Every key taken as proof, `key` first: the file's lines.
    accepted: Vec<[u8; 32]>,
    secret: bool,
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerKey")
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// Keys compare in constant time.
impl PartialEq for PeerKey {
    fn eq(&self, other: &Self) -> bool {
        self.secret == other.secret
            && self.accepted.len() == other.accepted.len()
            && self
                .accepted
                .iter()
                .zip(&other.accepted)
                .all(|(a, b)| blake3::Hash::from(*a) == blake3::Hash::from(*b))
    }
}

impl Eq for PeerKey {}

/// Why a secret file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// It could not be read.
    #[error("cannot read cluster.secret_file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Others than its owner may read it.
    #[error(
        "cluster.secret_file {path} is readable by group or others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Too short or too long.
    #[error(
        "cluster.secret_file {path}: a secret of {bytes} bytes; each line is a secret of at least {SECRET_BYTES_MIN} bytes, at most {SECRET_LINES_MAX} lines and {SECRET_FILE_BYTES_MAX} bytes in all (e.g. `head -c 32 /dev/urandom | base64 > {path}`)"
    )]
    Size {
        /// The file.
        path: String,
        /// The offending secret's length after trimming (0: no secret).
        bytes: usize,
    },
}

impl PeerKey {
    /// The key of a cluster whose secret is `secret`.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self::rotating(secret, &[])
    }

    /// The key of `secret`, also taking proofs made with any of `also`
    /// (secrets being rotated in or out).
    pub fn rotating(secret: &[u8], also: &[&[u8]]) -> Self {
        let key = blake3::derive_key(KEY_CONTEXT, secret);
        let mut accepted = vec![key];
        accepted.extend(also.iter().map(|s| blake3::derive_key(KEY_CONTEXT, s)));
        Self {
            key,
            accepted,
            secret: true,
        }
    }

    /// The key of a cluster with no secret: anyone can compute it, so it
    /// only tells a member from a stray process that speaks another
    /// version.
    pub fn open() -> Self {
        let key = blake3::derive_key(KEY_CONTEXT, b"");
        Self {
            key,
            accepted: vec![key],
            secret: false,
        }
    }

    /// Whether the key came from a secret.
    pub fn is_secret(&self) -> bool {
        self.secret
    }

    /// A key for another use (`context` names it), derived from the secret
    /// this node proves with; `None` without a secret.
    pub fn derive(&self, context: &str) -> Option<[u8; 32]> {
        self.secret.then(|| blake3::derive_key(context, &self.key))
    }

    /// The key in the secret file at `path`: one secret a line (blank
    /// lines and surrounding whitespace ignored). A node proves it holds
    /// the first and takes proofs made with any, so a secret can be
    /// rotated one node at a time (README, Security). Refuses a file that
    /// group or others may read (as ssh refuses such a private key), a
    /// secret shorter than [`SECRET_BYTES_MIN`], and more than
    /// [`SECRET_LINES_MAX`] secrets.
    ///
    /// # Errors
    /// As above, each naming the file and what to do.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let shown = path.display().to_string();
        let read_err = |source| SecretError::Read {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(SecretError::Exposed { path: shown, mode });
            }
        }
        let mut text = Vec::new();
        file.take(SECRET_FILE_BYTES_MAX + 1)
            .read_to_end(&mut text)
            .map_err(read_err)?;
        let secrets: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .map(<[u8]>::trim_ascii)
            .filter(|line| !line.is_empty())
            .collect();
        let size_err = |bytes| SecretError::Size {
            path: shown.clone(),
            bytes,
        };
        if text.len() as u64 > SECRET_FILE_BYTES_MAX {
            return Err(size_err(text.len()));
        }
        if let Some(short) = secrets.iter().find(|s| s.len() < SECRET_BYTES_MIN) {
            return Err(size_err(short.len()));
        }
        match secrets.split_first() {
            Some((first, rest)) if rest.len() < SECRET_LINES_MAX => Ok(Self::rotating(first, rest)),
            Some(_) => Err(size_err(0)),
            None => Err(size_err(0)),
        }
    }

    /// The proof that the side in `role` holds this key, for `transcript`.
    pub fn prove(&self, role: Role, transcript: &Transcript) -> Proof {
        prove_with(&self.key, role, transcript)
    }

    /// Whether `proof` is the side in `role`'s proof for `transcript` by
    /// any of the accepted keys (compared in constant time).
    pub fn verify(&self, role: Role, transcript: &Transcript, proof: &Proof) -> bool {
        self.accepted.iter().any(|key| {
            blake3::Hash::from(prove_with(key, role, transcript)) == blake3::Hash::from(*proof)
        })
    }
}

/// `key`'s proof for the side in `role` of `transcript`.
fn prove_with(key: &[u8; 32], role: Role, transcript: &Transcript) -> Proof {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(match role {
        Role::Dialler => b"dialler\0",
        Role::Acceptor => b"acceptor",
    });
    h.update(&transcript.wire_version.to_le_bytes());
    h.update(&transcript.dialler.to_le_bytes());
    h.update(&transcript.acceptor.to_le_bytes());
    h.update(&transcript.dialler_nonce);
    h.update(&transcript.acceptor_nonce);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_need_a_secret_and_differ_by_secret_and_use() {
        assert_eq!(PeerKey::open().derive("use"), None);
        let a = PeerKey::from_secret(b"secret a");
        assert_eq!(
            a.derive("use"),
            PeerKey::from_secret(b"secret a").derive("use")
        );
        assert_ne!(
            a.derive("use"),
            PeerKey::from_secret(b"secret b").derive("use")
        );
        assert_ne!(a.derive("use"), a.derive("another use"));
        assert_ne!(a.derive("use"), Some(a.key));
    }

    fn transcript() -> Transcript {
        Transcript {
            wire_version: 4,
            dialler: 1,
            acceptor: 2,
            dialler_nonce: nonce(),
            acceptor_nonce: nonce(),
        }
    }

    #[test]
    fn a_proof_holds_for_its_key_role_and_transcript_only() {
        let key = PeerKey::from_secret(b"0123456789abcdef");
        let t = transcript();
        let proof = key.prove(Role::Dialler, &t);
        assert!(key.verify(Role::Dialler, &t, &proof));
        assert!(
            !key.verify(Role::Acceptor, &t, &proof),
            "reflected to the other role"
        );
        assert!(
            !PeerKey::from_secret(b"0123456789abcdeX").verify(Role::Dialler, &t, &proof),
            "another secret"
        );
        assert!(
            !PeerKey::open().verify(Role::Dialler, &t, &proof),
            "no secret"
        );
        let replayed = Transcript {
            acceptor_nonce: nonce(),
            ..t
        };
        assert!(
            !key.verify(Role::Dialler, &replayed, &proof),
            "a new acceptor nonce"
        );
        let other_ids = Transcript { dialler: 3, ..t };
        assert!(
            !key.verify(Role::Dialler, &other_ids, &proof),
            "another node id"
        );
    }

    #[test]
    fn a_rotating_node_proves_with_the_first_secret_and_takes_any() {
        let t = transcript();
        let old = PeerKey::from_secret(b"the old secret, 32 bytes or so");
        let new = PeerKey::from_secret(b"the new secret, 32 bytes or so");
        let both = PeerKey::rotating(
            b"the new secret, 32 bytes or so",
            &[b"the old secret, 32 bytes or so"],
        );
        assert!(both.verify(Role::Dialler, &t, &old.prove(Role::Dialler, &t)));
        assert!(both.verify(Role::Dialler, &t, &new.prove(Role::Dialler, &t)));
        assert!(
            new.verify(Role::Acceptor, &t, &both.prove(Role::Acceptor, &t)),
            "proves with the first"
        );
        assert!(!old.verify(Role::Acceptor, &t, &both.prove(Role::Acceptor, &t)));
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("webvac-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("secret");
        let write = |text: &[u8], mode: u32| {
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write(b"a-long-enough-secret\n", 0o600);
        let key = PeerKey::load(&path).expect("a private secret");
        assert!(key.is_secret());
        let t = transcript();
        assert!(
            PeerKey::from_secret(b"a-long-enough-secret").verify(
                Role::Acceptor,
                &t,
                &key.prove(Role::Acceptor, &t)
            ),
            "surrounding whitespace is not part of the secret"
        );
        write(
            b"\n  the new secret, rotating in\n\na-long-enough-secret\n",
            0o600,
        );
        let rotating = PeerKey::load(&path).expect("two secrets");
        assert!(rotating.verify(
            Role::Dialler,
            &t,
            &PeerKey::from_secret(b"a-long-enough-secret").prove(Role::Dialler, &t)
        ));
        assert!(PeerKey::from_secret(b"the new secret, rotating in").verify(
            Role::Dialler,
            &t,
            &rotating.prove(Role::Dialler, &t)
        ));
        write(b"a-long-enough-secret-1\na-long-enough-secret-2\na-long-enough-secret-3\na-long-enough-secret-4\na-long-enough-secret-5\n", 0o600);
        assert!(
            matches!(PeerKey::load(&path), Err(SecretError::Size { .. })),
            "five secrets"
        );
        write(b"\n \n", 0o600);
        assert!(
            matches!(
                PeerKey::load(&path),
                Err(SecretError::Size { bytes: 0, .. })
            ),
            "none"
        );
        write(b"a-long-enough-secret\n", 0o644);
        let err = PeerKey::load(&path).expect_err("readable by others");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        write(b"short\n", 0o600);
        assert!(matches!(
            PeerKey::load(&path),
            Err(SecretError::Size { bytes: 5, .. })
        ));
        write(&vec![b'x'; 5000], 0o600);
        assert!(matches!(
            PeerKey::load(&path),
            Err(SecretError::Size { .. })
        ));
        assert!(matches!(
            PeerKey::load(&dir.join("absent")),
            Err(SecretError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
